"""Where the time goes: torch.profiler's kernel table of the layer, and each model's inference split into
the MLPs Soft MoE replaces (its experts and its routing) and everything else, with FLOPs and rates."""

from __future__ import annotations

import contextlib
import gc
from typing import Callable, Dict, Sequence

import torch
from torch import nn

from .layer import build_layers, layer_pass_cases
from .model import MODEL_KINDS, build_benchmark_model
from .shapes import LayerShape, ModelShape
from .timing import synchronize


def profile_layer(shape: LayerShape, device, dtype: torch.dtype = torch.float32, iterations: int = 3,
                  rows: int = 16, impl: str = "soft_moe") -> str:
    """torch.profiler's table of the layer's forward+backward in ``dtype``: the kernels that take the time.
    ``impl="reference_loop"``: the same for the reference-style loop."""
    torch.manual_seed(0)
    layer = build_layers(shape, device)[impl]
    x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, requires_grad=True)
    step = layer_pass_cases(layer, x, torch.randn_like(x), dtype, device)["forward_backward"]
    step()
    table = profile_calls(step, device, iterations, rows)["table"]
    return f"{impl} {shape.name} {str(dtype).replace('torch.', '')} forward+backward, {iterations} iterations\n{table}"


# Where a profile's time goes, by the op that spends it: the categories of issue 18's profile table. Each op's
# *self* time (on a GPU the kernels it launched), so nested ops are not counted twice.
MATMUL_OPS = {"bmm", "baddbmm", "mm", "addmm", "addbmm", "_grouped_mm", "_scaled_mm"}
COPY_OPS = {"copy_", "_to_copy", "clone", "contiguous", "to", "_copy_from", "_copy_from_and_resize"}
SOFTMAX_OPS = {"_softmax", "_softmax_backward_data", "softmax", "_log_softmax", "_log_softmax_backward_data"}
REDUCTION_OPS = {"native_layer_norm", "native_layer_norm_backward", "linalg_vector_norm", "linalg_vecdot", "sum",
                 "mean", "norm", "amax", "max"}
PROFILE_CATEGORIES = ("matmuls", "attention", "copies and casts", "softmaxes", "norms and reductions", "optimizer",
                      "compiled (fused) kernels", "other aten ops (elementwise)", "framework (autograd, Python)")


def op_category(name: str) -> str:
    """The category of ``PROFILE_CATEGORIES`` an op (``aten::bmm``) or compiled kernel (``triton_poi_...``) is in."""
    if not name.startswith("aten::"):
        if name.startswith("triton_tem_"):  # inductor's GEMM templates (max-autotune)
            return "matmuls"
        # a GPU's Triton kernels each have a range of their own; a CPU's C++ kernels run inside the graph's call
        compiled = name.startswith(("triton_", "## Call CompiledFxGraph"))
        return "compiled (fused) kernels" if compiled else "framework (autograd, Python)"
    op = name[len("aten::"):]
    if op in MATMUL_OPS:
        return "matmuls"
    if "attention" in op or "scaled_dot_product" in op:
        return "attention"
    if op.startswith(("_fused_adam", "_foreach_")):
        return "optimizer"
    for category, ops in (("copies and casts", COPY_OPS), ("softmaxes", SOFTMAX_OPS),
                          ("norms and reductions", REDUCTION_OPS)):
        if op in ops:
            return category
    return "other aten ops (elementwise)"


def profile_calls(call: Callable[[], object], device, iterations: int = 3, rows: int = 16) -> dict:
    """``call()`` run ``iterations`` times under torch.profiler: its kernel table (``rows`` rows, by self time)
    and the time per iteration of each category (``op_category``); device time on a GPU, else CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities, record_shapes=True) as profiler:
        for _ in range(iterations):
            call()
        synchronize(device)
    sort_by = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    averages = profiler.key_averages()
    microseconds = dict.fromkeys(PROFILE_CATEGORIES, 0.0)
    for event in averages:
        if event.device_type != DeviceType.CPU:  # a kernel's own row: its time is also its launching op's
            continue
        microseconds[op_category(event.key)] += getattr(event, sort_by)
    total = sum(microseconds.values())
    table = profiler.key_averages(group_by_input_shape=True).table(
        sort_by=sort_by, row_limit=rows, max_name_column_width=32, max_shapes_column_width=64)
    return {"clock": "device" if on_gpu else "cpu", "iterations": iterations,
            "ms_per_iteration": total / 1e3 / iterations,
            "ms": {c: us / 1e3 / iterations for c, us in microseconds.items() if us > 0},
            "shares": {c: us / total for c, us in microseconds.items() if us > 0 and total > 0}, "table": table}


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
    changed = build_benchmark_model(shape, "soft_moe", "meta").moe_layer_index  # the blocks whose MLP differs
    report = {"batch": batch, "iterations": iterations, "blocks": [changed[0], changed[-1]]}
    for kind in MODEL_KINDS:
        model = build_benchmark_model(shape, kind, device).eval()
        mlps = {i: model.blocks[i].mlp for i in changed}
        parts = {"model": model, **{f"block{i}.mlp": mlp for i, mlp in mlps.items()}}
        if kind == "soft_moe":
            parts.update({f"block{i}.mlp.experts": mlp.experts for i, mlp in mlps.items()})
        # FLOPs counted on the meta device, as in model_flops: CPU's fused attention kernel has no FLOP formula
        with FlopCounterMode(display=False) as counter, torch.inference_mode():
            build_benchmark_model(shape, kind, "meta")(torch.empty_like(images, device="meta"))
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
                synchronize(device)
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
