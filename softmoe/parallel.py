"""Expert parallelism: the experts of every MoE layer split over the ranks of a process group.

On a group of W ranks each rank holds ``num_experts / W`` experts of each layer (rank r owns the
contiguous experts ``r·n/W ... (r+1)·n/W - 1``); the router Φ, its scale and every dense parameter
stay replicated. Every rank feeds its own batch (data parallel). A layer's forward pass:

1. computes its slots X̃ [b, n, p, d] locally, from its own examples;
2. sends each expert's slots to the rank that owns the expert (one ``all_to_all``);
3. runs its local experts on the slots received from all ranks, [Σ b, n/W, p, d];
4. sends the outputs back (a second ``all_to_all``) and combines them locally, Y = C Ỹ.

Communication per MoE layer and example: the n·p slot vectors of size d go out and the n·p outputs of
size d' come back in the forward pass, and their gradients travel the same two ways in the backward
pass; a fraction (W-1)/W of it leaves the rank. For ViT-S/16 with 128 experts x 1 slot (d = 384) that
is 128·384 = 49,152 numbers per example in each direction, 192 KiB in float32.

Gradients follow data parallelism's convention: with every rank's loss the mean over its own batch,
the expert shards' gradients are the mean over ranks (each expert already sees all ranks' slots
through the ``all_to_all``), so after the replicated gradients are averaged too (DDP, or
:func:`all_reduce_replicated_grads`) one optimiser step equals the single-process step on the
global batch. Every rank must run every forward and backward pass: the ``all_to_all`` is collective.

On many ranks the experts' group is smaller than the world: a 2-D mesh of ``D = W / E`` data-parallel
replicas of ``E`` expert-parallel ranks (:func:`expert_data_mesh`, Megatron's expert-model-parallel size,
torchtitan's EP degree). The ``all_to_all`` stays inside an expert group (on a cluster: inside a node),
each replica holds every expert once, and an expert shard's gradient is averaged over its ``D`` copies
(:func:`all_reduce_expert_grads`, after backward) while the replicated parameters are averaged over all
``W`` ranks. The flat layout is ``E = W``.

Typical use, with ``torchrun --nproc_per_node=W``::

    torch.distributed.init_process_group("nccl")
    model = to_expert_parallel(build_model().cuda())     # every rank keeps its shard of the experts
    model = distributed_data_parallel(model)               # DDP for the replicated parameters only
    ...

and on a data x expert mesh (``E`` ranks per expert group)::

    mesh = expert_data_mesh("cuda", expert_parallel_size=8)
    model = to_expert_parallel(model, mesh["expert"].get_group(), data_group=mesh["data"].get_group())
    model = distributed_data_parallel(model)               # replicated parameters: over the world
    loss.backward(); all_reduce_expert_grads(model)         # experts: over their data-parallel copies
    ...
    full = gather_expert_parallel_state_dict(model)        # the single-process state dict on rank 0
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from ._checks import require_positive_int
from .capture import moe_layers
from .expert_parallel import LOCAL_EXPERTS, ExpertParallel, leading_expert_dim, process_group_or_world


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of ``tensor``: a DTensor's local shard (FSDP, a device mesh), else ``tensor`` itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

__all__ = [
    "ExpertParallel", "all_reduce_expert_grads", "all_reduce_replicated_grads", "clip_grad_norm_",
    "distributed_data_parallel", "expert_data_mesh", "expert_parallel_layers", "expert_parameter_names",
    "gather_expert_parallel_state_dict", "shard_state_dict", "to_expert_parallel",
]

def expert_data_mesh(device_type: str, expert_parallel_size: int) -> DeviceMesh:
    """The world as a ``(data, expert)`` mesh: ``world_size / expert_parallel_size`` replicas of
    ``expert_parallel_size`` ranks.

    Ranks fill it row by row, so an expert group is ``expert_parallel_size`` consecutive ranks: with
    ``torchrun``'s numbering (node-major) it stays inside a node whenever ``expert_parallel_size`` divides
    the processes per node, and the ``all_to_all`` of every MoE layer uses the fast links within it. The
    data-parallel group of a rank is the ranks holding the same experts, one per replica.
    """
    world_size = dist.get_world_size(process_group_or_world(None))
    if world_size % require_positive_int("expert_parallel_size", expert_parallel_size):
        raise ValueError(f"expert_parallel_size={expert_parallel_size} must divide the world size {world_size}")
    shape = (world_size // expert_parallel_size, expert_parallel_size)
    return init_device_mesh(device_type, shape, mesh_dim_names=("data", "expert"))


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def expert_parallel_layers(model: nn.Module) -> Dict[str, ExpertParallel]:
    """The :class:`ExpertParallel` banks of ``model`` (a DDP wrapper is looked through), by module name."""
    return {name: module for name, module in _unwrap(model).named_modules() if isinstance(module, ExpertParallel)}


def expert_parameter_names(model: nn.Module) -> List[str]:
    """Names of the parameters and buffers that are sharded over the ranks (every other one is replicated)."""
    names = []
    for layer_name, layer in expert_parallel_layers(model).items():
        prefix = f"{layer_name}." if layer_name else ""
        names += [prefix + name for name, _ in layer.named_parameters()]
        names += [prefix + name for name, _ in layer.named_buffers()]
    return names


def _shard_bank_(bank: nn.Module, first: int, count: int) -> nn.Module:
    """Keep experts ``first .. first+count-1`` of ``bank``, in place."""
    for module in bank.modules():
        for name, param in module.named_parameters(recurse=False):
            shard = param.detach()[first : first + count].clone()
            module._parameters[name] = nn.Parameter(shard, requires_grad=param.requires_grad)
        for name, buffer in module.named_buffers(recurse=False):
            module._buffers[name] = buffer[first : first + count].clone()
    if isinstance(getattr(bank, "num_experts", None), int):
        bank.num_experts = count  # StackedExperts' per-expert loop reads it
    for module in bank.modules():  # autocast copies of the whole bank, made by a forward before the conversion
        if hasattr(module, "clear_low_precision_copies"):
            module.clear_low_precision_copies()
    return bank


@torch.no_grad()
def _broadcast_from_first_rank(model: nn.Module, group: dist.ProcessGroup) -> None:
    source = dist.get_global_rank(group, 0)
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=source, group=group)


def _broadcast_over_mesh(model: nn.Module, group: dist.ProcessGroup, data_group: Optional[dist.ProcessGroup]) -> None:
    """Every rank of the mesh gets the weights of its first rank: each replica takes replica 0's, then each
    expert group its first rank's (which are, by then, those of the first rank of replica 0)."""
    if data_group is not None:
        _broadcast_from_first_rank(model, data_group)
    _broadcast_from_first_rank(model, group)


