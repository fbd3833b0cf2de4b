"""The layer section: Soft MoE against the reference-style loop, against its attainable time, across
allocator settings and dtypes, all side by side; its peak memory; eager against torch.compile."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Dict, List

import torch
from torch import nn

from ..experts import hold_expert_copies, weights_changed
from ..harness.precision import autocast, precision_name
from ..layer import SoftMoE
from .environment import (allocator_available, peak_memory_bytes, saved_activation_bytes, tensor_bytes,
                          with_allocator)
from .floors import attainable_cases, ceiling_cases, expert_gemm_case
from .reference import ReferenceLoopSoftMoE
from .shapes import LayerShape
from .timing import interleaved, median, paired_ratio

PASSES = ("forward", "forward_backward")


def build_layer(shape: LayerShape, device) -> SoftMoE:
    return SoftMoE(shape.dim, shape.hidden, num_experts=shape.num_experts,
                   slots_per_expert=shape.slots_per_expert, device=device)


class ReadingHeldCopies(nn.Module):
    """``layer`` run as a compiled :class:`~softmoe.vit.SoftMoEVisionTransformer` runs its Soft MoE layers: under
    autocast its expert banks' bf16 copies are brought up to date eagerly before the graph and read by it, so the
    graph casts no expert weight and the backward takes the float32 weight gradients from the GEMM. Compiled bare,
    the layer would cast every expert weight in its graph at every call, which no model of this package does."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hold_expert_copies(self.layer, True)  # a graph break before and after, as the model's
        y = self.layer(x)
        hold_expert_copies(self.layer, False)
        return y


def build_layers(shape: LayerShape, device) -> Dict[str, nn.Module]:
    layer = build_layer(shape, device)
    return {"soft_moe": layer, "reference_loop": ReferenceLoopSoftMoE.from_soft_moe(layer)}


def layer_pass_cases(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor, dtype: torch.dtype, device,
                     optimizer_step: bool = False):
    """Forward (no grad) and forward+backward of ``layer``; gradients are set to None first, as
    ``optimizer.zero_grad()`` does. ``optimizer_step``: each call starts as after an optimizer step, so
    the expert weights' bf16 copies are cast anew (once per training step), not reused."""
    precision = precision_name(dtype)

    def forward():
        if optimizer_step:
            weights_changed()
        with torch.no_grad(), autocast(device, precision):
            layer(x)

    def forward_backward():
        if optimizer_step:
            weights_changed()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        with autocast(device, precision):
            y = layer(x)
        y.backward(grad if y.dtype == grad.dtype else grad.to(y.dtype))

    return {"forward": forward, "forward_backward": forward_backward}


# The float32 layer timed beside glibc's own settings, in a set of rounds of its own (see _glibc_cases).
BESIDE_GLIBC = "fp32/soft_moe@beside_glibc/forward_backward"


def _layer_cases(shape: LayerShape, layers, x, grad, dtypes: List[torch.dtype], device) -> dict:
    """Per dtype: the bare matmuls and each implementation's passes; in float32 the layer under the environment
    variables' allocator settings; in bf16 the layer recasting its weights at every call."""
    cases = {}
    for dtype in dtypes:
        d = precision_name(dtype)
        matmuls, _ = attainable_cases(shape, device, dtype)
        for pass_name, fn in matmuls.items():
            cases[f"{d}/matmuls/{pass_name}"] = fn
        for impl, layer in layers.items():
            for pass_name, fn in layer_pass_cases(layer, x, grad, dtype, device).items():
                cases[f"{d}/{impl}/{pass_name}"] = fn
        if dtype == torch.float32 and allocator_available(device):
            step = layer_pass_cases(layers["soft_moe"], x, grad, dtype, device)["forward_backward"]
            cases[f"{d}/soft_moe@env_variables/forward_backward"] = with_allocator(step, "env_variables")
        if dtype != torch.float32:
            cases[f"{d}/soft_moe@cast_per_step/forward_backward"] = layer_pass_cases(
                layers["soft_moe"], x, grad, dtype, device, optimizer_step=True)["forward_backward"]
    return cases


def _glibc_cases(layers, x, grad, dtypes: List[torch.dtype], device) -> dict:
    """The float32 layer under glibc's own settings beside the layer as the commands run it. They get rounds of
    their own: the glibc case returns the heap's free memory to the system, so whatever case followed it in the
    other rounds grew the heap back, page by page (on a Zen 4, the bf16 layer's medians read 1.2-2.0x its time
    in rounds without it)."""
    if torch.float32 not in dtypes or not allocator_available(device):
        return {}
    step = layer_pass_cases(layers["soft_moe"], x, grad, torch.float32, device)["forward_backward"]
    return {BESIDE_GLIBC: step, "fp32/soft_moe@glibc_defaults/forward_backward": with_allocator(step, "glibc_defaults")}


def _variant_ratios(times: dict, d: str, pass_name: str) -> dict:
    """The layer under each allocator setting and recasting its bf16 weights per call, against the layer as the
    commands run it in the same rounds."""
    ratios = {}
    for variant in ("env_variables", "glibc_defaults", "cast_per_step"):
        name = f"{d}/soft_moe@{variant}/{pass_name}"
        if name in times:
            # the glibc case times its call apart from the untimed call that restores the heap
            timed = times[name].get("call", times[name]["total"])
            timed_cpu = times[name].get("cpu_call", times[name]["cpu"])
            beside = times[BESIDE_GLIBC if variant == "glibc_defaults" else f"{d}/soft_moe/{pass_name}"]
            ratios[f"soft_moe@{variant}_s"] = median(timed)
            ratios[f"soft_moe@{variant}_seconds"] = list(timed)  # per round: what each median ratio is made of
            ratios[f"soft_moe_over_soft_moe@{variant}"] = paired_ratio(beside["total"], timed)
            ratios[f"soft_moe_over_soft_moe@{variant}_cpu_time"] = paired_ratio(beside["cpu"], timed_cpu)
    return ratios


