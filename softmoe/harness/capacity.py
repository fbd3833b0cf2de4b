"""Sizes no process can hold, refused before anything is built.

Values that passed every key's rule and then failed deep inside torch, or took the machine down:

- ``model.depth=1000000000000``: a MemoryError while listing the MoE blocks; ``model.embed_dim=1000000000000`` or
  ``model.mlp_ratio=1e30``: the allocator's traceback ("you tried to allocate 16000000000000 bytes").
- ``trainer.num_threads=1000000000000``: "Overflow when unpacking long"; at 20,000 libgomp aborts the process
  ("Thread creation failed").
- ``trainer.num_workers=1000``: a thousand DataLoader processes of about 50 MB each, forked until the kernel's
  OOM killer ended them, and other processes of the machine with them.

Each check sets a lower bound of what the config needs beside an upper bound of what one process may have, so it
refuses only configs that cannot run well anywhere they are launched to: this machine's CPUs and physical memory,
or, for ``launcher=slurm`` (checked on the login node, run on another), the job's ``launcher.cpus_per_task`` and
``launcher.mem_gb``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from .errors import ConfigError
from .rules import counted, format_value

GIB, TIB = 2**30, 2**40
# Python objects of one timm Block, before any parameter storage: 31 KiB measured for a dense block built on the
# CPU, 48-58 KiB on the meta device or with an MoE layer (torch 2.14.1, timm 1.0.31); every rank builds every block.
BLOCK_OBJECT_BYTES = 24 * 2**10
# DataLoader workers beyond one per CPU only take turns on the cores; a few per CPU can still hide slow reads
# (images decoded from a network disk), and trainer=gpu's 8 must run on a host that lends one CPU, so the limit
# leaves that room and stops only a fork bomb.
WORKERS_PER_CPU = 8
# Where the machine is not known (``python -m softmoe.plan``, a run planned for elsewhere): more than one node holds.
UNKNOWN_MEMORY = 2 * TIB
# The largest Soft MoE of the paper (Soft MoE-H/14: 32 blocks of width 1280, MLPs of 4x, 128 experts): the
# yardstick that names the key a refused model is furthest beyond.
PAPER_LARGEST = {"model.depth": 32, "model.embed_dim": 1280, "model.mlp_ratio": 4.0, "moe.num_experts": 128}


@dataclass(frozen=True)
class Capacity:
    """What one process of the run may have: ``cpus`` (None: not known here) and ``memory`` bytes, each with the
    words that say where the figure comes from."""

    cpus: Optional[int]
    cpus_source: str
    memory: int
    memory_source: str


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: a SLURM task's, a container's cpuset), not the machine's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def format_bytes(size: float) -> str:
    return f"{size / GIB:.1f} GiB" if size < TIB else f"{size / TIB:,.3g} TiB"


def run_capacity(config: Mapping[str, Any], on_this_machine: bool = True) -> Capacity:
    """Where the run's processes will run: a SLURM job's share (its ``launcher`` keys), else this machine (or,
    with ``on_this_machine=False``, an unknown one)."""
    launcher = config.get("launcher") if isinstance(config.get("launcher"), dict) else {}
    if launcher.get("name") == "slurm":
        cpus, memory_gb = launcher.get("cpus_per_task"), launcher.get("mem_gb")
        return Capacity(
            cpus, f"the launcher.cpus_per_task={cpus} of each SLURM task",
            memory_gb * GIB if memory_gb else UNKNOWN_MEMORY,
            f"the launcher.mem_gb={memory_gb} of each SLURM node" if memory_gb else "what one node holds",
        )
    if not on_this_machine:
        return Capacity(None, "", UNKNOWN_MEMORY, f"the {format_bytes(UNKNOWN_MEMORY)} of memory one node holds")
    cpus, memory = usable_cpus(), physical_memory()
    return Capacity(cpus, f"the {counted(cpus, 'CPU')} this process may use", memory,
                    f"this machine's {format_bytes(memory)} of memory")


def check_cpu_counts(trainer: Mapping[str, Any], capacity: Capacity) -> None:
    """``trainer.num_threads`` at most the CPUs, ``trainer.num_workers`` at most :data:`WORKERS_PER_CPU` per CPU."""
    cpus = capacity.cpus
    if cpus is None:
        return
    threads = trainer["num_threads"]
    if threads is not None and threads > cpus:
        raise ConfigError(
            f"trainer.num_threads={threads}: more than {capacity.cpus_source}; threads beyond the cores take turns "
            f"on them, each step slower (and thousands abort the process); use at most {cpus}, or null for torch's "
            "default"
        )
    workers = trainer["num_workers"]
    if workers > WORKERS_PER_CPU * cpus:
        raise ConfigError(
            f"trainer.num_workers={workers}: more than {WORKERS_PER_CPU} DataLoader worker processes per CPU "
            f"({capacity.cpus_source}); each is a process of its own (about 50 MB), and they take turns on the cores; "
            f"use at most {WORKERS_PER_CPU * cpus} (one per CPU, {cpus}, keeps them busy)"
        )


def check_blocks_fit(model: Mapping[str, Any], capacity: Capacity) -> None:
    """Every rank builds every block as Python objects (the meta device too): ``model.depth`` of them must fit."""
    need = model["depth"] * BLOCK_OBJECT_BYTES
    if need > capacity.memory:
        raise ConfigError(
            f"model.depth={model['depth']}: {model['depth']:,} blocks need at least {format_bytes(need)} for their "
            f"Python objects alone (more than {BLOCK_OBJECT_BYTES // 2**10} KiB each, built on every rank), more than "
            f"{capacity.memory_source}; use a smaller model.depth (the paper's largest ViT has 32 blocks)"
        )


def parameters_lower_bound(model: Mapping[str, Any], moe: Mapping[str, Any], moe_block_count: int) -> int:
    """At least this many parameters: each block's attention projections (4 d²) and MLP (2 d h), and in each MoE
    block the other experts' MLPs; norms, biases, embeddings, the head and the routers left out."""
    width, hidden = model["embed_dim"], int(model["embed_dim"] * model["mlp_ratio"])
    block = 4 * width * width + 2 * width * hidden
    return model["depth"] * block + moe_block_count * (moe["num_experts"] - 1) * 2 * width * hidden


