"""Sharded checkpoints (``torch.distributed.checkpoint``, DCP) for ``trainer.strategy=fsdp``: every rank writes its own
shards, no rank ever holds the whole model, and a checkpoint saved on W ranks loads on any number of ranks.

A checkpoint is a directory (``last.dcp/``, ``best.dcp/``, ``last.prev.dcp/``) holding DCP's per-rank files and
``.metadata``, and ``train_state.pt``: everything that is not a tensor of the model or optimizer (step, schedule,
RNG states, config, W&B id), written by rank 0 in :mod:`.checkpoint`'s format.

One key space for every layout: ``model.<name>`` and ``optim.state.<name>.<key>`` / ``optim.param_groups.<name>.<key>``
(``get_state_dict`` with a flattened optimizer state) with the single-process parameter names. An expert shard
(``...experts.local_experts.fc1_weight`` on a rank of an expert group) is saved as its slice of the whole bank
(``...experts.fc1_weight``): a DTensor on an ``(expert, data)`` mesh placed ``[Shard(0), Shard(0)]`` (the bank split
over the expert group, then by FSDP over the replicas), so DCP knows its offset and any other layout reads it.

Atomic: the ranks write into ``.last.dcp.tmp/``; once DCP has written ``.metadata`` (after every rank's files) and
rank 0 its ``train_state.pt``, rank 0 renames the old ``last.dcp`` to ``last.prev.dcp`` and the new one into place.
A crash at any moment leaves a complete ``last.dcp`` or ``last.prev.dcp`` (:func:`find`), never a mix.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from softmoe import parallel

from .checkpoint import LAST, load_checkpoint, save_checkpoint
from .errors import CheckpointError
from .rules import counted

log = logging.getLogger(__name__)

SUFFIX = ".dcp"
LAST_NAME = Path(LAST).stem  # last.dcp, last.prev.dcp
TRAIN_STATE = "train_state.pt"  # rank 0's non-tensor state, in checkpoint.py's format
OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def directory(run_dir: Path, name: str) -> Path:
    """``last.pt`` -> ``<run_dir>/last.dcp``: the sharded counterpart of a single-file checkpoint's name."""
    return Path(run_dir) / (Path(name).stem + SUFFIX)


def train_state_not_a_checkpoint(path: Path) -> Optional[str]:
    """Why ``path`` cannot be read as a checkpoint when it is a file of a sharded checkpoint: its ``train_state.pt``
    (the step, RNG and config, in a checkpoint's format but without the model, whose shards are beside it), its
    ``.metadata`` or a shard (each was called "truncated or damaged"), or None."""
    path = Path(path)
    part = path.name in (TRAIN_STATE, ".metadata") or path.suffix == ".distcp"  # any other file there is its own
    if not part or not path.is_file() or not (path.parent / ".metadata").is_file():
        return None
    what = {TRAIN_STATE: "the train state (its step, RNG and config; the model is in the shards beside it)",
            ".metadata": "the index of the shards"}.get(path.name, "one shard of the model")
    return f"{what} of the sharded checkpoint {path.parent}: name the directory itself, {path.parent}"


def is_complete(path: Path) -> bool:
    return (Path(path) / ".metadata").is_file() and (Path(path) / TRAIN_STATE).is_file()


def find(run_dir: Path) -> Optional[Path]:
    """The run directory's sharded ``last`` checkpoint: ``last.dcp``, or ``last.prev.dcp`` when a crash between the
    two renames of a save left only that one. A ``last.dcp`` missing a file is returned all the same (a save renames
    only a complete one into place, so it was damaged since): resuming reports it, then falls back as ``last.pt``
    does (:mod:`.resume`)."""
    last = Path(run_dir) / (LAST_NAME + SUFFIX)
    if last.is_dir():
        return last
    return previous(last) if is_complete(previous(last)) else None


def previous(path: Path) -> Path:
    """``last.dcp`` -> ``last.prev.dcp``: the checkpoint a save with ``keep_previous`` kept beside it."""
    return path.with_name(path.name.replace(SUFFIX, ".prev" + SUFFIX))


