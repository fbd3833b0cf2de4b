"""The targets the benchmark checks, and the report it prints."""

from __future__ import annotations

from .environment import GIB
from .profiling import format_model_profile

# name: (limit, "max" or "min", what is measured). Float32 unless named; the first layer shape; wall-clock
# ratios of cases measured side by side (the CPU-time ratio is reported beside each).
TARGETS = {
    "layer_forward_backward_default_env_over_env_variables": (
        1.1, "max", "layer fwd+bwd, default environment / with MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e11"),
    "reference_loop_over_layer_forward_backward": (
        1.5, "min", "reference-style loop / layer, fwd+bwd, default environment"),
    "layer_peak_memory_over_required": (
        1.2, "max", "layer fwd+bwd peak memory / (params + grads + needed activations)"),
    "layer_float32_over_bf16_forward_backward": (
        2.0, "min", "layer fwd+bwd, float32 / bf16 autocast with the weights cast once per step"),
    "layer_forward_backward_over_attainable": (
        1.3, "max", "layer fwd+bwd / its 15 bare matmuls at its own shapes"),
    "model_inference_over_dense": (1.0, "max", "Soft MoE S/16 / dense ViT-S/16, inference"),
    "model_inference_packed_over_dense": (
        1.0, "max", "CPU: Soft MoE S/16, experts packed (pack_experts_for_cpu) / dense ViT-S/16, inference"),
    "model_forward_backward_over_dense": (1.15, "max", "Soft MoE S/16 / dense ViT-S/16, fwd+bwd"),
    "model_train_step_over_dense": (1.35, "max", "Soft MoE S/16 / dense ViT-S/16, fwd+bwd+AdamW"),
    "layer_bf16_fraction_of_matmul_rate": (
        0.6, "min", "GPU only: layer bf16 fwd+bwd FLOP rate / the measured bf16 matmul rate"),
}


def _layer_row(results: dict, shape: str, dtype: str, pass_name: str = "forward_backward"):
    for row in results["layer"]:
        if row["shape"] == shape and row["dtype"] == dtype and row["pass"] == pass_name:
            return row
    return None


def evaluate_targets(results: dict, layer_shape: str) -> dict:
    """Each target that this run measured: value (wall clock), value on CPU time, limit, met."""
    values = {}  # name: (wall-clock value, CPU-time value)
    fp32 = _layer_row(results, layer_shape, "float32")
    bf16 = _layer_row(results, layer_shape, "bfloat16")
    on_gpu = results["machine"]["device"].startswith("cuda")
    if fp32:
        if "soft_moe_over_soft_moe@env_variables" in fp32:
            values["layer_forward_backward_default_env_over_env_variables"] = (
                fp32["soft_moe_over_soft_moe@env_variables"], fp32["soft_moe_over_soft_moe@env_variables_cpu_time"])
        values["reference_loop_over_layer_forward_backward"] = (
            fp32["reference_loop_over_soft_moe"], fp32["reference_loop_over_soft_moe_cpu_time"])
        values["layer_forward_backward_over_attainable"] = (
            fp32["soft_moe_over_attainable"], fp32["soft_moe_over_attainable_cpu_time"])
    if bf16 and "float32_over_cast_per_step" in bf16:
        values["layer_float32_over_bf16_forward_backward"] = (
            bf16["float32_over_cast_per_step"], bf16["float32_over_cast_per_step_cpu_time"])
    if bf16 and on_gpu:
        values["layer_bf16_fraction_of_matmul_rate"] = (bf16["fraction_of_gemm_rate"], None)
    model = results.get("model") or {}
    for metric in ("inference", "forward_backward", "train_step"):
        if metric == "train_step" and not model.get("optimizer", "").startswith("AdamW"):
            continue  # the training-step target is for AdamW
        if metric in model.get("soft_moe_over_dense", {}):
            values[f"model_{metric}_over_dense"] = (model["soft_moe_over_dense"][metric],
                                                    model["soft_moe_over_dense_cpu_time"][metric])
    alone = model.get("inference_only")  # the inference targets: its rounds run no training step between calls
    if alone:
        values["model_inference_over_dense"] = (alone["soft_moe_over_dense"], alone["soft_moe_over_dense_cpu_time"])
    if alone and "soft_moe_packed_over_dense" in alone:
        values["model_inference_packed_over_dense"] = (alone["soft_moe_packed_over_dense"],
                                                       alone["soft_moe_packed_over_dense_cpu_time"])
    for row in results.get("layer_memory", []):
        if row["shape"] == layer_shape and row["impl"] == "soft_moe" and row["peak_over_required"] is not None:
            values["layer_peak_memory_over_required"] = (row["peak_over_required"], None)
    targets = {}
    for name, (limit, kind, what) in TARGETS.items():
        if name in values:
            value, value_cpu_time = values[name]
            targets[name] = {"value": value, "value_cpu_time": value_cpu_time, "limit": limit, "kind": kind,
                             "what": what, "met": value <= limit if kind == "max" else value >= limit}
    return targets


