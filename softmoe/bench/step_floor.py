"""The floor of a mixed-precision training step: the bytes it must move besides its matmuls, and its FLOPs.

A trainer's bf16 step over float32 master weights (``trainer=gpu``) must, at the least:

* run its matmuls: forward + backward FLOPs at the measured bf16 matmul rate;
* write the bf16 copies of the weights the matmuls read: read 4 bytes, write 2 per such parameter, once
  per step (autocast casts a ``Linear``'s weight once per forward; the expert banks keep theirs across
  calls and recast them once per optimizer step);
* cast the bf16 weight gradients back to float32: read 2, write 4 per such parameter, except where the
  GEMM writes the float32 gradient itself (the expert banks on CUDA, ``softmoe.experts.ExpertLinear``);
* run the optimizer: fused AdamW reads the parameter, its gradient and both moments (4 x 4 bytes) and
  writes the parameter and both moments (3 x 4 bytes): 28 bytes per parameter.

Bytes are moved at the measured copy bandwidth. With expert parallelism over N GPUs, every expert term
divides by N (each GPU holds 1/N of the experts): the floor here is one GPU's with all experts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from torch import nn

ADAMW_BYTES_PER_PARAM = 7 * 4  # reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg, exp_avg_sq
# softmoe.optim.AdamW with bf16 moments: the same reads and writes, the moments 2 bytes each: 4 + 4 + 2 + 2 + 4 + 2 + 2
ADAMW_BF16_STATE_BYTES_PER_PARAM = 20
CAST_BYTES_PER_PARAM = 4 + 2  # float32 <-> bf16: read one, write the other
COPY_WRITE_BYTES = 2  # a bf16 copy written by the optimizer's update, which has the float32 weight at hand


@dataclass(frozen=True)
class ParameterCounts:
    """How many parameters a step touches in each way."""

    total: int  # every trainable parameter: the optimizer's
    cast_for_matmuls: int  # read by bf16 matmuls through a bf16 copy made once per step
    gradient_cast: int  # of those, whose float32 gradient is cast from a bf16 one (not written by the GEMM)
    experts: int  # in expert banks (what expert parallelism divides)
    expert_weights: int  # of those, the banks' matmul weights: the ones that keep a bf16 copy across calls


@dataclass(frozen=True)
class StepFloor:
    """The floor of one training step, its parts in bytes and seconds."""

    optimizer_bytes: int
    weight_copy_bytes: int
    gradient_cast_bytes: int
    flops: int
    matmul_rate: float  # FLOP/s
    bandwidth: float  # bytes/s

    @property
    def traffic_bytes(self) -> int:
        return self.optimizer_bytes + self.weight_copy_bytes + self.gradient_cast_bytes

    @property
    def matmul_s(self) -> float:
        return self.flops / self.matmul_rate

    @property
    def traffic_s(self) -> float:
        return self.traffic_bytes / self.bandwidth

    @property
    def seconds(self) -> float:
        return self.matmul_s + self.traffic_s

    def as_dict(self) -> dict:
        return {**asdict(self), "traffic_bytes": self.traffic_bytes, "matmul_s": self.matmul_s,
                "traffic_s": self.traffic_s, "seconds": self.seconds}


def step_floor(counts: ParameterCounts, flops: int, matmul_rate: float, bandwidth: float) -> StepFloor:
    return StepFloor(optimizer_bytes=ADAMW_BYTES_PER_PARAM * counts.total,
                     weight_copy_bytes=CAST_BYTES_PER_PARAM * counts.cast_for_matmuls,
                     gradient_cast_bytes=CAST_BYTES_PER_PARAM * counts.gradient_cast,
                     flops=flops, matmul_rate=matmul_rate, bandwidth=bandwidth)


def _numel(tensors: Iterable) -> int:
    return sum(t.numel() for t in tensors if t is not None and t.requires_grad)


def parameter_counts(model: nn.Module, expert_grads_written_in_float32: bool) -> ParameterCounts:
    """Count ``model``'s parameters by how a bf16 autocast step touches them: ``nn.Linear`` and ``nn.Conv2d``
    weights and biases and the expert banks' are cast for the matmuls, as is each router's Φ; norms,
    embeddings, tokens and router scales stay float32. ``expert_grads_written_in_float32``: the expert
    weights' gradients come out of the GEMM in float32 (CUDA), so they are not cast."""
    from ..experts import BatchedMlp
    from ..layer import SoftMoE

    cast, experts, expert_weights = 0, 0, 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            cast += _numel((module.weight, module.bias))
        elif isinstance(module, BatchedMlp):
            weights = _numel((module.fc1_weight, module.fc2_weight))
            cast += weights + _numel((module.fc1_bias, module.fc2_bias))
            expert_weights += weights
            experts += _numel(module.parameters())
        elif isinstance(module, SoftMoE):
            cast += _numel((module.phi,))
    exempt = expert_weights if expert_grads_written_in_float32 else 0
    return ParameterCounts(total=_numel(model.parameters()), cast_for_matmuls=cast, gradient_cast=cast - exempt,
                           experts=experts, expert_weights=expert_weights)