def problem(path: Path) -> Optional[str]:
    """What is wrong with the sharded checkpoint at ``path``, naming the file at fault: missing, unreadable, or
    shorter than its ``.metadata`` records (truncated); None when every file it needs is there whole. Reads only the
    ``.metadata`` file and the others' sizes."""
    path = Path(path)
    for name, what in ((".metadata", "DCP's index of the shards"), (TRAIN_STATE, "rank 0's step, RNG and config")):
        if not (path / name).is_file():
            return f"{path / name}: missing ({what})"
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as error:  # truncated, flipped bytes, not DCP's: its unpickling fails in many ways
        return f"{path / '.metadata'}: unreadable ({type(error).__name__}: {str(error).strip() or 'no message'})"
    needed: dict[str, int] = {}  # shard file -> the bytes its entries reach
    for entry in metadata.storage_data.values():
        needed[entry.relative_path] = max(needed.get(entry.relative_path, 0), entry.offset + entry.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            return f"{file}: missing (.metadata lists {counted(len(needed), 'shard file')} the saving ranks wrote)"
        try:
            with open(file, "rb"):
                pass
        except OSError as error:
            return f"{file}: unreadable ({error.strerror or error})"
        if file.stat().st_size < size:
            return f"{file}: truncated ({file.stat().st_size} bytes, where .metadata records {size})"
    return None


def others(path: Path) -> list[str]:
    """The names of the other checkpoints beside ``path`` in its run directory (``best.dcp``, ``last.prev.dcp``)."""
    return sorted(other.name for other in Path(path).parent.iterdir()
                  if other != Path(path) and (other.suffix == ".pt" and other.is_file() or is_complete(other)))


def check(path: Path) -> None:
    """Raise :func:`damaged`'s error for a sharded checkpoint :func:`problem` finds wrong."""
    found = problem(path)
    if found is not None:
        raise damaged(path, found)


def damaged(path: Path, found: str) -> CheckpointError:
    """The error for the sharded checkpoint at ``path``, which :func:`problem` found wrong (``found``): the file,
    what is wrong with it, and the run's other checkpoints to read instead."""
    names = others(path)
    instead = f"name another of the run's checkpoints ({', '.join(names)})" if names else ""
    return CheckpointError(f"{found}; restore the file from a copy of {Path(path).name}{instead and ', or '}{instead}")


def newer(single: Path, sharded: Optional[Path]) -> Optional[Path]:
    """Of a single-file checkpoint (when it is a file) and a complete sharded one (or None), the later one: of the
    larger step, or where a step cannot be read, the one written last; None when neither is there. A run resumed in
    its own directory under another strategy (FSDP after one process or DDP, or the reverse) leaves both formats,
    and the older one is stale. By step first: a copied run directory (``cp -r``) has every file's time the copy's,
    and resumed from the stale one (a step 59 ``last.dcp`` over a finished run's step 200 ``last.pt``)."""
    present = [path for path in (single if single.is_file() else None, sharded) if path is not None]
    if len(present) < 2:
        return present[0] if present else None
    steps = [saved_step(path) for path in present]
    if None in steps or steps[0] == steps[1]:  # a damaged one (its own fallback decides), or a tie
        return max(present, key=lambda path: path.stat().st_mtime_ns)
    return present[steps.index(max(steps))]


def saved_step(path: Path) -> Optional[int]:
    """The step a checkpoint (a file, or a sharded one's directory) was saved at, read without its tensors; None
    where it cannot be read."""
    try:
        return int(state_without_tensors(path)["step"])
    except Exception:  # damaged or not a checkpoint: the caller falls back to the files' times
        return None


def state_without_tensors(path: Path) -> dict[str, Any]:
    """A checkpoint's state (a file, or a sharded one's directory) for its step and config: a file memory-mapped, its
    tensors never copied in; a sharded one's small ``train_state.pt`` alone. Raises what reading it raises."""
    if Path(path).is_dir():
        return read_train_state(path)
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def latest(run_dir: Path, name: str) -> Optional[Path]:
    """``<run_dir>/<name>`` (``best.pt``) or its sharded counterpart (``best.dcp``), whichever was written last."""
    sharded = directory(run_dir, name)
    return newer(Path(run_dir) / name, sharded if is_complete(sharded) else None)


def latest_last(run_dir: Path) -> Optional[Path]:
    """The run directory's own ``last`` checkpoint, the one a resume continues from: ``last.pt`` or the sharded
    :func:`find` (``last.dcp``, or ``last.prev.dcp``), whichever was written last; None when there is neither."""
    return newer(Path(run_dir) / LAST, find(run_dir))


# ----------------------------------------------------------------------------------------------- key space


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_without_process_group() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no process group: here that is the intent."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled, unavailable or uninitialized", UserWarning)
        yield


