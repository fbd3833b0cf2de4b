"""The suite's targets (issue 18) and its printed report: every figure beside its limit, met or NOT met."""

from __future__ import annotations

from typing import List

from ..harness.rules import counted
from .optimizer_step import optimizer_lines

LAYER_OVER_MATMULS_LIMIT = 1.5  # the layer / the bare matmuls it must do
LAYER_OVER_MLP_LIMIT = 1.0  # the layer / timm's dense Mlp on the same tokens
STEP_OVER_FLOOR_LIMIT = 1.15  # the training step / its floor (optimizer, weight copies, casts, FLOPs)
PASS_NAMES = {"forward": "forward", "forward_backward": "fwd+bwd"}


def _target(name: str, value, limit: float, kind: str, verdicts: bool) -> dict:
    met = None if (value is None or not verdicts) else (value <= limit if kind == "max" else value >= limit)
    return {"name": name, "value": value, "limit": limit, "kind": kind, "met": met}


def suite_targets(results: dict, verdicts: bool = True) -> List[dict]:
    """Every target the suite measures, in the report's order; ``verdicts=False`` (tiny sizes): values only."""
    targets = []
    for row in results["layers"]:
        for impl in ("eager", "compiled"):
            for pass_name, label in PASS_NAMES.items():
                prefix = f"{impl}_{pass_name}"
                if f"{prefix}_s" not in row:
                    continue
                what = f"layer {row['shape']} {impl} {label}"
                targets.append(_target(f"{what} / bare matmuls", row[f"{prefix}_over_matmuls"],
                                       LAYER_OVER_MATMULS_LIMIT, "max", verdicts))
                targets.append(_target(f"{what} / timm Mlp", row[f"{prefix}_over_mlp"], LAYER_OVER_MLP_LIMIT, "max",
                                       verdicts))
    for model in results["models"]:
        label = model["label"]
        for variant in ("eager", "compiled"):
            key = f"forward_backward_{variant}_soft_moe_over_dense"
            if key in model:
                targets.append(_target(f"{label} fwd+bwd {variant}, Soft MoE / dense", model[key],
                                       model["forward_backward_limit"], "max", verdicts))
            step = model["step"].get(f"soft_moe/{variant}")
            if step:
                targets.append(_target(f"{label} Soft MoE training step {variant} / its floor",
                                       step["step_over_floor"], STEP_OVER_FLOOR_LIMIT, "max", verdicts))
        for metric, what in (("inference_eager", "inference, bf16 autocast, eager"),
                             ("inference_compiled", "inference, bf16 autocast, compiled"),
                             ("inference_bf16", "inference, model cast to bf16")):
            key = f"{metric}_soft_moe_over_dense"
            if key in model:
                targets.append(_target(f"{label} {what}, Soft MoE / dense", model[key], model["inference_limit"],
                                       "max", verdicts))
    huge = results.get("huge")  # absent when its section failed
    if huge is not None:
        targets.append(_target(f"inference {huge['dense']} / {huge['soft_moe']} time (Soft MoE speed-up)",
                               huge["soft_moe_speedup"], huge["limit"], "min", verdicts))
    return targets


def _layer_lines(row: dict) -> List[str]:
    lines = []
    for pass_name, label in PASS_NAMES.items():
        cells = [f"bare matmuls {1e3 * row[f'matmuls_{pass_name}_s']:.2f} ms "
                 f"({100 * row[f'matmuls_{pass_name}_fraction_of_peak']:.0f}% of peak)",
                 f"timm Mlp {1e3 * row[f'mlp_{pass_name}_s']:.2f} ms"]
        for impl in ("eager", "compiled"):
            if f"{impl}_{pass_name}_s" in row:
                cells.append(f"{impl} {1e3 * row[f'{impl}_{pass_name}_s']:.2f} ms "
                             f"({100 * row[f'{impl}_{pass_name}_fraction_of_peak']:.0f}% of peak)")
        lines.append(f"layer {row['shape']} (b {row['batch']}, d {row['dim']}, {row['num_slots']} slots) {label}: "
                     + "; ".join(cells))
    grouped = (f"torch._grouped_mm {1e3 * row['experts_grouped_mm_s']:.2f} ms "
               f"({row['experts_grouped_mm_over_bmm']:.2f}x bmm's time)" if "experts_grouped_mm_s" in row
               else f"torch._grouped_mm not timed: {row['experts_grouped_mm_missing']}")
    lines.append(f"experts {row['shape']} fc1 + fc2 forward: torch.bmm {1e3 * row['experts_bmm_s']:.2f} ms; {grouped}")
    floors = "; ".join(f"{label} layer {1e3 * row[f'eager_{pass_name}_per_call_floor_s']:.2f} ms, timm Mlp "
                       f"{1e3 * row[f'mlp_{pass_name}_per_call_floor_s']:.2f} ms"
                       for pass_name, label in PASS_NAMES.items())
    lines.append(f"per-call floor beside {row['shape']} (the same calls at toy sizes, eager): {floors}")
    return lines