def to_expert_parallel(
    model: nn.Module,
    group: Optional[dist.ProcessGroup] = None,
    *,
    data_group: Optional[dist.ProcessGroup] = None,
    uneven_batches: bool = False,
    broadcast: bool = True,
) -> nn.Module:
    """Convert ``model`` in place to expert parallelism on ``group`` and return it.

    Every MoE layer of ``model`` (a :class:`~softmoe.SoftMoE`, or any layer found by
    :func:`softmoe.moe_layers` with an ``experts`` bank stacked over the experts) keeps only this rank's
    shard of its experts, wrapped in :class:`ExpertParallel`; all other parameters stay whole.

    Args:
        model: a single-process model, built the same way on every rank. Call before creating the
            optimiser (the expert parameters are replaced) and before wrapping in DDP.
        group: the experts' process group (default: the world).
        data_group: the data-parallel group of this rank's experts (see :class:`ExpertParallel`).
        uneven_batches: see :class:`ExpertParallel`.
        broadcast: first copy the first rank's parameters and buffers to every rank (as DDP does), so ranks
            that initialised with different seeds still hold shards of one model.
    """
    group = process_group_or_world(group)
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    layers = {
        name: layer
        for name, layer in moe_layers(model).items()
        if isinstance(getattr(layer, "experts", None), nn.Module) and not isinstance(layer.experts, ExpertParallel)
    }
    if not layers:
        why = "is already expert-parallel" if expert_parallel_layers(model) else "has no MoE layer with an expert bank"
        raise ValueError(f"{type(model).__name__} {why}: to_expert_parallel splits the experts over the ranks once")
    for name, layer in layers.items():  # check every layer before changing any
        num_experts = leading_expert_dim(layer.experts)
        if num_experts % world_size:
            raise ValueError(
                f"expert parallelism needs num_experts divisible by the world size: MoE layer {name or '<model>'!r} "
                f"has num_experts={num_experts}, world size is {world_size}"
            )
    if broadcast:
        _broadcast_over_mesh(model, group, data_group)
    for layer in layers.values():
        count = leading_expert_dim(layer.experts) // world_size
        local = _shard_bank_(layer.experts, rank * count, count)
        layer.experts = ExpertParallel(local, group, data_group=data_group, uneven_batches=uneven_batches)
    return model