@functools.lru_cache(maxsize=None)
def _expert_major_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ``(data, expert)`` mesh transposed to ``(expert, data)``, so ``[Shard(0), Shard(0)]`` splits a bank over
    the expert group first (outer) and over the replicas second, as expert parallelism and FSDP split it."""
    ranks = mesh.mesh.transpose(0, 1).contiguous()
    return DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("expert", "data"))


def _expert_layers(model: nn.Module) -> dict[str, parallel.ExpertParallel]:
    layers = parallel.expert_parallel_layers(model)
    return {f"{name}.{parallel.LOCAL_EXPERTS}.": layer for name, layer in layers.items()}


def _global_expert_shard(local: torch.Tensor, layer: parallel.ExpertParallel, mesh: DeviceMesh) -> DTensor:
    """This rank's piece of an expert shard (FSDP's DTensor over the replicas, or the plain shard) as a DTensor of
    the whole bank."""
    sharded_over_replicas = isinstance(local, DTensor)
    piece = local.to_local() if sharded_over_replicas else local
    shape = torch.Size([layer.num_experts, *local.shape[1:]])
    placements = [Shard(0), Shard(0) if sharded_over_replicas else Replicate()]
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(piece, _expert_major_mesh(mesh), placements, run_check=False, shape=shape, stride=stride)


def _rename(key: str, layers: Mapping[str, parallel.ExpertParallel]) -> tuple[str, Optional[parallel.ExpertParallel]]:
    for prefix, layer in layers.items():
        if prefix in key:
            return key.replace(prefix, prefix[: -len(parallel.LOCAL_EXPERTS) - 1]), layer
    return key, None


def global_state(model: nn.Module, template: tuple[dict, dict], mesh: Optional[DeviceMesh]) -> dict[str, Any]:
    """``template`` (``get_state_dict(model, optimizer)``) in the single-process key space (see the module's
    docstring): the same tensors (DCP loads into them in place), expert shards as views that are slices of their
    whole bank."""
    layers = _expert_layers(model)
    flat = {}
    for prefix, state in zip(("model.", "optim."), template):
        for key, value in state.items():
            name, layer = _rename(key, layers)
            if layer is not None and isinstance(value, torch.Tensor) and value.ndim > 0:
                value = _global_expert_shard(value, layer, mesh)
            flat[prefix + name] = value
    return flat


def _template(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> tuple[dict, dict]:
    if optimizer is None:  # the model alone (evaluating best.dcp)
        return get_model_state_dict(model, options=OPTIONS), {}
    return get_state_dict(model, optimizer, options=OPTIONS)


def _apply(
    model: nn.Module, optimizer: Optional[torch.optim.Optimizer], flat: Mapping[str, Any], template: tuple
) -> None:
    """``set_state_dict`` with the loaded ``flat`` values, named back to this layout's keys."""
    layers = _expert_layers(model)
    for prefix, state in zip(("model.", "optim."), template):
        for key, value in state.items():
            name, layer = _rename(key, layers)
            loaded = flat[prefix + name]
            if not (isinstance(loaded, DTensor) and layer is not None):  # an expert piece: loaded into ``value``
                state[key] = loaded
    if optimizer is None:
        set_model_state_dict(model, template[0], options=OPTIONS)
    else:
        set_state_dict(model, optimizer, model_state_dict=template[0], optim_state_dict=template[1], options=OPTIONS)


# ----------------------------------------------------------------------------------------------- save and load


def save(
    run_dir: Path, name: str, model: nn.Module, optimizer: torch.optim.Optimizer, mesh: Optional[DeviceMesh],
    train_state: Optional[dict[str, Any]], *, keep_previous: bool,
) -> Path:
    """Write a sharded checkpoint ``<run_dir>/<name>.dcp`` atomically; ``train_state`` is rank 0's (None elsewhere).
    ``keep_previous``: the one it replaces becomes ``<name>.prev.dcp``. Collective."""
    final = directory(run_dir, name)
    temporary = final.with_name(f".{final.name}.tmp")
    alone = not _distributed()  # no process group: one process
    main = alone or dist.get_rank() == 0
    if main:  # a save killed half way left this: start clean
        shutil.rmtree(temporary, ignore_errors=True)
        temporary.mkdir(parents=True)
    _barrier()
    with _quiet_without_process_group():
        dcp.save(global_state(model, _template(model, optimizer), mesh), checkpoint_id=temporary, no_dist=alone)
    if main:
        save_checkpoint(temporary / TRAIN_STATE, train_state)
        replaced = previous(final) if keep_previous else final.with_name(f".{final.name}.old")
        if final.exists():
            shutil.rmtree(replaced, ignore_errors=True)
            os.replace(final, replaced)
        os.replace(temporary, final)
        if not keep_previous:
            shutil.rmtree(replaced, ignore_errors=True)
        _fsync_directory(final.parent)
    _barrier()
    return final


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _fsync_directory(path: Path) -> None:
    handle = os.open(path, os.O_RDONLY)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def read_train_state(path: Path) -> dict[str, Any]:
    """The non-tensor state of a sharded checkpoint (step, schedule, RNG, config, W&B id): rank 0's, as saved."""
    if not (Path(path) / TRAIN_STATE).is_file():
        check(path)  # names the file that is missing
    return load_checkpoint(Path(path) / TRAIN_STATE)


