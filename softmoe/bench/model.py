"""The model section: Soft MoE ViT against the dense timm ViT of the same width and depth: inference,
forward+backward and a full AdamW training step, side by side, and each one's peak memory."""

from __future__ import annotations

import gc
import time
from dataclasses import asdict
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..cpu_packing import pack_experts_for_cpu, packing_available
from ..harness.precision import autocast
from .environment import kernel_and_host_counters, peak_memory_bytes, tensor_bytes
from .floors import ceiling_cases
from .shapes import ModelShape
from .timing import interleaved, median, paired_ratio, synchronize


MODEL_KINDS = ("dense", "soft_moe")


def build_benchmark_model(shape: ModelShape, kind: str, device) -> nn.Module:
    """timm's dense ViT or its Soft MoE twin through ``timm.create_model`` and this package's registered
    factories, as a timm user builds them; ``device="meta"`` allocates nothing."""
    import timm

    import softmoe  # noqa: F401 -- registers the soft_moe_vit_* factories with timm

    name = shape.dense_model if kind == "dense" else shape.soft_moe_model
    with torch.device(device):
        return timm.create_model(name, pretrained=False, **shape.create_kwargs(kind))


def model_flops(shape: ModelShape, batch: int) -> Dict[str, Dict[str, int]]:
    """FLOPs of inference and of forward+backward, counted by torch's FlopCounterMode on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = {}
    for name in MODEL_KINDS:
        model = build_benchmark_model(shape, name, "meta")
        x = torch.empty(batch, 3, shape.img_size, shape.img_size, device="meta")
        with FlopCounterMode(display=False) as forward:
            model(x)
        with FlopCounterMode(display=False) as training:
            model(x).sum().backward()
        counts[name] = {"forward": forward.get_total_flops(), "forward_backward": training.get_total_flops()}
    return counts


def make_optimizer(model: nn.Module, kind: str) -> torch.optim.Optimizer:
    if kind == "sgd":  # no optimizer state: where AdamW's (6.9 GB for S/16) does not fit in memory
        return torch.optim.SGD(model.parameters(), lr=1e-4, foreach=True)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for_loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, **flags)


def model_cases(model: nn.Module, optimizer, images, labels, precision: str = "fp32"):
    """Inference and a training step, under ``precision`` as the trainer runs it (softmoe.harness.precision)."""

    def inference():
        with torch.inference_mode(), autocast(images.device, precision):
            model(images)

    def train_step():
        device = images.device
        start_faults, start_system, start_steal = kernel_and_host_counters()  # outside the timed phases (~20 us)
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(images).float(), labels)
        synchronize(device)
        forward_done = time.perf_counter()
        loss.backward()
        synchronize(device)
        backward_done, backward_done_cpu = time.perf_counter(), time.process_time()
        faults, system, steal = kernel_and_host_counters()
        optimizer_start, optimizer_start_cpu = time.perf_counter(), time.process_time()
        optimizer.step()
        synchronize(device)
        return {"forward": forward_done - start, "backward": backward_done - forward_done,
                "forward_backward": backward_done - start, "optimizer": time.perf_counter() - optimizer_start,
                "cpu_forward_backward": backward_done_cpu - start_cpu,
                "cpu_optimizer": time.process_time() - optimizer_start_cpu,
                # the kernel's and the host's share of the step (counters: kept out of the ratios)
                "page_faults_forward_backward": faults - start_faults,
                "system_forward_backward": system - start_system, "steal_forward_backward": steal - start_steal}

    return {"inference": inference, "train_step": train_step}


def benchmark_model(shape: ModelShape, args, device) -> dict:
    """Soft MoE ViT vs dense ViT: inference, forward+backward and the AdamW step, interleaved; then inference again,
    in rounds of its own (:func:`benchmark_inference`, the inference targets)."""
    torch.manual_seed(0)
    flops = model_flops(shape, args.model_batch)
    models = {name: build_benchmark_model(shape, name, device).train() for name in MODEL_KINDS}
    images = torch.randn(args.model_batch, 3, shape.img_size, shape.img_size, device=device)
    labels = torch.randint(0, 1000, (args.model_batch,), device=device)
    optimizers = {name: make_optimizer(model, args.optimizer) for name, model in models.items()}
    cases, rates_of = ceiling_cases(device, args.gemm_size, args.copy_mib, [torch.float32])
    for name, model in models.items():
        for case, fn in model_cases(model, optimizers[name], images, labels).items():
            cases[f"{name}/{case}"] = fn
    times = interleaved(cases, args.model_rounds, args.model_warmup, device)
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
                flops[name]["forward"] / median(series(name, "inference")) / ceilings["gemm_float32_flops_per_s"],
            "forward_backward_fraction_of_gemm_rate":
                flops[name]["forward_backward"] / median(series(name, "forward_backward"))
                / ceilings["gemm_float32_flops_per_s"],
            "seconds": {m: series(name, m) for m in ("inference", "forward", "backward", "optimizer", "train_step")},
            "forward_backward_page_faults": series(name, "page_faults_forward_backward"),
            "forward_backward_system_s": series(name, "system_forward_backward"),
            "forward_backward_host_steal_s": series(name, "steal_forward_backward"),
        }
    metrics = ("inference", "forward_backward", "train_step", "optimizer")
    ratios = {m: paired_ratio(series("soft_moe", m), series("dense", m)) for m in metrics}
    ratios_cpu = {m: paired_ratio(series("soft_moe", m, "cpu"), series("dense", m, "cpu")) for m in metrics}
    optimizer_name = "SGD" if args.optimizer == "sgd" else f"AdamW ({args.optimizer})"
    result = {"shape": asdict(shape), "batch": args.model_batch, "optimizer": optimizer_name,
              "soft_moe_over_dense": ratios, "soft_moe_over_dense_cpu_time": ratios_cpu, "models": per_model,
              "ceilings": {k: v for k, v in ceilings.items() if not k.endswith("seconds")}}
    del optimizers, cases
    for model in models.values():
        model.zero_grad(set_to_none=True)  # room for the packed weights (3.6 GB at S/16)
    gc.collect()
    result["inference_only"] = benchmark_inference(models, images, args)
    del models
    gc.collect()
    return result


def benchmark_inference(models: Dict[str, nn.Module], images: torch.Tensor, args) -> dict:
    """Both models' inference in rounds of their own (``--inference-rounds``), as a process that only infers runs
    it: no training step between the calls to churn the heap and the caches, and more rounds than the training
    steps get, since a round is cheap and a shared host's noise is not (one model's rounds in one run differed by
    up to 1.65x on the 2-core VM of experiments/throughput, session 25). The page faults, system time and host
    steal of every call are kept beside the times (read inside the timed call: about 20 us each). On a CPU with
    oneDNN, also the Soft MoE model with its expert weights packed (``pack_experts_for_cpu``): packing is for a
    process that only infers, as here (a training step would change the weights and have them packed again)."""
    soft_moe = models["soft_moe"]
    packed = images.device.type == "cpu" and packing_available()
    cases = {kind: with_kernel_and_host_counters(model_cases(model, None, images, None)["inference"])
             for kind, model in models.items()}
    if packed:
        pack_experts_for_cpu(soft_moe)
        banks = [m for m in soft_moe.modules() if getattr(m, "cpu_packing", None) is not None]
        packings = [bank.cpu_packing for bank in banks]
        cases.update(_packed_or_not(banks, packings, cases["soft_moe"]))
        cases["soft_moe_packed"]()  # packs the weights, outside the timed rounds
        used = sum(packing.key is not None for packing in packings)  # none below MIN_ROWS rows per expert
    times = interleaved(cases, args.inference_rounds, args.model_warmup, images.device)
    wall = {name: t["total"] for name, t in times.items()}
    cpu = {name: t["cpu"] for name, t in times.items()}
    result = {"rounds": args.inference_rounds, "seconds": {name: median(t) for name, t in wall.items()},
              "round_seconds": wall,
              **{f"{counter}_per_round": {name: t[counter] for name, t in times.items()}
                 for counter in ("page_faults", "system_s", "host_steal_s")},
              "soft_moe_over_dense": paired_ratio(wall["soft_moe"], wall["dense"]),
              "soft_moe_over_dense_cpu_time": paired_ratio(cpu["soft_moe"], cpu["dense"])}
    if packed:
        pack_experts_for_cpu(soft_moe, pack=False)
        result.update({"banks": len(banks), "banks_packed": used,
                       "soft_moe_packed_over_dense": paired_ratio(wall["soft_moe_packed"], wall["dense"]),
                       "soft_moe_packed_over_dense_cpu_time": paired_ratio(cpu["soft_moe_packed"], cpu["dense"]),
                       "soft_moe_packed_over_soft_moe": paired_ratio(wall["soft_moe_packed"], wall["soft_moe"])})
    return result


def with_kernel_and_host_counters(call):
    """``call`` returning the page faults, system seconds and host steal seconds it took as its phases."""

    def with_counters():
        start_faults, start_system, start_steal = kernel_and_host_counters()
        call()
        faults, system, steal = kernel_and_host_counters()
        return {"page_faults": faults - start_faults, "system_s": system - start_system,
                "host_steal_s": steal - start_steal}

    return with_counters


def _packed_or_not(banks: list, packings: list, inference) -> dict:
    """The unpacked and the packed Soft MoE cases: one model, its banks' packing switched on for a call only."""

    def switched(packed: bool):
        def call():
            for bank, packing in zip(banks, packings):
                bank.cpu_packing = packing if packed else None
            try:
                return inference()
            finally:
                for bank in banks:
                    bank.cpu_packing = None
        return call

    return {"soft_moe": switched(False), "soft_moe_packed": switched(True)}


