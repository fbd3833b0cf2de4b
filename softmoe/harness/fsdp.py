"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for ``trainer.strategy=fsdp``, composed with expert parallelism.

Layout, as torchtitan lays out a MoE model:

- every dense parameter (embeddings, attention, dense MLPs, routers, norms, head) is sharded over all W ranks
  (a 1-D ``fsdp`` mesh of the world), one ``fully_shard`` unit per transformer block plus the root;
- under expert parallelism (``mesh = (data, expert)``) each expert shard is sharded again over ``mesh["data"]``,
  its copies in the other replicas (its own ``fully_shard`` unit, nested inside its block's).

Gradients: FSDP's reduce-scatter averages the dense gradients over the W ranks and the expert shards' over
the D replicas; :class:`~softmoe.parallel.ExpertParallel` has already averaged those over the E ranks of the
expert group. So one step equals the single-process step on the global batch, as under DDP.
"""

from __future__ import annotations

import logging
import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from softmoe import parallel

log = logging.getLogger(__name__)


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16: parameters gathered and computed in bf16, gradients reduced (and kept) in fp32; else all fp32."""
    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def world_mesh(device_type: str) -> DeviceMesh:
    """The 1-D mesh of every rank over which dense parameters are sharded."""
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("fsdp",))


@torch.no_grad()
def _broadcast_from_rank_zero(model: nn.Module) -> None:
    """FSDP2 keeps each rank's initial weights; DDP's convention is rank 0's, so every rank starts alike."""
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def shard_model(
    model: nn.Module,
    device_type: str,
    *,
    expert_mesh: Optional[DeviceMesh] = None,
    precision: str = "fp32",
    reshard_after_forward: bool = True,
    broadcast: bool = True,
) -> nn.Module:
    """``fully_shard`` ``model`` in place and return it: each expert bank over ``expert_mesh["data"]`` (when expert
    parallel: call :func:`softmoe.parallel.to_expert_parallel` first), each of ``model.blocks`` and the root
    over all ranks. Call before building the optimizer: the parameters become DTensors. ``broadcast=False``: keep
    each rank's weights, e.g. of a model on the meta device, whose shards are allocated and filled afterwards."""
    if broadcast and expert_mesh is None:
        _broadcast_from_rank_zero(model)  # to_expert_parallel broadcasts on its own
    options = dict(mp_policy=mixed_precision_policy(precision), reshard_after_forward=reshard_after_forward)
    for layer in parallel.expert_parallel_layers(model).values():
        fully_shard(layer, mesh=expert_mesh["data"], **options)
    mesh = world_mesh(device_type)
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, **options)
    # The root's parameters are gathered for the whole forward pass anyway: never reshard them after it.
    fully_shard(model, mesh=mesh, mp_policy=options["mp_policy"], reshard_after_forward=False)
    return model


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global L2 gradient norm of a :func:`shard_model` model, every gradient scaled by the same clip factor.

    Every rank's local gradient shards are disjoint pieces of the whole model (dense parameters sharded over the
    world; an expert bank split over its group, then over the replicas), so the squared norm is one sum over the
    world. Collective."""
    grads = [parallel.local_tensor(p.grad) for p in model.parameters() if p.grad is not None]
    device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float64, device=device)
    for grad in grads:
        squares += torch.linalg.vector_norm(grad, dtype=torch.float64).square()
    dist.all_reduce(squares)
    total = squares.sqrt()
    if math.isfinite(max_norm):
        clip = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(clip.to(grad.dtype))
    return total.float()
