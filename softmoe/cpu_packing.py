"""Expert weights packed once for oneDNN: faster float32 inference on CPU (opt-in, :func:`pack_experts_for_cpu`).

At inference each expert multiplies few rows (batch 32, one slot per expert: 32 rows) by its own weight. ``bmm``
(MKL) repacks every weight into its kernel's layout at every call, a cost a 32-row product cannot amortise.
oneDNN's linear on a weight reordered once ahead of time skips it: on an AMD EPYC Zen 4, fc1 of Soft MoE S/16 took
0.80-0.88x ``bmm``'s time, and the whole model's float32 inference at batch 32 went from 1.03-1.04x ViT-S/16's
time to 0.99x (``experiments/throughput/README.md``, session 15). Bias and GELU are fused into fc1's product.

The cost is memory: while packed, every expert weight has a second float32 copy in oneDNN's layout (3.6 GB for
Soft MoE S/16's 128 experts in 6 blocks). So it is opt-in, for a process that runs inference; training, autocast,
autograd, compiled graphs and other devices read the weights as before.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ._checks import require_bool

# Fewer rows per expert than this and bmm is faster: the product is bound by reading the weight, which bmm does
# faster from the plain layout (fc1 of S/16 on Zen 4, one run in session 15: bmm 10-13 ms at 1-2 rows against
# 16-17, even at 3, oneDNN ahead from 4 rows: 13 against 17 ms).
MIN_ROWS = 4

_GELU_ALGORITHMS = {"none": "none", "tanh": "tanh"}  # nn.GELU's approximate -> oneDNN's fused GELU


def packing_available() -> bool:
    """Whether this torch can pack weights for oneDNN (built with it, and with the ops inductor's freezing uses)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class PackedExpertWeights:
    """One expert bank's fc1 and fc2 weights, one oneDNN-packed tensor per expert, and what they were packed from.

    Packed lazily, at the first forward that can use them, and again whenever a weight changed since (an optimizer
    step, an in-place write, a move, a new weight tensor): the same test as the bank's autocast copies. A copy or a
    pickle of the bank starts empty and packs again (oneDNN tensors can be neither)."""

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.fc1: list = []
        self.fc2: list = []

    def __deepcopy__(self, memo) -> "PackedExpertWeights":
        return PackedExpertWeights()

    def __reduce__(self):
        return (PackedExpertWeights, ())

    def forward(self, bank: nn.Module, x: torch.Tensor, key: Callable[[], tuple]) -> Optional[torch.Tensor]:
        """``bank``'s MLP on ``x`` [n, rows, in] through the packed weights, or None where they do not apply (the
        bank's own path runs then). ``key()`` says what the weights are now (the bank's copy key of each), asked
        only where the packed weights apply. Eager calls only: the bank does not call it while fx, export or
        compile trace it."""
        if not self._applies(bank, x):
            return None
        weights_key = key()
        if self.key != weights_key:
            self._pack(bank, weights_key, rows=x.shape[1])
        linear = torch.ops.mkldnn._linear_pointwise
        x = x.contiguous()  # one gather of each expert's rows (strided in x) rather than a copy inside each call
        fc1_bias = _per_expert(bank.fc1_bias, bank.num_experts)
        fc2_bias = _per_expert(bank.fc2_bias, bank.num_experts)
        gelu = _GELU_ALGORITHMS.get(bank.act.approximate) if type(bank.act) is nn.GELU else None
        outputs = []
        for e in range(bank.num_experts):
            if gelu is not None:  # bias and GELU fused into fc1's product
                hidden = linear(x[e], self.fc1[e], fc1_bias[e], "gelu", [], gelu)
            else:
                hidden = bank.act(linear(x[e], self.fc1[e], fc1_bias[e], "none", [], ""))
            outputs.append(linear(hidden, self.fc2[e], fc2_bias[e], "none", [], ""))
        return torch.stack(outputs)

    @staticmethod
    def _applies(bank: nn.Module, x: torch.Tensor) -> bool:
        weights = [getattr(bank, name) for name in bank.WEIGHT_NAMES]
        return (not torch.is_grad_enabled()  # oneDNN's packed linear has no backward
                and x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[1] >= MIN_ROWS
                and bank._whole_weights()
                and all(w.device.type == "cpu" and w.dtype == torch.float32 for w in weights)
                and not torch.is_autocast_enabled("cpu")
                and bank.norm_eps is None  # the per-expert LayerNorm variant keeps the bank's path
                and not (bank.training and (bank.drop1.p > 0 or bank.drop2.p > 0)))

    def _pack(self, bank: nn.Module, key: tuple, rows: int) -> None:
        self.key, self.fc1, self.fc2 = None, [], []  # the stale packing goes before the new one is made
        # oneDNN picks the layout for the rows it is told; packed for 32, 128 or 256 rows each ran the others within
        # 2% (fc1 of S/16, Zen 4, one run in session 15), so the first call's rows serve later batch sizes too
        with torch.no_grad():
            for name, packed in (("fc1_weight", self.fc1), ("fc2_weight", self.fc2)):
                linear_layout = getattr(bank, name).transpose(1, 2)  # [n, out, in], nn.Linear's
                packed.extend(torch.ops.mkldnn._reorder_linear_weight(linear_layout[e].contiguous(), rows)
                              for e in range(bank.num_experts))
        self.key = key


def _per_expert(bias: Optional[torch.Tensor], num_experts: int) -> list:
    return [None] * num_experts if bias is None else list(bias.unbind(0))


def pack_experts_for_cpu(module: nn.Module, pack: bool = True) -> int:
    """Make every :class:`~softmoe.experts.BatchedMlp` in ``module`` run float32 CPU inference through expert
    weights packed for oneDNN (``pack=False``: stop, and free the packed copies). Returns the number of banks.

    Applies where no gradient is recorded (``torch.no_grad()`` / ``torch.inference_mode()``), on CPU, in float32,
    without autocast, eagerly, with at least :data:`MIN_ROWS` rows per expert (batch x slots per expert); any
    other call runs as before. The weights are packed at the first such call and again after they change. Costs a
    second copy of the expert weights while packed (see the module's docstring). A write through ``weight.data``
    escapes the change test: call this function again after one."""
    from .experts import BatchedMlp  # here, not at the top: experts imports this module

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    require_bool("pack", pack)
    if pack and not packing_available():
        raise RuntimeError("pack_experts_for_cpu needs torch built with oneDNN (torch.backends.mkldnn.is_available() "
                           "is False here); CPU inference runs unpacked without it")
    banks = [m for m in module.modules() if isinstance(m, BatchedMlp)]
    for bank in banks:
        bank.cpu_packing = PackedExpertWeights() if pack else None
    return len(banks)