def benchmark_model_bf16(shape: ModelShape, args, device) -> dict:
    """The Soft MoE model in float32 against bf16 autocast (as ``trainer.precision=bf16`` runs it): inference
    and forward+backward, side by side. Without an optimizer: S/16's AdamW state (6.9 GB) and the experts'
    bf16 weight copies (1.7 GB) together do not fit beside float32 training in 24 GiB. The AdamW step,
    float32 in both, is the model section's. Each bf16 call casts the weights once, as the first call after
    an optimizer step does (the copies are dropped after each call)."""
    torch.manual_seed(0)
    model = build_benchmark_model(shape, "soft_moe", device).train()
    images = torch.randn(args.model_batch, 3, shape.img_size, shape.img_size, device=device)
    labels = torch.randint(0, 1000, (args.model_batch,), device=device)
    cases = {}
    for precision in ("fp32", "bf16"):
        def inference(precision=precision):
            with torch.inference_mode(), autocast(device, precision):
                model(images)

        def forward_backward(precision=precision):
            model.zero_grad(set_to_none=True)
            with autocast(device, precision):
                loss = F.cross_entropy(model(images).float(), labels)
            loss.backward()

        for name, fn in (("inference", inference), ("forward_backward", forward_backward)):
            cases[f"{precision}/{name}"] = _dropping_bf16_copies(fn, model) if precision == "bf16" else fn
    times = interleaved(cases, args.model_rounds, args.model_warmup, device)
    result = {"shape": asdict(shape), "batch": args.model_batch}
    for metric in ("inference", "forward_backward"):
        fp32, bf16 = times[f"fp32/{metric}"], times[f"bf16/{metric}"]
        result[metric] = {"float32_s": median(fp32["total"]), "bf16_s": median(bf16["total"]),
                          "float32_over_bf16": paired_ratio(fp32["total"], bf16["total"]),
                          "float32_over_bf16_cpu_time": paired_ratio(fp32["cpu"], bf16["cpu"]),
                          "float32_seconds": fp32["total"], "bf16_seconds": bf16["total"]}
    del cases
    gc.collect()
    return result


def _dropping_bf16_copies(fn, model: nn.Module):
    """``fn``, then the experts' bf16 weight copies dropped (1.7 GB for S/16)."""

    def call():
        try:
            return fn()
        finally:
            for module in model.modules():
                if hasattr(module, "clear_low_precision_copies"):
                    module.clear_low_precision_copies()

    return call


def benchmark_model_memory(shape: ModelShape, args, device) -> dict:
    """Peak memory of inference and of a training step (after a first step created AdamW's state)."""
    torch.manual_seed(0)
    result = {}
    images = torch.randn(args.model_batch, 3, shape.img_size, shape.img_size, device=device)
    labels = torch.randint(0, 1000, (args.model_batch,), device=device)
    for name in MODEL_KINDS:
        model = build_benchmark_model(shape, name, device).train()
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
