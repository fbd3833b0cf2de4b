"""What the process around the layer should be set to for speed on CPU: the allocator, and whether bf16 pays.

    import softmoe
    softmoe.tune_allocator()   # optional: a Soft MoE layer calls it itself before its first CPU backward


**The allocator.** glibc serves every allocation above 32 MiB with a fresh ``mmap`` and returns it to the
system when it is freed. A Soft MoE layer's expert weight gradients are such allocations (302 MB each for
ViT-S/16 with 128 experts), made afresh by every backward pass, so every step page-faults them in again:
on the machines measured that cost more time than computing them (experiments/throughput/README.md).
:func:`tune_allocator` makes glibc keep freed memory for reuse, which is what the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` do, without the variables. The price: memory
freed by the process stays in it (its resident set does not shrink after a peak).

A user who never calls it gets it anyway: the first forward pass of a Soft MoE layer on a CPU with gradients
enabled (a training step, whose backward allocates the weight gradients) calls :func:`tune_allocator_once`.
To keep glibc's own settings, set ``SOFTMOE_TUNE_ALLOCATOR=0`` in the environment or call
``softmoe.runtime.set_auto_tune_allocator(False)`` before the first step. Inference never changes them.

**bf16.** A CPU multiplies bf16 matrices faster than float32 ones only with native bf16 instructions
(``avx512_bf16``, AMX, Arm's ``bf16``); without them bf16 is emulated and many times slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
MALLOPT_NAMES = {M_TRIM_THRESHOLD: "M_TRIM_THRESHOLD", M_MMAP_THRESHOLD: "M_MMAP_THRESHOLD", M_MMAP_MAX: "M_MMAP_MAX"}
C_INT_MIN, C_INT_MAX = -(2**31), 2**31 - 1  # mallopt's value is an int

# What MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 set: no mmap'd chunks, never trim the heap.
# mallopt takes a C int, so the variable's 1e11 cannot be passed (ctypes would mask it to 1,215,752,192: a heap
# whose top had more than 1.16 GB free was trimmed, and S/16's 1.4 GB of expert weight gradients were mapped and
# page-faulted afresh every step in about a third of the runs); -1 is mallopt(3)'s "never trim".
TUNED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1}
# glibc's own behaviour for large allocations once its dynamic threshold has settled at its maximum
# (32 MiB on 64-bit): every allocation above it is a fresh mapping, unmapped when freed.
GLIBC_DEFAULTS = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 * 2**20}

NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 (Cooper Lake, Zen 4+), AMX, aarch64


def glibc_library() -> Optional[ctypes.CDLL]:
    """The C library through ctypes where it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 -- musl and others lack it
        return libc
    except (OSError, AttributeError):
        return None


def set_malloc_options(options: dict) -> bool:
    """Apply ``{mallopt parameter: value}`` to glibc; False (nothing done) where glibc is not the allocator."""
    for parameter, value in options.items():
        if not isinstance(value, int) or not C_INT_MIN <= value <= C_INT_MAX:  # ctypes would mask it silently
            name = MALLOPT_NAMES.get(parameter, f"parameter {parameter}")
            raise ValueError(f"mallopt {name}: value {value!r} is not a C int ({C_INT_MIN}..{C_INT_MAX}); "
                             "for M_TRIM_THRESHOLD, -1 means never trim")
    libc = glibc_library()
    if libc is None:
        return False
    return all(libc.mallopt(parameter, value) == 1 for parameter, value in options.items())


def tune_allocator() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it, so large tensors allocated anew
    every step (the expert banks' weight gradients) do not page-fault every step. Returns True when
    applied, False where the C library is not glibc (macOS, musl, Windows), where there is nothing to do."""
    return set_malloc_options(TUNED)


AUTO_TUNE_ENV = "SOFTMOE_TUNE_ALLOCATOR"  # "0": the layers leave the allocator as it is
_auto_tune = {"enabled": True, "done": False}


def set_auto_tune_allocator(enabled: bool) -> None:
    """Whether the Soft MoE layers may call :func:`tune_allocator` before their first CPU backward (default
    True; ``SOFTMOE_TUNE_ALLOCATOR=0`` in the environment also switches it off)."""
    _auto_tune["enabled"] = bool(enabled)


def auto_tune_pending() -> bool:
    """True until the layers have made their one attempt (cheap: read on every training forward on CPU)."""
    return not _auto_tune["done"]


def tune_allocator_once() -> bool:
    """:func:`tune_allocator`, the first time only, unless switched off (:func:`set_auto_tune_allocator`,
    ``SOFTMOE_TUNE_ALLOCATOR=0``). Returns whether this call tuned the allocator."""
    if _auto_tune["done"]:
        return False
    _auto_tune["done"] = True
    if not _auto_tune["enabled"] or os.environ.get(AUTO_TUNE_ENV, "1").strip().lower() in ("0", "false", "no"):
        return False
    return tune_allocator()


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (Linux); empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):  # x86, aarch64
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native_bf16() -> Optional[bool]:
    """Whether this CPU multiplies bf16 natively; None when its flags cannot be read (not Linux)."""
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        return None  # Apple's CPUs: no flags to read; Apple GPUs run through the MPS device instead
    flags = cpu_flags()
    if not flags:
        return None
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)