def _model_lines(model: dict) -> List[str]:
    lines = [f"models {model['label']}: {model['dense']} / {model['soft_moe']}, batch {model['batch']}"]
    for name, step in model["step"].items():
        kind = name.split("/")[0]
        floor = model["floor"][kind]
        lines.append(f"  {name:18} step {1e3 * step['step_s']:8.1f} ms (fwd+bwd {1e3 * step['forward_backward_s']:.1f},"
                     f" AdamW {1e3 * step['optimizer_s']:.1f}); floor {1e3 * floor['seconds']:.1f} ms = matmuls "
                     f"{1e3 * floor['matmul_s']:.1f} + traffic {1e3 * floor['traffic_s']:.1f} "
                     f"({floor['traffic_bytes'] / 1e9:.1f} GB: AdamW {floor['optimizer_bytes'] / 1e9:.1f}, "
                     f"bf16 copies {floor['weight_copy_bytes'] / 1e9:.1f}, grad casts "
                     f"{floor['gradient_cast_bytes'] / 1e9:.1f}) -> {step['step_over_floor']:.2f}x")
    for metric in ("inference_eager", "inference_compiled", "inference_bf16"):
        if f"{metric}_images_per_s" in model:
            rate = model[f"{metric}_images_per_s"]
            lines.append(f"  {metric:18} images/s: dense {rate['dense']:.0f}, Soft MoE {rate['soft_moe']:.0f}")
    return lines


def _huge_lines(huge: dict) -> List[str]:
    return [f"inference images/s: {huge['dense']} {huge['images_per_s']['dense']:.0f}, "
            f"{huge['soft_moe']} {huge['images_per_s']['soft_moe']:.0f}"]


def _profile_lines(profile: dict) -> List[str]:
    """Each profiled case's time by op category, largest first (its kernel table is in the JSON)."""
    lines = []
    for case in profile["cases"]:
        shares = sorted(case["shares"].items(), key=lambda item: -item[1])
        lines.append(f"profile {case['what']}: {case['ms_per_iteration']:.2f} ms of {case['clock']} time: "
                     + ", ".join(f"{category} {100 * share:.0f}%" for category, share in shares))
    return lines


def section_lines(key: str, figures: dict) -> List[str]:
    """The report's lines for one section's figures (``key``: its key in the results), as soon as it is measured."""
    lines_of = {"layers": _layer_lines, "models": _model_lines, "huge": _huge_lines, "optimizer": optimizer_lines,
                "profile": _profile_lines}
    return lines_of[key](figures)


def format_suite(results: dict) -> str:
    m, peak = results["machine"], results["peak"]
    device = m.get("gpu") or f"{m['cpu']} ({m.get('cpu_family_model')})"
    load = m.get("load_average_at_start")
    lines = [f"suite {results['suite']} on {device} | torch {m['torch']}, timm {m['timm']} | compile backend "
             f"{results['compile_backend']} | load average {load[0] if load else float('nan'):.2f}",
             f"peak: bf16 matmul {peak['matmul_bf16_flops_per_s'] / 1e12:.1f} TFLOP/s ({peak['gemm_size']}³), "
             f"copy {peak['copy_bytes_per_s'] / 1e9:.0f} GB/s", ""]
    for row in results["layers"]:
        lines += section_lines("layers", row)
    for model in results["models"]:
        lines += [""] + section_lines("models", model)
    for key in ("huge", "optimizer", "profile"):
        if key in results:
            lines += [""] + section_lines(key, results[key])
    lines += [f"skipped: {what}" for what in results["skipped"]]
    lines += [f"FAILED, its targets not measured: {what}" for what in results.get("failed", [])]
    lines += ["", "targets (no verdicts: --tiny sizes mean nothing)" if results["tiny"] else "targets"]
    for t in results["targets"]:
        sign = "<=" if t["kind"] == "max" else ">="
        verdict = "" if t["met"] is None else (": met" if t["met"] else ": NOT met")
        lines.append(f"  {t['name']}: {t['value']:.2f} {sign} {t['limit']}{verdict}")
    failed = f"; {counted(len(results['failed']), 'section')} FAILED" if results.get("failed") else ""
    met = sum(t["met"] is True for t in results["targets"])
    verdicts = "no verdicts" if results["tiny"] else f"{met} met"  # (was "0 met" under the line saying there are none)
    lines.append(f"\n{counted(len(results['targets']), 'target')}, {verdicts}{failed}; {results['wall_s']:.0f} s")
    return "\n".join(lines)
