r"""Speed and memory of the Soft MoE layer and model, each measured against what it should cost (issue 5).

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 OMP_WAIT_POLICY=PASSIVE \
        python -m softmoe.benchmark --profile --out experiments/throughput/results.json   # the recorded run
    python -m softmoe.benchmark --tiny --out /tmp/benchmark.json   # seconds: proves the command works

(On CPU the environment matters as much as the code: experiments/throughput/README.md explains the
variables above, and ``machine.env`` in the JSON records them.)

In one run, on one machine, it measures:

* ``ceilings``: the machine's own float32 GEMM rate and copy bandwidth, and the rate of a bare batched
  GEMM at the experts' shape (batch x slots_per_expert rows per expert, and 2x, 4x that);
* ``layer``: the Soft MoE layer's forward and forward+backward, against the same layer written the
  seed repository's way (a Python loop over an ``nn.ModuleList`` of timm ``Mlp`` experts), against
  its floor, max(FLOPs / GEMM rate, bytes / bandwidth) (float32 ceilings, whatever the compute dtype),
  and against what its own kernels attain (expert FLOPs at the expert GEMM's rate, the rest at the
  GEMM rate);
* ``layer_memory``: peak memory of forward+backward against params + grads + saved activations;
* ``model``: Soft MoE ViT against the dense timm ViT of the same width and depth: inference,
  forward+backward and a full AdamW training step, as ratios, with the optimizer's share;
* ``compile``: eager against ``torch.compile`` (``--compile``; compiling is slow on CPU);
* ``profile``: torch.profiler's kernel table of the layer's forward+backward (``--profile``);
* ``model_profile``: where each model's inference time goes, with each part's FLOPs and rate: the MLPs
  that Soft MoE replaces against its experts and its routing, and the rest (``--profile-model``).

Every time is the median over rounds. A round runs every case of a comparison once, in an order that
rotates from round to round, and ratios are medians of per-round ratios, so cases compared with each
other share whatever else the machine is doing. The ceilings are measured inside the same rounds.
On CUDA the same command reports images/s and the fraction of the measured matmul rate reached.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import re
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layer import SoftMoE, l2_normalize
from .vit import SoftMoEVisionTransformer

GIB = 2**30
ENV_KEYS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS", "THP_MEM_ALLOC_ENABLE",
            "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ---------------------------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class LayerShape:
    """One Soft MoE layer: [batch, tokens, dim] routed to num_experts x slots_per_expert MLPs dim->hidden->dim."""

    name: str
    batch: int
    tokens: int
    dim: int
    hidden: int
    num_experts: int
    slots_per_expert: int

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def flops(self, backward: bool) -> int:
        """Multiply-adds x 2 of the logits, dispatch, experts and combine products; backward doubles each."""
        b, m, d, s = self.batch, self.tokens, self.dim, self.num_slots
        routing = 3 * 2 * b * m * s * d  # logits X·Φ, slots Dᵀ X, outputs C Ỹ
        return (3 if backward else 1) * routing + self.expert_flops(backward)

    def expert_flops(self, backward: bool) -> int:
        """The experts' share: each of num_experts MLPs on batch x slots_per_expert rows."""
        forward = 2 * self.batch * self.num_slots * 2 * self.dim * self.hidden
        return 3 * forward if backward else forward

    def bytes_moved(self, backward: bool, element_size: int = 4) -> int:
        """Bytes that must cross the memory bus: expert weights read (twice with backward) and their
        gradients written, tokens in and out (and their gradients)."""
        n, d, h = self.num_experts, self.dim, self.hidden
        weights = element_size * n * (d * h + h + h * d + d)
        tokens = element_size * self.batch * self.tokens * 2 * d
        return 3 * weights + 2 * tokens if backward else weights + tokens

    def required_saved_bytes(self, element_size: int = 4) -> int:
        """Activations backward needs: X, D, C, X̃, the experts' pre- and post-activation hidden, Ỹ."""
        b, m, d, h, s = self.batch, self.tokens, self.dim, self.hidden, self.num_slots
        return element_size * (b * m * d + 2 * b * m * s + b * s * d + 2 * b * s * h + b * s * d)


LAYER_SHAPES = {
    "vit_s16": LayerShape("vit_s16", batch=32, tokens=197, dim=384, hidden=1536, num_experts=128, slots_per_expert=1),
    # the same layer at 4x the batch: 128 rows per expert matrix instead of 32
    "vit_s16_b128": LayerShape("vit_s16_b128", batch=128, tokens=197, dim=384, hidden=1536, num_experts=128,
                               slots_per_expert=1),
    "cpu_small": LayerShape("cpu_small", batch=16, tokens=65, dim=192, hidden=768, num_experts=64, slots_per_expert=1),
    "tiny": LayerShape("tiny", batch=2, tokens=9, dim=16, hidden=32, num_experts=4, slots_per_expert=2),
}


@dataclass(frozen=True)
class ModelShape:
    """A ViT and its Soft MoE twin: same width, depth and heads; MoE MLPs in blocks moe_layer_index..depth-1."""

    name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    num_experts: int
    slots_per_expert: int
    moe_layer_index: int

    def vit_kwargs(self) -> dict:
        return dict(img_size=self.img_size, patch_size=self.patch_size, embed_dim=self.embed_dim,
                    depth=self.depth, num_heads=self.num_heads)