def benchmark_layer(shape: LayerShape, dtypes: List[torch.dtype], args, device) -> List[dict]:
    """For one shape, in one interleaved set of rounds: per compute dtype, the Soft MoE layer, the
    reference-style loop and the bare matmuls of the layer; in float32 the layer under the environment
    variables' allocator settings (against the default environment the commands set up), and in rounds of
    their own, under glibc's own settings; in bf16 the layer recasting its weights at every call (as after
    each optimizer step) beside the layer reusing them; and the machine's GEMM and copy probes."""
    torch.manual_seed(0)
    layers = build_layers(shape, device)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, device=device, requires_grad=True)
    grad = torch.randn(shape.batch, shape.tokens, shape.dim, device=device)
    cases, rates_of = ceiling_cases(device, args.gemm_size, args.copy_mib, dtypes)
    rows = shape.batch * shape.slots_per_expert
    expert_gemm_flops = {}
    for factor in (1, 2, 4) if torch.float32 in dtypes else ():  # what 2x and 4x the rows per expert would buy
        cases[f"expert_gemm_x{factor}"], expert_gemm_flops[factor * rows] = expert_gemm_case(
            shape, device, factor * rows)
    cases.update(_layer_cases(shape, layers, x, grad, dtypes, device))
    times = interleaved(cases, args.layer_rounds, args.warmup, device)
    times.update(interleaved(_glibc_cases(layers, x, grad, dtypes, device), args.layer_rounds, args.warmup, device))
    ceilings = rates_of(times)
    if expert_gemm_flops:
        ceilings["expert_gemm_flops_per_s_by_rows"] = {
            r: flops / median(times[f"expert_gemm_x{r // rows}"]["total"]) for r, flops in expert_gemm_flops.items()}

    def wall(name):
        return times[name]["total"]

    def cpu(name):
        return times[name]["cpu"]

    results = []
    for dtype in dtypes:
        d = precision_name(dtype)
        element_size = torch.empty((), dtype=dtype).element_size()
        gemm_rate = ceilings[f"gemm_{str(dtype).replace('torch.', '')}_flops_per_s"]
        for pass_name in PASSES:
            backward = pass_name == "forward_backward"
            soft, loop, bare = (f"{d}/{impl}/{pass_name}" for impl in ("soft_moe", "reference_loop", "matmuls"))
            flops = shape.flops(backward)
            weight_bytes = shape.weight_traffic_bytes(backward, element_size)
            row = {
                "shape": shape.name, **asdict(shape), "dtype": str(dtype).replace("torch.", ""), "pass": pass_name,
                "soft_moe_s": median(wall(soft)), "reference_loop_s": median(wall(loop)),
                "attainable_s": median(wall(bare)),
                "reference_loop_over_soft_moe": paired_ratio(wall(loop), wall(soft)),
                "reference_loop_over_soft_moe_cpu_time": paired_ratio(cpu(loop), cpu(soft)),
                "soft_moe_over_attainable": paired_ratio(wall(soft), wall(bare)),
                "soft_moe_over_attainable_cpu_time": paired_ratio(cpu(soft), cpu(bare)),
                "flops": flops, "attainable_flops_per_s": flops / median(wall(bare)),
                "soft_moe_flops_per_s": flops / median(wall(soft)),
                "fraction_of_gemm_rate": flops / median(wall(soft)) / gemm_rate,
                "expert_weight_bytes": weight_bytes,
                # the bandwidth roofline: the expert weights (and their gradients) streamed once at copy speed
                "weight_roofline_s": weight_bytes / ceilings["copy_bytes_per_s"],
                "compute_floor_s": flops / gemm_rate,  # every FLOP at one large GEMM's rate: not attainable
                "soft_moe_seconds": wall(soft), "reference_loop_seconds": wall(loop), "attainable_seconds": wall(bare),
                "soft_moe_cpu_seconds": cpu(soft), "reference_loop_cpu_seconds": cpu(loop),
                "attainable_cpu_seconds": cpu(bare),
            }
            row["soft_moe_over_weight_roofline"] = row["soft_moe_s"] / row["weight_roofline_s"]
            row.update(_variant_ratios(times, d, pass_name))
            if dtype != torch.float32 and torch.float32 in dtypes:
                fp32 = f"fp32/soft_moe/{pass_name}"
                row["float32_over_this"] = paired_ratio(wall(fp32), wall(soft))
                row["float32_over_this_cpu_time"] = paired_ratio(cpu(fp32), cpu(soft))
                per_step = f"{d}/soft_moe@cast_per_step/{pass_name}"
                if per_step in times:
                    row["float32_over_cast_per_step"] = paired_ratio(wall(fp32), wall(per_step))
                    row["float32_over_cast_per_step_cpu_time"] = paired_ratio(cpu(fp32), cpu(per_step))
            results.append(row)
    for row in results:
        row["ceilings"] = {k: v for k, v in ceilings.items() if not k.endswith("seconds")}
    return results


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
    } for pass_name in PASSES]