def _layer_report_lines(results: dict) -> list:
    """The layer table, its allocator and dtype variants, and the layer memory lines."""
    lines = []
    lines.append("layer: ms are medians; ratios (wall clock, CPU time in brackets) are medians of per-round ratios; "
                 "attainable = the layer's 15 bare matmuls at its own shapes; roofline = expert weights (and grads) "
                 "at copy bandwidth")
    lines.append(f"{'layer':10} {'dtype':8} {'pass':16} {'SoftMoE ms':>10} {'loop ms':>8} {'loop/SMoE':>12} "
                 f"{'attain ms':>9} {'SMoE/attain':>12} {'roofline ms':>11} {'GEMM GF/s':>9} {'% GEMM':>6}")
    for r in results["layer"]:
        c = r["ceilings"]
        gemm = c[f"gemm_{r['dtype']}_flops_per_s"]
        lines.append(f"{r['shape']:10} {r['dtype']:8} {r['pass']:16} {1e3 * r['soft_moe_s']:10.1f} "
                     f"{1e3 * r['reference_loop_s']:8.1f} "
                     f"{r['reference_loop_over_soft_moe']:5.2f} ({r['reference_loop_over_soft_moe_cpu_time']:4.2f}) "
                     f"{1e3 * r['attainable_s']:9.1f} "
                     f"{r['soft_moe_over_attainable']:5.2f} ({r['soft_moe_over_attainable_cpu_time']:4.2f}) "
                     f"{1e3 * r['weight_roofline_s']:11.1f} {gemm / 1e9:9.1f} {100 * r['fraction_of_gemm_rate']:6.1f}")
    for r in results["layer"]:
        for variant, label in (("env_variables", "with the environment variables"),
                               ("glibc_defaults", "under glibc's own defaults (no tune_allocator)"),
                               ("cast_per_step", "casting its weights to bf16 at every call (once per step)")):
            if f"soft_moe@{variant}_s" in r:
                lines.append(f"{r['shape']} {r['dtype']} {r['pass']}: layer {label}: "
                             f"{1e3 * r[f'soft_moe@{variant}_s']:.1f} ms; default env / this = "
                             f"{r[f'soft_moe_over_soft_moe@{variant}']:.2f} "
                             f"({r[f'soft_moe_over_soft_moe@{variant}_cpu_time']:.2f})")
        if "float32_over_this" in r:
            per_step = (f", {r['float32_over_cast_per_step']:.2f} ({r['float32_over_cast_per_step_cpu_time']:.2f}) "
                        "cast once per step" if "float32_over_cast_per_step" in r else "")
            lines.append(f"{r['shape']} {r['pass']}: float32 / {r['dtype']} = {r['float32_over_this']:.2f} "
                         f"({r['float32_over_this_cpu_time']:.2f}) with the bf16 weights reused{per_step}")
        if "expert_gemm_flops_per_s_by_rows" in r["ceilings"] and r["pass"] == "forward" and r["dtype"] == "float32":
            by_rows = ", ".join(f"{rows} rows {rate / 1e9:.0f}" for rows, rate in
                                r["ceilings"]["expert_gemm_flops_per_s_by_rows"].items())
            lines.append(f"{r['shape']} expert GEMM GFLOP/s by rows per expert: {by_rows}; "
                         f"copy {r['ceilings']['copy_bytes_per_s'] / 1e9:.1f} GB/s")
    for r in results.get("layer_memory", []):
        peak = "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GIB:.3f} GiB"
        ratio = "n/a" if r["peak_over_required"] is None else f"{r['peak_over_required']:.2f}x"
        lines.append(f"memory {r['shape']} {r['impl']:14}: peak {peak}, required (2 x params + saved) "
                     f"{r['required_bytes'] / GIB:.3f} GiB -> {ratio}; "
                     f"saves {r['saved_activation_bytes'] / 2**20:.1f} MiB "
                     f"(needs {r['required_saved_bytes'] / 2**20:.1f} MiB)")
    return lines


def _kernel_and_host_lines(models: dict) -> list:
    """Each model's page faults, system seconds and host steal per fwd+bwd round: a round slower in both clocks with
    the first two up spent its extra time in the kernel mapping fresh memory, with steal up waiting for the host."""
    if not all("forward_backward_host_steal_s" in r for r in models.values()):
        return []  # a JSON written before they were recorded

    def seconds(values):
        return ", ".join(f"{s:.2f}" for s in values)

    per_model = [f"{name} {', '.join(str(n) for n in r['forward_backward_page_faults'])} "
                 f"({seconds(r['forward_backward_system_s'])} s; {seconds(r['forward_backward_host_steal_s'])} s)"
                 for name, r in models.items()]
    return ["fwd+bwd page faults per round (system seconds; host steal seconds): " + "; ".join(per_model)]