MODEL_SHAPES = {
    # timm's vit_small_patch16_224 and the paper's Soft MoE S/16: 128 experts in the last 6 blocks.
    "vit_s16": ModelShape("vit_s16", 224, 16, 384, 12, 6, num_experts=128, slots_per_expert=1, moe_layer_index=6),
    "tiny": ModelShape("tiny", 32, 16, 32, 2, 2, num_experts=4, slots_per_expert=1, moe_layer_index=1),
}


# ------------------------------------------------------------------------------------ the seed's layer


class SeedLoopSoftMoE(nn.Module):
    """The Soft MoE layer written as the seed repository wrote it: einsums over [b, m, n, p] routing
    weights and a Python loop over an ``nn.ModuleList`` of timm ``Mlp`` experts.

    It computes the same function as :class:`SoftMoE` (the seed fed L2-normalised tokens to its
    experts; here they get the raw tokens), so the benchmark compares structure, not arithmetic.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, slots_per_expert: int) -> None:
        super().__init__()
        from timm.layers import Mlp

        self.phi = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(1))
        self.experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(num_experts))

    @classmethod
    def from_soft_moe(cls, layer: SoftMoE) -> "SeedLoopSoftMoE":
        """The seed-style twin of a normalised ``SoftMoE`` with ``BatchedMlp`` experts, holding the same weights."""
        experts = layer.experts
        seed = cls(layer.dim, experts.hidden_features, layer.num_experts, layer.slots_per_expert)
        seed.to(device=layer.phi.device, dtype=layer.phi.dtype)
        with torch.no_grad():
            seed.phi.copy_(layer.phi)
            seed.scale.copy_(layer.scale)
            for i, mlp in enumerate(seed.experts):
                mlp.fc1.weight.copy_(experts.fc1_weight[i].t())
                mlp.fc1.bias.copy_(experts.fc1_bias[i])
                mlp.fc2.weight.copy_(experts.fc2_weight[i].t())
                mlp.fc2.bias.copy_(experts.fc2_bias[i])
        return seed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.scale * l2_normalize(self.phi, dim=0)
        logits = torch.einsum("bmd,dnp->bmnp", l2_normalize(x, dim=-1), phi)
        dispatch = torch.softmax(logits, dim=1)
        combine = torch.softmax(logits.flatten(start_dim=2), dim=-1).view_as(logits)
        slots = torch.einsum("bmd,bmnp->bnpd", x, dispatch)
        outputs = torch.stack([expert(slots[:, i, :, :]) for i, expert in enumerate(self.experts)], dim=1)
        return torch.einsum("bnpd,bmnp->bmd", outputs, combine)


# ---------------------------------------------------------------------------------------------- timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(cases: Dict[str, Callable[[], Optional[dict]]], rounds: int, warmup: int,
                device: torch.device) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per call of every case, round-robin: round r starts at case r, so no case always runs
    first or right after the same neighbour. ``"total"`` is wall-clock time, ``"cpu"`` the CPU time of
    all this process's threads (on a shared machine it counts the work done, not the waiting for a
    core). A case may return {phase: seconds} to split its time."""
    names = list(cases)
    times: Dict[str, Dict[str, List[float]]] = {name: {"total": [], "cpu": []} for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            phases = cases[name]()
            _synchronize(device)
            if r < warmup:
                continue
            times[name]["total"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - start_cpu)
            for phase, seconds in (phases or {}).items():
                times[name].setdefault(phase, []).append(seconds)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator/denominator measured in the same round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def ceiling_cases(device: torch.device, gemm_size: int, copy_mib: int):
    """The GEMM-rate and bandwidth probes, and the function turning their times into rates."""
    a = torch.randn(gemm_size, gemm_size, device=device)
    b = torch.randn(gemm_size, gemm_size, device=device)
    product = torch.empty(gemm_size, gemm_size, device=device)
    source = torch.randn(copy_mib * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # touch every page before timing

    def gemm():
        torch.mm(a, b, out=product)

    def copy():
        target.copy_(source)

    cases = {"gemm": gemm, "copy": copy}

    def rates(times) -> dict:
        gemm_seconds = times["gemm"]["total"]
        copy_seconds = times["copy"]["total"]
        return {
            "gemm_size": gemm_size,
            "gemm_flops_per_s": 2 * gemm_size**3 / median(gemm_seconds),
            "copy_bytes": 2 * source.numel() * 4,
            "copy_bytes_per_s": 2 * source.numel() * 4 / median(copy_seconds),
            "gemm_seconds": gemm_seconds,
            "copy_seconds": copy_seconds,
        }

    return cases, rates


def expert_gemm_case(shape: LayerShape, device, rows: int, dtype: torch.dtype = torch.float32):
    """One bare batched GEMM like the experts' first layer: num_experts x [rows, dim] @ [dim, hidden].

    With rows = batch x slots_per_expert it is what the layer runs; more rows show what a larger
    batch would buy: GEMMs with few rows per weight matrix reach a smaller share of the GEMM rate."""
    x = torch.randn(shape.num_experts, rows, shape.dim, device=device, dtype=dtype)
    weight = torch.randn(shape.num_experts, shape.dim, shape.hidden, device=device, dtype=dtype)
    out = torch.empty(shape.num_experts, rows, shape.hidden, device=device, dtype=dtype)

    def expert_gemm():
        torch.bmm(x, weight, out=out)

    return expert_gemm, 2 * shape.num_experts * rows * shape.dim * shape.hidden


# ------------------------------------------------------------------------------------- memory probes


class _HostMemory:
    """Peak resident memory of this process (Linux): VmHWM after resetting it through /proc/self/clear_refs.

    glibc is told to serve every allocation of 64 KiB or more with its own mapping, so a freed tensor
    leaves the resident set at once and a new one enters it; this slows allocation, so memory is
    measured after all timings.
    """

    M_MMAP_THRESHOLD, M_MMAP_MAX = -3, -4

    def __init__(self) -> None:
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallopt(self.M_MMAP_MAX, 1 << 24)  # undo MALLOC_MMAP_MAX_=0 if the run set it
        self.libc.mallopt(self.M_MMAP_THRESHOLD, 64 * 1024)
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


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated"
    if _get_host_memory() is None:
        return f"unavailable ({_host_memory_error})"
    return "peak RSS (VmHWM after clear_refs=5), glibc mmap threshold 64 KiB, malloc_trim before each probe"


def _get_host_memory() -> Optional[_HostMemory]:
    global _host_memory, _host_memory_error
    if _host_memory is None and _host_memory_error is None:
        try:
            _host_memory = _HostMemory()
        except (OSError, AttributeError) as error:
            _host_memory_error = str(error)
    return _host_memory


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak bytes allocated while ``fn`` runs, above what was allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
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


# ------------------------------------------------------------------------------------------------ layer


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_layer(shape: LayerShape, device) -> SoftMoE:
    return SoftMoE(shape.dim, shape.hidden, num_experts=shape.num_experts,
                   slots_per_expert=shape.slots_per_expert, device=device)


def build_layers(shape: LayerShape, device) -> Dict[str, nn.Module]:
    layer = build_layer(shape, device)
    return {"soft_moe": layer, "seed_loop": SeedLoopSoftMoE.from_soft_moe(layer)}


def layer_pass_cases(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype, device):
    """Forward (no grad) and forward+backward of ``layer``; gradients are set to None first, as
    ``optimizer.zero_grad()`` does."""

    def forward():
        with torch.no_grad(), _autocast(device, dtype):
            layer(x)

    def forward_backward():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with _autocast(device, dtype):
            y = layer(x)
        y.backward(grad if y.dtype == grad.dtype else grad.to(y.dtype))

    return {"forward": forward, "forward_backward": forward_backward}


def benchmark_layer(shape: LayerShape, dtype: torch.dtype, args, device) -> List[dict]:
    """Soft MoE vs the seed-style loop vs the floor, for one shape and compute dtype."""
    torch.manual_seed(0)
    layers = build_layers(shape, device)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, requires_grad=True)
    grad = torch.randn(shape.batch, shape.tokens, shape.dim, device=device)
    cases, rates_of = ceiling_cases(device, args.gemm_size, args.copy_mib)
    rows = shape.batch * shape.slots_per_expert
    expert_gemm_flops = {}
    for factor in (1, 2, 4) if dtype == torch.float32 else (1,):
        cases[f"expert_gemm_x{factor}"], expert_gemm_flops[factor * rows] = expert_gemm_case(
            shape, device, factor * rows, dtype)
    for impl, layer in layers.items():
        for pass_name, fn in layer_pass_cases(layer, x, grad, dtype, device).items():
            cases[f"{impl}/{pass_name}"] = fn
    times = interleaved(cases, args.layer_rounds, args.warmup, device)
    ceilings = rates_of(times)
    ceilings["expert_gemm_flops_per_s_by_rows"] = {
        r: flops / median(times[f"expert_gemm_x{r // rows}"]["total"]) for r, flops in expert_gemm_flops.items()}
    ceilings["expert_gemm_flops_per_s"] = ceilings["expert_gemm_flops_per_s_by_rows"][rows]

    rows = []
    for pass_name in ("forward", "forward_backward"):
        backward = pass_name == "forward_backward"
        soft, loop = times[f"soft_moe/{pass_name}"]["total"], times[f"seed_loop/{pass_name}"]["total"]
        flops, nbytes = shape.flops(backward), shape.bytes_moved(backward)
        compute_floor = flops / ceilings["gemm_flops_per_s"]
        # what the layer's own kernels allow: its expert matmuls at the rate a bare batched GEMM of
        # that shape reaches, the rest at the large GEMM's rate
        expert_flops = shape.expert_flops(backward)
        attainable = (expert_flops / ceilings["expert_gemm_flops_per_s"]
                      + (flops - expert_flops) / ceilings["gemm_flops_per_s"])
        memory_floor = nbytes / ceilings["copy_bytes_per_s"]
        floor = max(compute_floor, memory_floor)
        # per-round floor from the probes of the same round, for a paired ratio
        round_floors = [max(flops * g / (2 * args.gemm_size**3), nbytes * c / ceilings["copy_bytes"])
                        for g, c in zip(times["gemm"]["total"], times["copy"]["total"])]
        soft_cpu, loop_cpu = times[f"soft_moe/{pass_name}"]["cpu"], times[f"seed_loop/{pass_name}"]["cpu"]
        round_floors_cpu = [max(flops * g / (2 * args.gemm_size**3), nbytes * c / ceilings["copy_bytes"])
                            for g, c in zip(times["gemm"]["cpu"], times["copy"]["cpu"])]
        rows.append({
            "shape": shape.name, **asdict(shape), "dtype": str(dtype).replace("torch.", ""), "pass": pass_name,
            "soft_moe_s": median(soft), "seed_loop_s": median(loop),
            "seed_loop_over_soft_moe": paired_ratio(loop, soft),
            "seed_loop_over_soft_moe_cpu_time": paired_ratio(loop_cpu, soft_cpu),
            "soft_moe_over_floor_cpu_time": paired_ratio(soft_cpu, round_floors_cpu),
            "flops": flops, "bytes": nbytes,
            "compute_floor_s": compute_floor, "memory_floor_s": memory_floor, "floor_s": floor,
            "soft_moe_over_floor": paired_ratio(soft, round_floors),
            "attainable_s": attainable, "soft_moe_over_attainable": median(soft) / attainable,
            "seed_loop_over_floor": paired_ratio(loop, round_floors),
            "soft_moe_flops_per_s": flops / median(soft),
            "fraction_of_gemm_rate": flops / median(soft) / ceilings["gemm_flops_per_s"],
            "ceilings": {k: v for k, v in ceilings.items() if not k.endswith("seconds")},
            "soft_moe_seconds": soft, "seed_loop_seconds": loop,
            "soft_moe_cpu_seconds": soft_cpu, "seed_loop_cpu_seconds": loop_cpu,
        })
    return rows


def profile_layer(shape: LayerShape, device, iterations: int = 3, rows: int = 16) -> str:
    """torch.profiler's table of float32 forward+backward of the layer: the kernels that take the time."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    layer = build_layer(shape, device)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, requires_grad=True)
    step = layer_pass_cases(layer, x, torch.randn_like(x), torch.float32, device)["forward_backward"]
    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(iterations):
            step()
        _synchronize(device)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = profiler.key_averages(group_by_input_shape=True).table(
        sort_by=sort_by, row_limit=rows, max_name_column_width=24, max_shapes_column_width=64)
    return f"{shape.name} float32 forward+backward, {iterations} iterations\n{table}"


@contextlib.contextmanager
def labelled_ranges(modules: Dict[str, nn.Module]):
    """Wrap each module's forward in a ``record_function(label)`` range while the context is open, so
    that the profiler can attribute time to parts of a model (a block's MLP, a layer's experts)."""
    from torch.profiler import record_function

    handles, open_ranges = [], {}
    for label, module in modules.items():
        def enter(_module, _inputs, label=label):
            open_ranges.setdefault(label, []).append(record_function(label).__enter__())

        def leave(_module, _inputs, _output, label=label):
            open_ranges[label].pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _range_seconds(profiler, label: str, iterations: int) -> float:
    """Inclusive CPU time of every ``label`` range, per iteration, in seconds."""
    events = [e for e in profiler.events() if e.name == label]
    return sum(e.cpu_time_total for e in events) / 1e6 / iterations


def profile_model_inference(shape: ModelShape, batch: int, device, iterations: int = 2) -> dict:
    """Where inference time goes in each model: the blocks that Soft MoE changes (dense MLPs against MoE
    layers, and inside those the experts against the routing) and everything else, each part's FLOPs
    (FlopCounterMode) and the rate it runs at. Shows which kernels hold the inference ratio back."""
    from torch.profiler import ProfilerActivity, profile
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    images = torch.randn(batch, 3, shape.img_size, shape.img_size, device=device)
    changed = range(shape.moe_layer_index, shape.depth)
    report = {"batch": batch, "iterations": iterations, "blocks": [changed.start, changed.stop - 1]}
    for kind in MODEL_KINDS:
        model = build_model(shape, kind, device).eval()
        mlps = {i: model.blocks[i].mlp for i in changed}
        parts = {"model": model, **{f"block{i}.mlp": mlp for i, mlp in mlps.items()}}
        if kind == "soft_moe":
            parts.update({f"block{i}.mlp.experts": mlp.experts for i, mlp in mlps.items()})
        # FLOPs counted on the meta device, as in model_flops: CPU's fused attention kernel has no FLOP formula
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            build_model(shape, kind, "meta")(torch.empty_like(images, device="meta"))
        module_flops = counter.get_flop_counts()
        root = type(model).__name__
        flops = {"model": sum(module_flops["Global"].values())}
        for i, mlp in mlps.items():
            flops[f"block{i}.mlp"] = sum(module_flops.get(f"{root}.blocks.{i}.mlp", {}).values())
            if kind == "soft_moe":
                flops[f"block{i}.mlp.experts"] = sum(module_flops.get(f"{root}.blocks.{i}.mlp.experts", {}).values())
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.inference_mode(), labelled_ranges(parts):
            model(images)  # warm-up
            with profile(activities=activities) as profiler:
                for _ in range(iterations):
                    model(images)
                _synchronize(device)
        seconds = {label: _range_seconds(profiler, label, iterations) for label in parts}

        def part(labels: Sequence[str]) -> dict:
            s, f = sum(seconds[k] for k in labels), sum(flops[k] for k in labels)
            return {"seconds": s, "gflop": f / 1e9, "gflop_per_s": f / s / 1e9 if s else None}

        mlp_labels = [f"block{i}.mlp" for i in changed]
        rows = {"whole model": part(["model"]), "changed MLPs": part(mlp_labels)}
        if kind == "soft_moe":
            rows["  experts"] = part([f"{k}.experts" for k in mlp_labels])
            routing = {key: rows["changed MLPs"][key] - rows["  experts"][key] for key in ("seconds", "gflop")}
            routing["gflop_per_s"] = routing["gflop"] / routing["seconds"] if routing["seconds"] else None
            rows["  routing (logits, softmaxes, dispatch, combine)"] = routing
        rest = {key: rows["whole model"][key] - rows["changed MLPs"][key] for key in ("seconds", "gflop")}
        rest["gflop_per_s"] = rest["gflop"] / rest["seconds"] if rest["seconds"] else None
        rows["everything else (same in both)"] = rest
        report[kind] = rows
        del model, profiler
        gc.collect()
    return report


def format_model_profile(report: dict) -> str:
    first, last = report["blocks"]
    lines = [f"model inference profile, batch {report['batch']}, {report['iterations']} iterations "
             f"(CPU time per forward; changed MLPs = blocks {first}-{last})",
             f"{'model':9} {'part':50} {'ms':>8} {'GFLOP':>8} {'GFLOP/s':>8}"]
    for kind in MODEL_KINDS:
        for name, row in report[kind].items():
            rate = "" if row["gflop_per_s"] is None else f"{row['gflop_per_s']:8.1f}"
            lines.append(f"{kind:9} {name:50} {1e3 * row['seconds']:8.1f} {row['gflop']:8.2f} {rate:>8}")
    return "\n".join(lines)


def benchmark_layer_memory(shape: LayerShape, device) -> List[dict]:
    """Peak memory of one float32 forward+backward of each implementation, against what it must hold:
    its parameters and their gradients, and the activations backward needs."""
    torch.manual_seed(0)
    rows = []
    for impl, layer in build_layers(shape, device).items():
        x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, requires_grad=True)
        grad = torch.randn_like(x)
        step = layer_pass_cases(layer, x, grad, torch.float32, device)["forward_backward"]
        step()  # first call: lazy initialisation, allocator warm-up
        layer.zero_grad(set_to_none=True)
        x.grad = None
        saved = saved_activation_bytes(lambda: layer(x), list(layer.parameters()))
        peak_extra = peak_memory_bytes(step, device)
        params = tensor_bytes(layer.parameters())
        required = 2 * params + shape.required_saved_bytes()
        peak = None if peak_extra is None else params + tensor_bytes([x]) + peak_extra
        rows.append({
            "shape": shape.name, "impl": impl, "param_bytes": params, "grad_bytes": params,
            "saved_activation_bytes": saved, "required_saved_bytes": shape.required_saved_bytes(),
            "required_bytes": required, "peak_bytes": peak,
            "peak_over_required": None if peak is None else peak / required,
        })
    return rows


# ------------------------------------------------------------------------------------------------ model


MODEL_KINDS = ("dense", "soft_moe")


def build_model(shape: ModelShape, kind: str, device) -> nn.Module:
    """timm's dense ``VisionTransformer``, or its Soft MoE twin; ``device="meta"`` allocates nothing."""
    from timm.models.vision_transformer import VisionTransformer

    with torch.device(device):
        if kind == "dense":
            return VisionTransformer(**shape.vit_kwargs())
        return SoftMoEVisionTransformer(num_experts=shape.num_experts, slots_per_expert=shape.slots_per_expert,
                                        moe_layer_index=shape.moe_layer_index, **shape.vit_kwargs())


def model_flops(shape: ModelShape, batch: int) -> Dict[str, Dict[str, int]]:
    """FLOPs of inference and of forward+backward, counted by torch's FlopCounterMode on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name in MODEL_KINDS:
        model = build_model(shape, name, "meta")
        x = torch.empty(batch, 3, shape.img_size, shape.img_size, device="meta")
        with FlopCounterMode(display=False) as forward:
            model(x)
        with FlopCounterMode(display=False) as training:
            model(x).sum().backward()
        counts[name] = {"forward": forward.get_total_flops(), "forward_backward": training.get_total_flops()}
    return counts


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **flags)


def model_cases(model: nn.Module, optimizer, images, labels):
    def inference():
        with torch.inference_mode():
            model(images)

    def train_step():
        device = images.device
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images), labels)
        _synchronize(device)
        forward_done = time.perf_counter()
        loss.backward()
        _synchronize(device)
        backward_done, backward_done_cpu = time.perf_counter(), time.process_time()
        optimizer.step()
        _synchronize(device)
        return {"forward": forward_done - start, "backward": backward_done - forward_done,
                "forward_backward": backward_done - start, "optimizer": time.perf_counter() - backward_done,
                "cpu_forward_backward": backward_done_cpu - start_cpu,
                "cpu_optimizer": time.process_time() - backward_done_cpu}

    return {"inference": inference, "train_step": train_step}


def benchmark_model(shape: ModelShape, args, device) -> dict:
    """Soft MoE ViT vs dense ViT: inference, forward+backward and the AdamW step, interleaved."""
    torch.manual_seed(0)
    flops = model_flops(shape, args.model_batch)
    models = {name: build_model(shape, name, device).train() for name in MODEL_KINDS}
    images = torch.randn(args.model_batch, 3, shape.img_size, shape.img_size, device=device)
    labels = torch.randint(0, 1000, (args.model_batch,), device=device)
    optimizers = {name: make_optimizer(model, args.optimizer) for name, model in models.items()}
    cases, rates_of = ceiling_cases(device, args.gemm_size, args.copy_mib)
    for name, model in models.items():
        for case, fn in model_cases(model, optimizers[name], images, labels).items():
            cases[f"{name}/{case}"] = fn
    times = interleaved(cases, args.model_rounds, args.warmup, device)
    ceilings = rates_of(times)

    def series(name: str, metric: str, clock: str = "wall") -> List[float]:
        if metric in ("inference", "train_step"):
            return times[f"{name}/{metric}"]["total" if clock == "wall" else "cpu"]
        return times[f"{name}/train_step"][metric if clock == "wall" else f"cpu_{metric}"]  # a phase of the step

    per_model = {}
    for name, model in models.items():
        step = series(name, "train_step")
        per_model[name] = {
            "params": sum(p.numel() for p in model.parameters()),
            "flops_per_image": {k: v / args.model_batch for k, v in flops[name].items()},
            **{f"{m}_s": median(series(name, m)) for m in ("inference", "forward_backward", "optimizer", "train_step")},
            "optimizer_share_of_step": paired_ratio(series(name, "optimizer"), step),
            "inference_images_per_s": args.model_batch / median(series(name, "inference")),
            "train_images_per_s": args.model_batch / median(step),
            "inference_fraction_of_gemm_rate":
                flops[name]["forward"] / median(series(name, "inference")) / ceilings["gemm_flops_per_s"],
            "forward_backward_fraction_of_gemm_rate":
                flops[name]["forward_backward"] / median(series(name, "forward_backward"))
                / ceilings["gemm_flops_per_s"],
            "seconds": {m: series(name, m) for m in ("inference", "forward", "backward", "optimizer", "train_step")},
        }
    metrics = ("inference", "forward_backward", "train_step", "optimizer")
    ratios = {m: paired_ratio(series("soft_moe", m), series("dense", m)) for m in metrics}
    ratios_cpu = {m: paired_ratio(series("soft_moe", m, "cpu"), series("dense", m, "cpu")) for m in metrics}
    del models, optimizers, cases
    gc.collect()
    return {"shape": asdict(shape), "batch": args.model_batch, "optimizer": f"AdamW ({args.optimizer})",
            "soft_moe_over_dense": ratios, "soft_moe_over_dense_cpu_time": ratios_cpu, "models": per_model,
            "ceilings": {k: v for k, v in ceilings.items() if not k.endswith("seconds")}}


def benchmark_model_memory(shape: ModelShape, args, device) -> dict:
    """Peak memory of inference and of a training step (after a first step created AdamW's state)."""
    torch.manual_seed(0)
    result = {}
    images = torch.randn(args.model_batch, 3, shape.img_size, shape.img_size, device=device)
    labels = torch.randint(0, 1000, (args.model_batch,), device=device)
    for name in MODEL_KINDS:
        model = build_model(shape, name, device).train()
        optimizer = make_optimizer(model, args.optimizer)
        cases = model_cases(model, optimizer, images, labels)
        cases["train_step"]()
        params = tensor_bytes(model.parameters())
        state = tensor_bytes(t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
        optimizer.zero_grad(set_to_none=True)
        inference = peak_memory_bytes(cases["inference"], device)
        train = peak_memory_bytes(cases["train_step"], device)
        result[name] = {
            "param_bytes": params, "optimizer_state_bytes": state,
            "inference_peak_bytes": None if inference is None else params + inference,
            "train_step_peak_bytes": None if train is None else params + state + train,
        }
        del model, optimizer, cases
        gc.collect()
    if result["dense"]["train_step_peak_bytes"]:
        result["soft_moe_over_dense"] = {key: result["soft_moe"][key] / result["dense"][key]
                                         for key in ("inference_peak_bytes", "train_step_peak_bytes")}
    return result


# ---------------------------------------------------------------------------------------------- compile


def benchmark_compile(shape: LayerShape, args, device) -> List[dict]:
    """The layer eager vs ``torch.compile``d (default mode), float32; compile time reported apart."""
    torch.manual_seed(0)
    layer = build_layers(shape, device)["soft_moe"]
    compiled = torch.compile(layer)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, requires_grad=True)
    grad = torch.randn_like(x)
    cases, compile_seconds = {}, {}
    for impl, module in (("eager", layer), ("compiled", compiled)):
        for pass_name, fn in layer_pass_cases(module, x, grad, torch.float32, device).items():
            if impl == "compiled":
                start = time.perf_counter()
                fn()
                compile_seconds[pass_name] = time.perf_counter() - start
            cases[f"{impl}/{pass_name}"] = fn
    times = interleaved(cases, args.layer_rounds, args.warmup, device)
    return [{
        "shape": shape.name, "pass": pass_name, "compile_s": compile_seconds[pass_name],
        "eager_s": median(times[f"eager/{pass_name}"]["total"]),
        "compiled_s": median(times[f"compiled/{pass_name}"]["total"]),
        "compiled_over_eager": paired_ratio(times[f"compiled/{pass_name}"]["total"],
                                            times[f"eager/{pass_name}"]["total"]),
    } for pass_name in ("forward", "forward_backward")]


# ---------------------------------------------------------------------------------------------- report


def machine_info(device: torch.device) -> dict:
    import timm

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    info = {
        "device": str(device), "cpu": cpu, "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
        "blas": "MKL" if torch.backends.mkl.is_available() else "other",
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "env": {key: os.environ[key] for key in ENV_KEYS if key in os.environ},
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


TARGETS = {
    # name: (limit, "max" or "min"), from issue 5 item 2 (float32, vit_s16 shapes)
    "layer_forward_backward_over_floor": (1.3, "max"),
    "seed_loop_over_layer_forward_backward": (1.5, "min"),
    "model_inference_over_dense": (1.0, "max"),
    "model_forward_backward_over_dense": (1.15, "max"),
    "model_train_step_over_dense": (1.35, "max"),
    "layer_peak_memory_over_required": (1.2, "max"),
}


def evaluate_targets(results: dict, layer_shape: str) -> dict:
    """Issue 5's targets on wall-clock ratios; the CPU-time ratio is reported beside each timed one."""
    values = {}  # name: (wall-clock value, CPU-time value)
    for row in results["layer"]:
        if row["shape"] == layer_shape and row["dtype"] == "float32" and row["pass"] == "forward_backward":
            values["layer_forward_backward_over_floor"] = (row["soft_moe_over_floor"],
                                                          row["soft_moe_over_floor_cpu_time"])
            values["seed_loop_over_layer_forward_backward"] = (row["seed_loop_over_soft_moe"],
                                                              row["seed_loop_over_soft_moe_cpu_time"])
    model = results.get("model") or {}
    for metric in ("inference", "forward_backward", "train_step"):
        if metric in model.get("soft_moe_over_dense", {}):
            values[f"model_{metric}_over_dense"] = (model["soft_moe_over_dense"][metric],
                                                    model["soft_moe_over_dense_cpu_time"][metric])
    for row in results.get("layer_memory", []):
        if row["shape"] == layer_shape and row["impl"] == "soft_moe" and row["peak_over_required"] is not None:
            values["layer_peak_memory_over_required"] = (row["peak_over_required"], None)
    targets = {}
    for name, (limit, kind) in TARGETS.items():
        if name in values:
            value, value_cpu_time = values[name]
            targets[name] = {"value": value, "value_cpu_time": value_cpu_time, "limit": limit, "kind": kind,
                             "met": value <= limit if kind == "max" else value >= limit}
    return targets


def format_report(results: dict) -> str:
    m = results["machine"]
    lines = [f"{m['cpu']} | {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads | "
             f"torch {m['torch']}, timm {m['timm']} | device {m['device']}", ""]
    lines.append("ratios: wall clock (CPU time); attainable: expert FLOPs at the expert GEMM's rate, the rest at "
                 "the GEMM rate; rates in GFLOP/s and GB/s")
    lines.append(f"{'layer':10} {'dtype':8} {'pass':16} {'SoftMoE ms':>10} {'loop ms':>9} {'loop/SMoE':>12} "
                 f"{'floor ms':>9} {'SMoE/floor':>12} {'SMoE/attain':>11} {'GEMM':>6} {'expert GEMM':>11} {'copy':>5}")
    for r in results["layer"]:
        c = r["ceilings"]
        lines.append(f"{r['shape']:10} {r['dtype']:8} {r['pass']:16} {1e3 * r['soft_moe_s']:10.1f} "
                     f"{1e3 * r['seed_loop_s']:9.1f} "
                     f"{r['seed_loop_over_soft_moe']:5.2f} ({r['seed_loop_over_soft_moe_cpu_time']:4.2f}) "
                     f"{1e3 * r['floor_s']:9.1f} "
                     f"{r['soft_moe_over_floor']:5.2f} ({r['soft_moe_over_floor_cpu_time']:4.2f}) "
                     f"{r['soft_moe_over_attainable']:11.2f} {c['gemm_flops_per_s'] / 1e9:6.1f} "
                     f"{c['expert_gemm_flops_per_s'] / 1e9:11.1f} {c['copy_bytes_per_s'] / 1e9:5.1f}")
    for r in results.get("layer_memory", []):
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GIB:.3f} GiB"
        ratio = "n/a" if r["peak_over_required"] is None else f"{r['peak_over_required']:.2f}x"
        lines.append(f"memory {r['shape']} {r['impl']:9}: peak {peak}, required (2 x params + saved) "
                     f"{r['required_bytes'] / GIB:.3f} GiB -> {ratio}; "
                     f"saves {r['saved_activation_bytes'] / 2**20:.1f} MiB "
                     f"(needs {r['required_saved_bytes'] / 2**20:.1f} MiB)")
    model = results.get("model")
    if model and "models" in model:
        lines += ["", f"model {model['shape']['name']}, batch {model['batch']}, {model['optimizer']}"]
        lines.append(f"{'':10} {'params':>8} {'infer s':>8} {'fwd+bwd s':>9} {'optim s':>8} {'step s':>7} "
                     f"{'optim %':>7} {'img/s inf':>9} {'img/s train':>11}")
        for name, r in model["models"].items():
            lines.append(f"{name:10} {r['params'] / 1e6:7.1f}M {r['inference_s']:8.3f} {r['forward_backward_s']:9.3f} "
                         f"{r['optimizer_s']:8.3f} {r['train_step_s']:7.3f} {100 * r['optimizer_share_of_step']:7.1f} "
                         f"{r['inference_images_per_s']:9.1f} {r['train_images_per_s']:11.1f}")
        ratios = model["soft_moe_over_dense"]
        lines.append("soft_moe / dense: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
        lines.append("soft_moe / dense, CPU time: "
                     + ", ".join(f"{k} {v:.2f}x" for k, v in model["soft_moe_over_dense_cpu_time"].items()))
    memory = results.get("model_memory")
    if memory and "dense" in memory:
        for name in ("dense", "soft_moe"):
            r = memory[name]
            if r["train_step_peak_bytes"] is not None:
                lines.append(f"memory {name:9}: inference peak {r['inference_peak_bytes'] / GIB:.2f} GiB, "
                             f"train step peak "
                             f"{r['train_step_peak_bytes'] / GIB:.2f} GiB (params {r['param_bytes'] / GIB:.2f}, "
                             f"AdamW state {r['optimizer_state_bytes'] / GIB:.2f})")
    if results.get("model_profile"):
        lines += ["", format_model_profile(results["model_profile"])]
    if results.get("profile"):
        lines += ["", results["profile"]]
    compiled = results.get("compile")
    if isinstance(compiled, list):
        lines.append("")
        for r in compiled:
            lines.append(f"compile {r['shape']} {r['pass']:16}: eager {1e3 * r['eager_s']:.1f} ms, "
                         f"compiled {1e3 * r['compiled_s']:.1f} ms ({r['compiled_over_eager']:.2f}x), "
                         f"compile {r['compile_s']:.1f} s")
    if results.get("targets"):
        lines.append("")
        for name, t in results["targets"].items():
            sign = "<=" if t["kind"] == "max" else ">="
            cpu_time = "" if t["value_cpu_time"] is None else f" (CPU time: {t['value_cpu_time']:.2f})"
            verdict = "met" if t["met"] else "NOT met"
            lines.append(f"target {name}: {t['value']:.2f}{cpu_time} {sign} {t['limit']}: {verdict}")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m softmoe.benchmark", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="experiments/throughput/results.json", help="where the JSON goes")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny layer and model, 1 round: checks the command in seconds (numbers mean nothing)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--layer-shapes", nargs="+", default=["vit_s16", "cpu_small"], choices=sorted(LAYER_SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--bfloat16-shapes", nargs="+", default=["cpu_small"], choices=sorted(LAYER_SHAPES),
                        help="layer shapes also run under bf16 autocast (CPUs without native bf16 matmul are slow)")
    parser.add_argument("--model-shape", default="vit_s16", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--model-batch", type=int, default=32)
    parser.add_argument("--no-model", action="store_true", help="skip the whole-model section")
    parser.add_argument("--optimizer", default="fused", choices=["fused", "foreach", "for_loop"], help="AdamW kernel")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile on CPU)")
    parser.add_argument("--profile", action="store_true",
                        help="add torch.profiler's kernel table of the first layer shape's forward+backward")
    parser.add_argument("--profile-model", action="store_true",
                        help="add where each model's inference time goes (changed MLPs, experts, routing, the rest)")
    parser.add_argument("--compile-shapes", nargs="+", default=["cpu_small"], choices=sorted(LAYER_SHAPES))
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    parser.add_argument("--layer-rounds", type=int, default=7)
    parser.add_argument("--model-rounds", type=int, default=3)
    parser.add_argument("--gemm-size", type=int, default=None, help="square GEMM of the rate probe")
    parser.add_argument("--copy-mib", type=int, default=None, help="size of the bandwidth probe's copy")
    args = parser.parse_args(argv)
    if args.tiny:
        args.layer_shapes = args.bfloat16_shapes = args.compile_shapes = ["tiny"]
        args.model_shape = "tiny"
        args.model_batch, args.warmup, args.layer_rounds, args.model_rounds = 2, 1, 1, 1
        args.gemm_size, args.copy_mib = args.gemm_size or 128, args.copy_mib or 4
    cuda = args.device.startswith("cuda")
    args.gemm_size = args.gemm_size or (8192 if cuda else 2048)
    args.copy_mib = args.copy_mib or (1024 if cuda else 256)
    for name in ("model_batch", "warmup", "layer_rounds", "model_rounds", "gemm_size", "copy_mib"):
        minimum = 0 if name == "warmup" else 1
        if getattr(args, name) < minimum:
            parser.error(f"--{name.replace('_', '-')} must be >= {minimum}, got {getattr(args, name)}")
    return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {"command": " ".join(["python -m softmoe.benchmark", *argv]), "machine": machine_info(device),
               "config": vars(args)}
    started = time.perf_counter()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    layer_shapes = [LAYER_SHAPES[name] for name in args.layer_shapes]
    model_shape = MODEL_SHAPES[args.model_shape]
    results["layer"] = [
        row
        for shape in layer_shapes
        for dtype in args.dtypes
        if dtype == "float32" or shape.name in args.bfloat16_shapes
        for row in benchmark_layer(shape, dtypes[dtype], args, device)
    ]
    if args.profile:
        results["profile"] = profile_layer(layer_shapes[0], device)
    results["model"] = {"skipped": "--no-model"} if args.no_model else benchmark_model(model_shape, args, device)
    if args.profile_model:
        results["model_profile"] = profile_model_inference(model_shape, args.model_batch, device)
    results["compile"] = {"skipped": "pass --compile"}
    if args.compile:
        results["compile"] = [row for name in args.compile_shapes
                              for row in benchmark_compile(LAYER_SHAPES[name], args, device)]
    # memory last: the host probe changes how glibc allocates, which would slow the timings
    results["memory_method"] = memory_method(device)
    results["layer_memory"] = [row for shape in layer_shapes for row in benchmark_layer_memory(shape, device)]
    results["model_memory"] = {"skipped": "--no-model"} if args.no_model else \
        benchmark_model_memory(model_shape, args, device)
    results["targets"] = evaluate_targets(results, args.layer_shapes[0])
    results["machine"]["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["wall_s"] = time.perf_counter() - started
    return results


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    results = run(args, argv)
    print(format_report(results))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"\nwrote {args.out}")
    return results


if __name__ == "__main__":
    main()