def check_parameters_fit(config: Mapping[str, Any], moe_block_count: int, capacity: Capacity) -> None:
    """The model's float32 parameters must fit one process: whole where ``trainer.init_device=cpu`` builds it on
    every rank; a rank's share with ``trainer.init_device=meta`` (at best 1/world size of it, on the host or a GPU
    of this machine; a SLURM job's GPUs are not known on the login node, so that case is left to the job)."""
    model, moe, trainer = config["model"], config["moe"], config["trainer"]
    count = parameters_lower_bound(model, moe, moe_block_count)
    need, memory, memory_source = 4 * count, capacity.memory, capacity.memory_source
    if trainer.get("init_device") == "meta":
        if (config.get("launcher") or {}).get("name") == "slurm":
            return
        # the ranks the model is shared over: python -m softmoe.plan's world_size, else torchrun's
        need //= int(config.get("world_size") or os.environ.get("WORLD_SIZE", "1"))
        if torch.cuda.is_available():
            gpu = max(torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count()))
            if gpu > memory:
                memory, memory_source = gpu, f"the {format_bytes(gpu)} of this machine's largest GPU"
    if need <= memory:
        return
    sizes = {f"model.{key}": model[key] for key in ("depth", "embed_dim", "mlp_ratio")}
    if moe_block_count:
        sizes["moe.num_experts"] = moe["num_experts"]
    lead = max(sizes, key=lambda key: sizes[key] / PAPER_LARGEST[key])
    others = [f"{key}={format_value(value)}" for key, value in sizes.items() if key != lead]
    others = ", ".join(others[:-1]) + f" and {others[-1]}"
    sharded = trainer.get("init_device") == "meta"
    share = "on each rank" if sharded else "built whole on every rank"
    # with trainer.init_device=meta each rank holds its share only (docs/scale_out.md)
    instead = "" if sharded else ", or build it in shares over the ranks (trainer.init_device=meta)"
    raise ConfigError(
        f"{lead}={format_value(sizes[lead])}: with {others}, the model has at least {count:.3g} parameters, "
        f"{format_bytes(need)} in float32 {share}, more than {memory_source}; use a smaller {lead}{instead} (the "
        f"paper's largest Soft MoE, H/14 with 128 experts, has 2.7e+10 parameters)"
    )