def load(path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], mesh: Optional[DeviceMesh]) -> None:
    """Load a sharded checkpoint saved on any number of ranks into this rank's part of ``model`` and ``optimizer``
    (FSDP, expert parallel, both, or one process). Collective when distributed: each rank reads only its pieces."""
    template = _template(model, optimizer)
    flat = global_state(model, template, mesh)
    with _quiet_without_process_group():
        dcp.load(flat, checkpoint_id=Path(path), no_dist=not _distributed())
    _apply(model, optimizer, flat, template)


def load_full(
    model: nn.Module, optimizer: Optional[torch.optim.Optimizer], mesh: Optional[DeviceMesh],
    model_state: Mapping[str, torch.Tensor], optimizer_state: Optional[Mapping[str, Any]],
) -> None:
    """Load a single-file checkpoint's whole state (``last.pt``: single-process names, the optimizer's state by
    parameter index) into a sharded ``model``: each rank copies its slices. For resuming a one-process run on W."""
    template = _template(model, optimizer)
    flat = global_state(model, template, mesh)
    whole = {f"model.{key}": value for key, value in model_state.items()}
    if optimizer is not None:
        whole.update(_named_optimizer_state(model, optimizer, optimizer_state))
    for key, value in flat.items():
        if key not in whole:
            raise CheckpointError(f"the checkpoint has no {key!r}")
        if isinstance(value, torch.Tensor):
            copy_piece(value, whole[key])
        else:
            flat[key] = whole[key]
    _apply(model, optimizer, flat, template)


@torch.no_grad()
def copy_piece(piece: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy into ``piece`` its part of ``whole`` (a tensor of the single-process shape, on any device): ``piece`` is
    this rank's piece as :func:`global_state` names it, a DTensor of the whole tensor, or the whole tensor itself."""
    if isinstance(piece, DTensor):
        shape, offset = compute_local_shape_and_global_offset(piece.shape, piece.device_mesh, piece.placements)
        piece.to_local().copy_(whole[tuple(slice(o, o + s) for o, s in zip(offset, shape))])
    else:
        piece.copy_(whole)


def _named_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> dict:
    """An ``optimizer.state_dict()`` (by parameter index) in the flattened single-process key space."""
    names = {id(p): _rename(name, _expert_layers(model))[0] for name, p in model.named_parameters()}
    flat = {}
    for saved_group, group in zip(state["param_groups"], optimizer.param_groups):
        for position, param in zip(saved_group["params"], group["params"]):
            name = names[id(param)]
            for key, value in state["state"].get(position, {}).items():
                flat[f"optim.state.{name}.{key}"] = value
            for key, value in saved_group.items():
                if key != "params":
                    flat[f"optim.param_groups.{name}.{key}"] = value
    return flat


def read_model(path: Path) -> dict[str, torch.Tensor]:
    """The whole model's single-process state dict from a sharded checkpoint, on this process's CPU (no process
    group needed): for evaluation, upcycling and export, where the model fits one host."""
    check(path)
    metadata = dcp.FileSystemReader(str(path)).read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and hasattr(meta, "size")
    }
    with _quiet_without_process_group():
        dcp.load(state, checkpoint_id=Path(path), no_dist=True)
    return {key[len("model.") :]: value for key, value in state.items()}


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as a single-file checkpoint's dict: its train state and the whole model (no optimizer),
    on the CPU. For evaluation and export."""
    return {**read_train_state(path), "model": read_model(path)}


def resume_checkpoint(path: Path) -> dict[str, Any]:
    """A sharded checkpoint as the loop resumes it: the train state, with the directory in place of the model and
    optimizer states, which each rank then reads its pieces of (``Distributed.load_state``)."""
    check(path)
    return {**read_train_state(path), "model": str(path), "optimizer": str(path)}
