"""The machine and the process around the measurements: CPU and its flags, glibc's allocator, memory probes."""

from __future__ import annotations

import gc
import os
import platform
import re
import time
from typing import Callable, Dict, Optional, Sequence

import torch

from ..runtime import (GLIBC_DEFAULTS, M_MMAP_MAX, M_MMAP_THRESHOLD, TUNED, cpu_flags, cpu_has_native_bf16,
                       glibc_library, set_malloc_options)

GIB = 2**30
ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE",
            "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
# the flags that decide which kernels run: vector width, bf16/fp16 dot products, AMX
REPORTED_CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
                      "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "asimd", "bf16", "sve", "sve2")


def machine_info(device: torch.device) -> dict:
    import timm

    cpu, family_model = platform.processor() or platform.machine(), None
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        cpu = re.search(r"model name\s*:\s*(.*)", text).group(1).strip()
        family_model = "family {} model {}".format(re.search(r"cpu family\s*:\s*(\d+)", text).group(1),
                                                   re.search(r"model\s*:\s*(\d+)", text).group(1))
    except (OSError, AttributeError):
        pass
    flags = cpu_flags()
    info = {
        "device": str(device), "cpu": cpu, "cpu_family_model": family_model,
        "cpu_flags": [flag for flag in REPORTED_CPU_FLAGS if flag in flags],
        "cpu_native_bf16": cpu_has_native_bf16(),
        "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {key: os.environ[key] for key in ENV_KEYS if key in os.environ},
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ------------------------------------------------------------------------------------------ allocator

ALLOCATORS = ("default_env", "env_variables", "glibc_defaults")


def kernel_and_host_counters() -> tuple:
    """This process's minor page faults and system CPU seconds so far, and the seconds the hypervisor has kept this
    machine's CPUs from running since boot (``steal`` in /proc/stat, all CPUs); zeros where the platform lacks them.
    A round that touches memory the kernel must map afresh pays in the first two (about 10 us a fault on this
    project's 2-core AMD EPYC Zen 4 VM), a round that waited for a host shared with other machines in the third:
    wall-clock and CPU time alone cannot tell either from a slower kernel."""
    faults, system = 0, 0.0
    try:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        faults, system = usage.ru_minflt, usage.ru_stime
    except ImportError:  # Windows
        pass
    return faults, system, _steal_seconds()


def _steal_seconds() -> float:
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def allocator_available(device: torch.device) -> bool:
    return device.type == "cpu" and glibc_library() is not None


def with_allocator(fn: Callable[[], object], allocator: str) -> Callable[[], object]:
    """``fn`` run under one of glibc's settings, side by side with the others in the same process:

    * ``default_env``: as the process runs without environment variables; the commands call
      ``softmoe.tune_allocator()`` at start-up, so these are its settings;
    * ``env_variables``: what ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` set, applied for
      the call through ``mallopt`` (the same two settings, so any difference from ``default_env`` is noise);
    * ``glibc_defaults``: glibc's own settings for large allocations once its dynamic mmap threshold has
      settled (what a process got before ``tune_allocator``): every allocation above 32 MiB is a fresh
      mapping. The heap's free memory is returned first (else glibc would serve the large allocations
      from it), and after the timed call one untimed call under the tuned settings grows the heap back,
      so that the next case does not pay for it. The case reports the timed call as its ``"call"`` and
      ``"cpu_call"`` phases.
    """
    if allocator == "default_env":
        return fn
    if allocator == "env_variables":
        def tuned_call():
            set_malloc_options(TUNED)
            return fn()

        return tuned_call

    def glibc_call():
        release_freed_memory()
        set_malloc_options(GLIBC_DEFAULTS)
        try:
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
        finally:
            set_malloc_options(TUNED)
        fn()  # untimed: the heap grows back under the tuned settings
        return {"call": seconds, "cpu_call": cpu_seconds}

    return glibc_call


def release_freed_memory() -> None:
    """Return the heap's free memory to the system (``malloc_trim``); tune_allocator otherwise keeps it."""
    gc.collect()
    libc = glibc_library()
    if libc is not None:
        libc.malloc_trim(0)


# ------------------------------------------------------------------------------------- memory probes


class _HostMemory:
    """Peak resident memory of this process (Linux): VmHWM after resetting it through /proc/self/clear_refs.

    glibc is told to serve every allocation of 64 KiB or more with its own mapping, so a freed tensor
    leaves the resident set at once and a new one enters it; this slows allocation, so memory is
    measured after all timings.
    """

    def __init__(self) -> None:
        self.libc = glibc_library()
        if self.libc is None:
            raise OSError("glibc is not this process's allocator")
        # undo tune_allocator / MALLOC_MMAP_MAX_=0: every allocation of 64 KiB or more its own mapping
        set_malloc_options({M_MMAP_MAX: 1 << 24, M_MMAP_THRESHOLD: 64 * 1024})
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            return int(re.search(rf"{key}:\s+(\d+) kB", f.read()).group(1)) * 1024

    def start(self) -> int:
        gc.collect()
        self.libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return self._status("VmRSS")

    def peak(self) -> int:
        return self._status("VmHWM")


_host_memory: Optional[_HostMemory] = None
_host_memory_error: Optional[str] = None


def _get_host_memory() -> Optional[_HostMemory]:
    global _host_memory, _host_memory_error
    if _host_memory is None and _host_memory_error is None:
        try:
            _host_memory = _HostMemory()
        except (OSError, AttributeError) as error:
            _host_memory_error = str(error)
    return _host_memory


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    if _get_host_memory() is None:
        return f"unavailable ({_host_memory_error})"
    return "peak RSS (VmHWM after clear_refs=5), glibc mmap threshold 64 KiB, malloc_trim before each probe"


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    if device.type != "cpu":
        return None
    host = _get_host_memory()
    if host is None:
        return None
    before = host.start()
    fn()
    return host.peak() - before


def saved_activation_bytes(forward: Callable[[], torch.Tensor], parameters: Sequence[torch.Tensor]) -> int:
    """Bytes of the distinct non-parameter storages autograd saves for backward during ``forward``."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in parameters}
    saved: Dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameter_storages:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = forward()
    del output
    return sum(saved.values())


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)