def _full_key(key: str, layers: Mapping[str, ExpertParallel]) -> Tuple[str, Optional[ExpertParallel]]:
    """The single-process name of a state-dict key, and the ExpertParallel layer it is sharded by (or None)."""
    for layer_name, layer in layers.items():
        prefix = f"{layer_name}.{LOCAL_EXPERTS}." if layer_name else f"{LOCAL_EXPERTS}."
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            return (f"{layer_name}.{rest}" if layer_name else rest), layer
    return key, None


def gather_expert_parallel_state_dict(model: nn.Module, dst: int = 0) -> Optional[Dict[str, torch.Tensor]]:
    """The whole model's single-process state dict on group rank ``dst``, ``None`` on the other ranks.

    Collective: every rank of the experts' group must call it. The result loads into the model built
    on one process (same keys, order and shapes as its ``state_dict()``), so a run saved on W ranks
    evaluates on one. Replicated entries are taken from ``dst``; tensors stay on the model's device.
    """
    group = _group_of(model)
    is_dst = dist.get_rank(group) == dst
    model = _unwrap(model)
    layers = expert_parallel_layers(model)
    full: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name, layer = _full_key(key, layers)
        if layer is None:
            full[name] = value
            continue
        shards = [torch.empty_like(value) for _ in range(layer.world_size)] if is_dst else None
        dist.gather(value.contiguous(), shards, dst=dist.get_global_rank(group, dst), group=group)
        if is_dst:
            full[name] = torch.cat(shards)
    return full if is_dst else None


def shard_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's part of a single-process state dict, ready for ``model.load_state_dict``.

    ``model`` is the expert-parallel model (after :func:`to_expert_parallel`); no communication: each
    rank reads the whole checkpoint and keeps its experts.
    """
    model = _unwrap(model)
    layers = expert_parallel_layers(model)
    local: Dict[str, torch.Tensor] = {}
    for key, target in model.state_dict().items():
        name, layer = _full_key(key, layers)
        if name not in state_dict:
            raise ValueError(f"the state dict has no {name!r} (needed for {key!r} of the expert-parallel model)")
        value = state_dict[name]
        if layer is not None:
            if value.ndim == 0 or value.shape[0] != layer.num_experts:
                raise ValueError(
                    f"{name!r} must stack num_experts={layer.num_experts} experts on its first dimension, "
                    f"got shape {list(value.shape)}"
                )
            value = value[layer.first_expert : layer.first_expert + layer.num_local_experts]
        if value.shape != target.shape:
            raise ValueError(f"{name!r} has shape {list(value.shape)}, the model expects {list(target.shape)}")
        local[key] = value
    return local


def _layer_of(model: nn.Module) -> ExpertParallel:
    """One expert-parallel layer of ``model``, after checking that all of them use the same groups."""
    layers = expert_parallel_layers(model)
    if not layers:
        name = type(_unwrap(model)).__name__
        raise ValueError(f"{name} has no expert-parallel layers: call to_expert_parallel first")
    names = {(layer.group_name, str(layer.data_group_name)) for layer in layers.values()}
    if len(names) != 1:
        raise ValueError(f"the expert-parallel layers use different process groups {sorted(names)}; expected one")
    return next(iter(layers.values()))


def _group_of(model: nn.Module) -> dist.ProcessGroup:
    return _layer_of(model).group


def _split_parameters(model: nn.Module) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
    """(replicated, expert-sharded) parameters of ``model``."""
    model = _unwrap(model)
    sharded = {id(p) for layer in expert_parallel_layers(model).values() for p in layer.parameters()}
    replicated = [p for p in model.parameters() if id(p) not in sharded]
    experts = [p for p in model.parameters() if id(p) in sharded]
    return replicated, experts


@torch.no_grad()
def _average_grads(params: List[nn.Parameter], group: dist.ProcessGroup) -> None:
    """Replace each gradient by its mean over ``group``: one flat all_reduce per dtype."""
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in sorted({g.dtype for g in grads}, key=str):  # the same order on every rank
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        flat /= dist.get_world_size(group)
        for grad, reduced in zip(same, flat.split([g.numel() for g in same])):
            grad.copy_(reduced.view_as(grad))


def all_reduce_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of the replicated parameters over every rank of the mesh (the experts' group,
    then the data-parallel one); leave the experts' alone.

    The manual alternative to :func:`distributed_data_parallel`: call after ``loss.backward()`` and
    before the optimiser step. Parameters without a gradient are skipped; every rank must have
    gradients for the same parameters.
    """
    layer = _layer_of(model)
    replicated = _split_parameters(model)[0]
    for group in (layer.group, layer.data_group):  # a mean of means over equal groups: the mean over all
        if group is not None:
            _average_grads(replicated, group)


