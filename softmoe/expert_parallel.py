"""The expert-parallel bank (:class:`ExpertParallel`): a bank's experts split over a process group, its forward
two ``all_to_all`` exchanges around this rank's experts.

How a model is converted, and its state dicts, gradients and DDP: :mod:`softmoe.parallel`, whose docstring
describes the scheme and its communication.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._functional_collectives import all_to_all_single_autograd
from torch.distributed.distributed_c10d import _resolve_process_group

# torch 2.14 renamed all_gather_into_tensor (kept, deprecated) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
LOCAL_EXPERTS = "local_experts"  # the attribute of ExpertParallel holding this rank's bank


def process_group_or_world(group: Optional[dist.ProcessGroup]) -> dist.ProcessGroup:
    """``group``, or the world where it is None; refused where torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "expert parallelism needs an initialised torch.distributed process group: launch with torchrun and "
            "call torch.distributed.init_process_group(...) before converting the model"
        )
    return dist.group.WORLD if group is None else group


def leading_expert_dim(bank: nn.Module) -> int:
    """The number of experts of a bank whose parameters and buffers all lead with the expert dimension."""
    sizes = {tensor.shape[0] if tensor.ndim else None for tensor in _bank_tensors(bank)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"an expert bank for expert parallelism must stack every parameter and buffer over the experts "
            f"(leading dimension num_experts), got leading sizes {sorted(map(str, sizes))} in {type(bank).__name__}"
        )
    return sizes.pop()


def _bank_tensors(bank: nn.Module) -> Iterator[torch.Tensor]:
    yield from bank.parameters()
    yield from bank.buffers()


class _ScaleGradient(torch.autograd.Function):
    """Identity forward, gradient multiplied by ``factor`` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None]:
        return grad * ctx.factor, None


class ExpertParallel(nn.Module):
    """An expert bank split over a process group: pass it as ``SoftMoE(experts=...)``.

    Maps slots [b, num_experts, p, d] to [b, num_experts, p, d'] exactly as the whole bank would, while
    this rank computes only its ``num_experts / world_size`` experts, on the slots of every rank.

    Args:
        local_experts: this rank's experts, a bank mapping [b, n_local, p, d] -> [b, n_local, p, d'] whose
            parameters all lead with n_local (:class:`~softmoe.experts.BatchedMlp` or
            :class:`~softmoe.stacked_experts.StackedExperts`). Rank r's bank holds global experts r·n_local onwards.
            :func:`~softmoe.parallel.to_expert_parallel` builds these from a whole model.
        group: the experts' process group, over which the bank is split (default: the world).
        data_group: the ranks holding the same experts as this one in the other data-parallel replicas
            (``mesh["data"]`` of :func:`~softmoe.parallel.expert_data_mesh`); None: this rank's experts have no
            other copy.
            With it, ``group`` x ``data_group`` must be the whole world.
        uneven_batches: set when ranks may feed different batch sizes (e.g. a last partial batch without
            ``DistributedSampler``'s padding). Costs one small ``all_gather`` and a host sync per call;
            without it, ranks must feed equal batch sizes.
    """

    def __init__(
        self,
        local_experts: nn.Module,
        group: Optional[dist.ProcessGroup] = None,
        *,
        data_group: Optional[dist.ProcessGroup] = None,
        uneven_batches: bool = False,
    ) -> None:
        super().__init__()
        group = process_group_or_world(group)
        self.local_experts = local_experts
        # The groups' names, not the groups: a module holding a ProcessGroup cannot be deep-copied (EMA copies).
        self.group_name = group.group_name
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.data_group_name = None if data_group is None else data_group.group_name
        self.data_world_size = 1 if data_group is None else dist.get_world_size(data_group)
        if data_group is not None and self.world_size * self.data_world_size != dist.get_world_size():
            raise ValueError(
                f"the experts' group ({self.world_size} ranks) x their data-parallel group ({self.data_world_size}) "
                f"must span the world of {dist.get_world_size()} ranks: build them with expert_data_mesh"
            )
        self.num_local_experts = leading_expert_dim(local_experts)
        self.num_experts = self.world_size * self.num_local_experts
        self.first_expert = self.rank * self.num_local_experts
        self.uneven_batches = bool(uneven_batches)

    @property
    def group(self) -> dist.ProcessGroup:
        return _resolve_process_group(self.group_name)

    @property
    def data_group(self) -> Optional[dist.ProcessGroup]:
        return None if self.data_group_name is None else _resolve_process_group(self.data_group_name)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        if slots.ndim != 4 or slots.shape[1] != self.num_experts:
            raise ValueError(f"slots must have shape [batch, num_experts={self.num_experts}, slots_per_expert, dim], "
                             f"got {list(slots.shape)}")
        b, n, p, d = slots.shape
        w, n_local = self.world_size, self.num_local_experts
        # Split sizes along dim 0 of the buffers: b examples go to every rank, b_r come from rank r.
        sent_sizes, received_sizes = None, None  # None: equal splits
        if self.uneven_batches:
            sent_sizes, received_sizes = [b] * w, self._batch_sizes(b, slots.device)
        # Grouped by the rank owning the experts: [w, b, n_local, p, d] -> [w·b, n_local, p, d].
        outgoing = slots.reshape(b, w, n_local, p, d).transpose(0, 1).reshape(w * b, n_local, p, d)
        incoming = all_to_all_single_autograd(outgoing, received_sizes, sent_sizes, self.group_name)
        # [Σ b_r, n_local, p, d]: every rank's examples for this rank's experts, in rank order. The experts return a
        # transposed view, which torch 2.11's all_to_all refuses (2.14 copies it): hence contiguous().
        outputs = self._local_experts_mean_grad(incoming)  # [Σ b_r, n_local, p, d']
        returned = all_to_all_single_autograd(outputs.contiguous(), sent_sizes, received_sizes, self.group_name)
        width = outputs.shape[-1]  # spelled out, not -1: an empty batch has no elements to infer it from
        slot_outputs = returned.view(w, b, n_local, p, width).transpose(0, 1).reshape(b, n, p, width)
        # one rank: the reshape is a view of the exchange's buffer (more ranks: a copy), and FSDP2 warns at every call
        # of a module that returns a view ("can cause backward to fail or produce wrong gradients"); the same copy
        return slot_outputs.clone() if slot_outputs._is_view() else slot_outputs

    def _local_experts_mean_grad(self, slots: torch.Tensor) -> torch.Tensor:
        """The local experts, with their parameters' gradients averaged over ranks, not summed.

        Scaling the outputs' gradient by 1/W scales both the parameters' and the slots' gradients;
        scaling the slots' gradient back by W leaves the slots (and everything before them) untouched.
        """
        if self.world_size == 1:
            return self.local_experts(slots)
        outputs = self.local_experts(_ScaleGradient.apply(slots, float(self.world_size)))
        return _ScaleGradient.apply(outputs, 1.0 / self.world_size)

    def _batch_sizes(self, batch_size: int, device: torch.device) -> List[int]:
        sizes = torch.empty(self.world_size, dtype=torch.int64, device=device)
        _all_gather_single(sizes, torch.tensor([batch_size], dtype=torch.int64, device=device), group=self.group)
        return sizes.tolist()

    def extra_repr(self) -> str:
        last = self.first_expert + self.num_local_experts - 1
        return (
            f"num_experts={self.num_experts}, world_size={self.world_size}, data_world_size={self.data_world_size}, "
            f"local experts {self.first_expert}..{last}, uneven_batches={self.uneven_batches}"
        )