def _model_report_lines(results: dict) -> list:
    """The model table, its bf16 comparison and the model memory lines."""
    lines = []
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
        lines += _kernel_and_host_lines(model["models"])
    alone = (model or {}).get("inference_only")
    if alone:
        seconds = alone["seconds"]
        lines.append(f"inference only, in rounds of its own ({alone['rounds']}; the inference targets): dense "
                     f"{seconds['dense']:.3f} s, soft_moe {seconds['soft_moe']:.3f} s; soft_moe / dense "
                     f"{alone['soft_moe_over_dense']:.2f}x ({alone['soft_moe_over_dense_cpu_time']:.2f})")
        if "soft_moe_packed" in seconds:
            lines.append(f"  experts packed for oneDNN (pack_experts_for_cpu; {alone['banks_packed']} of "
                         f"{alone['banks']} expert banks ran packed): {seconds['soft_moe_packed']:.3f} s; packed / "
                         f"dense {alone['soft_moe_packed_over_dense']:.2f}x "
                         f"({alone['soft_moe_packed_over_dense_cpu_time']:.2f}), packed / unpacked "
                         f"{alone['soft_moe_packed_over_soft_moe']:.2f}x")
        steal = {name: sum(values) for name, values in alone["host_steal_s_per_round"].items()}
        faults = {name: max(values) for name, values in alone["page_faults_per_round"].items()}
        lines.append("  host steal seconds over its rounds: " + ", ".join(f"{k} {v:.2f}" for k, v in steal.items())
                     + "; most page faults in a round: " + ", ".join(f"{k} {v}" for k, v in faults.items()))
    bf16 = results.get("model_bf16")
    if bf16:
        lines.append(f"soft_moe {bf16['shape']['name']} float32 / bf16 autocast (as trainer.precision=bf16), batch "
                     f"{bf16['batch']}: " + ", ".join(
                         f"{m} {bf16[m]['float32_s']:.2f} s / {bf16[m]['bf16_s']:.2f} s = "
                         f"{bf16[m]['float32_over_bf16']:.2f}x "
                         f"({bf16[m]['float32_over_bf16_cpu_time']:.2f})" for m in ("inference", "forward_backward")))
    memory = results.get("model_memory")
    if memory and "dense" in memory:
        for name in ("dense", "soft_moe"):
            r = memory[name]
            if r["train_step_peak_bytes"] is not None:
                lines.append(f"memory {name:9}: inference peak {r['inference_peak_bytes'] / GIB:.2f} GiB, "
                             f"train step peak "
                             f"{r['train_step_peak_bytes'] / GIB:.2f} GiB (params {r['param_bytes'] / GIB:.2f}, "
                             f"optimizer state {r['optimizer_state_bytes'] / GIB:.2f})")
    return lines


def format_report(results: dict) -> str:
    m = results["machine"]
    load = " -> ".join(f"{a[0]:.2f}" for a in (m.get("load_average_at_start"), m.get("load_average_at_end")) if a)
    lines = [f"{m['cpu']} ({m.get('cpu_family_model')}; {' '.join(m.get('cpu_flags', []))}; native bf16: "
             f"{m.get('cpu_native_bf16')}) | {m['logical_cpus']} logical CPUs, {m['torch_threads']} torch threads | "
             f"torch {m['torch']}, timm {m['timm']} | device {m['device']} | load average {load}",
             f"allocator: {results.get('allocator', {}).get('summary', '')}", ""]
    lines += _layer_report_lines(results)
    lines += _model_report_lines(results)
    if results.get("model_profile"):
        lines += ["", format_model_profile(results["model_profile"])]
    for profile in results.get("profile") or []:
        lines += ["", profile]
    compiled = results.get("compile")
    if isinstance(compiled, list):
        lines.append("")
        for r in compiled:
            lines.append(f"compile {r['shape']} {r['pass']:16}: eager {1e3 * r['eager_s']:.1f} ms, "
                         f"compiled {1e3 * r['compiled_s']:.1f} ms ({r['compiled_over_eager']:.2f}x), "
                         f"compile {r['compile_s']:.1f} s")
    if results.get("targets"):
        lines.append("")
        tiny = results["config"].get("tiny")
        if tiny:
            lines.append("targets: no verdicts (--tiny: sizes too small for the numbers to mean anything)")
        for name, t in results["targets"].items():
            sign = "<=" if t["kind"] == "max" else ">="
            cpu_time = "" if t["value_cpu_time"] is None else f" (CPU time: {t['value_cpu_time']:.2f})"
            verdict = "" if tiny else (": met" if t["met"] else ": NOT met")
            lines.append(f"target {name}: {t['value']:.2f}{cpu_time} {sign} {t['limit']}{verdict}  [{t['what']}]")
    return "\n".join(lines)