def all_reduce_expert_grads(model: nn.Module) -> None:
    """Average each expert shard's gradient over its copies in the other data-parallel replicas.

    Call after ``loss.backward()`` (and before clipping and the optimiser step) on a data x expert mesh;
    nothing to do when the experts' group is the world. The :class:`ExpertParallel` layers have already
    averaged over the experts' group, so the result is the mean over all ranks, as for a replicated parameter.
    """
    data_group = _layer_of(model).data_group
    if data_group is not None and dist.get_world_size(data_group) > 1:
        _average_grads(_split_parameters(model)[1], data_group)


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole (sharded) model; returns the total norm.

    Each rank sees only its experts' gradients, so a per-rank clip would scale the replicated
    parameters differently on different ranks and they would drift apart. Here the norm counts the
    replicated gradients once (they must already be averaged) and every expert shard, and every rank
    applies the same factor. Collective.
    """
    group = _group_of(model)
    replicated, experts = _split_parameters(model)
    device = next(_unwrap(model).parameters()).device
    norm_type = float(norm_type)

    def grad_norms(params: List[nn.Parameter]) -> torch.Tensor:  # [parameters with a gradient], float64
        grads = [p.grad for p in params if p.grad is not None]
        norms = [torch.linalg.vector_norm(g, norm_type).to(device, torch.float64) for g in grads]
        return torch.stack(norms) if norms else torch.zeros(1, dtype=torch.float64, device=device)

    replicated_norms, expert_norms = grad_norms(replicated), grad_norms(experts)
    if norm_type == float("inf"):
        expert_max = expert_norms.max()
        dist.all_reduce(expert_max, op=dist.ReduceOp.MAX, group=group)
        total = torch.maximum(replicated_norms.max(), expert_max)
    else:
        expert_sum = expert_norms.pow(norm_type).sum()
        dist.all_reduce(expert_sum, group=group)
        total = (replicated_norms.pow(norm_type).sum() + expert_sum).pow(1.0 / norm_type)
    clip = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in [*replicated, *experts]:
        if p.grad is not None:
            p.grad.mul_(clip.to(p.grad.dtype))
    return total


def distributed_data_parallel(model: nn.Module, **ddp_kwargs) -> DistributedDataParallel:
    """Wrap an expert-parallel model in DDP that averages only the replicated parameters.

    The expert shards are excluded from DDP (they differ between ranks, so DDP must neither broadcast
    them from rank 0 nor average their gradients, which :class:`ExpertParallel` already averages).
    ``process_group`` defaults to the experts' group, or the world on a data x expert mesh; other keyword
    arguments go to DDP. On such a mesh, call :func:`all_reduce_expert_grads` after each backward pass.
    """
    layer = _layer_of(model)
    ddp_kwargs.setdefault("process_group", layer.group if layer.data_group is None else dist.group.WORLD)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, expert_parameter_names(model))
    return DistributedDataParallel(model, **ddp_kwargs)
