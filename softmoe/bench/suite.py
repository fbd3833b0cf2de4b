"""``python -m softmoe.benchmark --suite gpu``: every target of issue 18, measured as the trainer trains, in
one command, each printed as met or NOT met.

Setup (``trainer=gpu``): bf16 autocast over float32 master weights, gradients set to None each step, fused
AdamW, the expert banks' bf16 weight copies made once per optimizer step; eager and ``torch.compile``;
batch 256 at 224 px; models built by timm's ``create_model`` from this package's registered factories
(``soft_moe_vit_small`` against ``vit_small_patch16_224``, ...), with the same arguments for both.

Sections, each side by side in interleaved rounds (:func:`.timing.interleaved`):

* ``peak``: the bf16 matmul rate of an 8192³ product and the copy bandwidth;
* ``layers``: the layer at S/16 and B/16 shapes, eager and compiled (reading its held bf16 copies, as the model's
  compiled forward does: :class:`.layer.ReadingHeldCopies`), against its bare matmuls
  (:func:`.floors.attainable_cases`) and timm's ``Mlp`` on the same tokens, each also against peak; and the
  experts' two GEMMs through ``torch.bmm`` against ``torch._grouped_mm`` (:func:`.floors.expert_bank_cases`);
* ``models``: Soft MoE against dense at S/16 and B/16: the training step (its forward+backward and its
  optimizer), eager and compiled, beside its floor (:mod:`.step_floor`); inference under autocast and with
  the model cast to bf16;
* ``huge``: Soft MoE B/16 against ViT-H/14 in inference (the paper: 5.7x faster);
* ``optimizer``: AdamW's step alone at S/16, float32 moments (fused) against bf16 moments
  (:mod:`.optimizer_step`), reported without a target;
* ``profile``: where the time goes, by op category (:func:`.profiling.profile_calls`): the S/16 layer's fwd+bwd
  eager and compiled, and S/16's dense and Soft MoE training steps, eager; reported without a target.

``--tiny`` runs the same code at toy sizes (any device; no verdicts): the tests use it on CPU.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from .floors import attainable_cases, ceiling_cases, expert_bank_cases
from .layer import ReadingHeldCopies, build_layer, layer_pass_cases
from .model import build_benchmark_model, make_optimizer, model_cases, model_flops
from .optimizer_step import optimizer_section
from .profiling import profile_calls
from .shapes import LAYER_SHAPES, MODEL_SHAPES, LayerShape, ModelShape
from .step_floor import parameter_counts, step_floor
from .timing import interleaved, median, paired_ratio

BF16 = torch.bfloat16


@dataclass(frozen=True)
class ModelPair:
    """A dense timm ViT and its Soft MoE twin (:class:`.shapes.ModelShape`) and the limits on their ratios."""

    label: str
    shape: ModelShape
    forward_backward_limit: float  # Soft MoE / dense
    inference_limit: float


TINY = MODEL_SHAPES["tiny"]


@dataclass(frozen=True)
class SuiteConfig:
    layer_shapes: Dict[str, LayerShape]
    models: List[ModelPair]
    huge: ModelPair  # dense = ViT-H/14, soft_moe = Soft MoE B/16; limit = images/s ratio
    batch: int
    gemm_size: int
    copy_mib: int
    rounds: int
    warmup: int
    compile_backend: Optional[str]  # None: eager only
    budget_s: float  # compiled cases after this many seconds are skipped, said so in the report

    @classmethod
    def from_args(cls, args) -> "SuiteConfig":
        backend = None if args.suite_compile == "none" else args.suite_compile
        if args.tiny:
            huge = ModelShape("tiny_huge", "vit_huge_patch14_224", "soft_moe_vit_base", 32, TINY.overrides,
                              TINY.moe_kwargs)
            return cls({"tiny": LAYER_SHAPES["tiny"]}, [ModelPair("tiny", TINY, 1.10, 1.05)],
                       ModelPair("tiny", huge, 0.0, 5.7),
                       batch=2, gemm_size=128, copy_mib=4, rounds=1, warmup=1,
                       compile_backend=backend, budget_s=args.suite_budget_s)
        return cls(
            {"S/16": LayerShape("S/16", batch=256, tokens=197, dim=384, hidden=1536, num_experts=128,
                                slots_per_expert=1),
             "B/16": LayerShape("B/16", batch=128, tokens=197, dim=768, hidden=3072, num_experts=128,
                                slots_per_expert=1)},
            [ModelPair("S/16", MODEL_SHAPES["vit_s16"], 1.10, 1.05),
             ModelPair("B/16", MODEL_SHAPES["vit_b16"], 1.05, 1.00)],
            ModelPair("H/14 vs B/16", ModelShape("vit_h14_vs_b16", "vit_huge_patch14_224", "soft_moe_vit_base", 224),
                      0.0, 5.7),
            batch=256, gemm_size=8192, copy_mib=1024, rounds=args.suite_rounds, warmup=1,
            compile_backend=backend, budget_s=args.suite_budget_s)


class Suite:
    """One run of the suite: its configuration, device, start time and the peak rates, shared by the sections."""

    def __init__(self, config: SuiteConfig, device: torch.device) -> None:
        self.config, self.device, self.started = config, device, time.perf_counter()
        self.skipped: List[str] = []  # what was not measured, and why: the report lists it
        self.failed: List[str] = []  # sections that raised (:func:`required_section`)
        self.peak: dict = {}

    def compile(self, module: nn.Module, what: str) -> Optional[nn.Module]:
        """``torch.compile(module)``, or None (said so in the report) past the time budget or without a backend."""
        if self.config.compile_backend is None or self.past_budget(what):
            return None
        return torch.compile(module, backend=self.config.compile_backend)

    def past_budget(self, what: str) -> bool:
        """Whether compiling ``what`` now would pass the time budget (then said so in the report)."""
        if time.perf_counter() - self.started <= self.config.budget_s:
            return False
        self.skipped.append(f"{what} compiled: past the {self.config.budget_s:.0f} s budget")
        return True

    def measure_peak(self) -> dict:
        cases, rates_of = ceiling_cases(self.device, self.config.gemm_size, self.config.copy_mib, [BF16])
        rates = rates_of(interleaved(cases, max(3, self.config.rounds), 1, self.device))
        self.peak = {"matmul_bf16_flops_per_s": rates["gemm_bfloat16_flops_per_s"], "gemm_size": rates["gemm_size"],
                     "copy_bytes_per_s": rates["copy_bytes_per_s"]}
        return self.peak

    def layer(self, shape: LayerShape) -> dict:
        """The layer eager and compiled against its bare matmuls and timm's ``Mlp`` on the same tokens, bf16."""
        from timm.layers import Mlp

        torch.manual_seed(0)
        layer = build_layer(shape, self.device)
        modules = {"eager": layer, "compiled": self.compile(ReadingHeldCopies(layer), f"layer {shape.name}"),
                   "mlp": Mlp(shape.dim, shape.hidden).to(self.device)}
        x = torch.randn(shape.batch, shape.tokens, shape.dim, device=self.device, requires_grad=True)
        grad = torch.randn_like(x)
        bare, _ = attainable_cases(shape, self.device, BF16)
        cases = {f"matmuls/{pass_name}": fn for pass_name, fn in bare.items()}
        experts, grouped_mm_missing = expert_bank_cases(shape, self.device, BF16)  # bmm or torch._grouped_mm?
        cases.update(experts)
        for impl, module in modules.items():
            if module is not None:  # every call starts as after an optimizer step: the bf16 copies are recast
                for pass_name, fn in layer_pass_cases(module, x, grad, BF16, self.device, optimizer_step=True).items():
                    cases[f"{impl}/{pass_name}"] = fn
        cases.update(self._per_call_floor_cases())
        times = interleaved(cases, self.config.rounds, self.config.warmup, self.device)
        row = {"shape": shape.name, "batch": shape.batch, "tokens": shape.tokens, "dim": shape.dim,
               "hidden": shape.hidden, "num_slots": shape.num_slots}
        row["experts_bmm_s"] = median(times["experts_bmm"]["total"])
        if "experts_grouped_mm" in times:
            row["experts_grouped_mm_s"] = median(times["experts_grouped_mm"]["total"])
            row["experts_grouped_mm_over_bmm"] = paired_ratio(times["experts_grouped_mm"]["total"],
                                                              times["experts_bmm"]["total"])
        else:
            row["experts_grouped_mm_missing"] = grouped_mm_missing
        for pass_name in ("forward", "forward_backward"):
            flops = shape.flops(pass_name == "forward_backward")
            bare_times = times[f"matmuls/{pass_name}"]["total"]
            row[f"matmuls_{pass_name}_s"] = median(bare_times)
            row[f"matmuls_{pass_name}_fraction_of_peak"] = self._fraction_of_peak(flops, bare_times)
            row[f"mlp_{pass_name}_s"] = median(times[f"mlp/{pass_name}"]["total"])
            for impl in ("eager", "mlp"):  # a call's floor: the same code at toy sizes, next to no arithmetic
                row[f"{impl}_{pass_name}_per_call_floor_s"] = median(times[f"{impl}_toy/{pass_name}"]["total"])
            for impl in ("eager", "compiled"):
                if f"{impl}/{pass_name}" not in times:
                    continue
                layer_times = times[f"{impl}/{pass_name}"]["total"]
                row[f"{impl}_{pass_name}_s"] = median(layer_times)
                row[f"{impl}_{pass_name}_over_matmuls"] = paired_ratio(layer_times, bare_times)
                row[f"{impl}_{pass_name}_over_mlp"] = paired_ratio(layer_times, times[f"mlp/{pass_name}"]["total"])
                row[f"{impl}_{pass_name}_fraction_of_peak"] = self._fraction_of_peak(flops, layer_times)
        return row

    def _per_call_floor_cases(self) -> Dict[str, Callable]:
        """The layer (eager) and timm's ``Mlp`` at toy sizes, timed beside the real ones: what a call costs in
        dispatch and kernel launches alone. Each call is timed to the device's end, so where this floor nears a
        layer time, that time measures the host, not the GPU (in a model the host runs ahead of the device)."""
        from timm.layers import Mlp

        toy = LAYER_SHAPES["tiny"]
        x = torch.randn(toy.batch, toy.tokens, toy.dim, device=self.device, requires_grad=True)
        modules = {"eager_toy": build_layer(toy, self.device), "mlp_toy": Mlp(toy.dim, toy.hidden).to(self.device)}
        return {f"{impl}/{pass_name}": fn for impl, module in modules.items() for pass_name, fn in
                layer_pass_cases(module, x, torch.randn_like(x), BF16, self.device, optimizer_step=True).items()}

    def _fraction_of_peak(self, flops: int, seconds: List[float]) -> float:
        return flops / median(seconds) / self.peak["matmul_bf16_flops_per_s"]

    def _inputs(self, shape: ModelShape):
        images = torch.randn(self.config.batch, 3, shape.img_size, shape.img_size, device=self.device)
        return images, torch.randint(0, 10, (self.config.batch,), device=self.device)

    def model_pair(self, pair: ModelPair) -> dict:
        """Dense against Soft MoE: the training step eager and compiled, then inference under autocast and
        cast to bf16; each model's step beside its floor."""
        torch.manual_seed(0)
        images, labels = self._inputs(pair.shape)
        models = {kind: build_benchmark_model(pair.shape, kind, self.device).train() for kind in ("dense", "soft_moe")}
        optimizers = {kind: make_optimizer(model, "fused") for kind, model in models.items()}
        cases = {}
        for kind, model in models.items():
            variants = {"eager": model, "compiled": self.compile(model, f"{pair.label} {kind} training step")}
            for variant, module in variants.items():
                if module is not None:
                    cases[f"{kind}/train_{variant}"] = model_cases(module, optimizers[kind], images, labels, "bf16")[
                        "train_step"]
                    cases[f"{kind}/inference_{variant}"] = model_cases(module, None, images, labels, "bf16")[
                        "inference"]
        times = interleaved(cases, self.config.rounds, self.config.warmup, self.device)
        result = {"label": pair.label, "dense": pair.shape.dense_model, "soft_moe": pair.shape.soft_moe_model,
                  "batch": self.config.batch,
                  "forward_backward_limit": pair.forward_backward_limit, "inference_limit": pair.inference_limit,
                  **self._step_figures(pair, models, times)}
        del optimizers, cases
        for model in models.values():  # as deployed: the weights themselves in bf16
            model.zero_grad(set_to_none=True)
            for module in model.modules():  # the autocast copies have no use once the weights are bf16
                if hasattr(module, "clear_low_precision_copies"):
                    module.clear_low_precision_copies()
            model.eval().to(BF16)
        cast = {f"{kind}/inference_bf16": _bf16_inference(model, images) for kind, model in models.items()}
        times.update(interleaved(cast, self.config.rounds, self.config.warmup, self.device))
        for metric in ("inference_eager", "inference_compiled", "inference_bf16"):
            if f"dense/{metric}" not in times or f"soft_moe/{metric}" not in times:
                continue
            dense, soft_moe = times[f"dense/{metric}"]["total"], times[f"soft_moe/{metric}"]["total"]
            result[f"{metric}_images_per_s"] = {"dense": self.config.batch / median(dense),
                                                "soft_moe": self.config.batch / median(soft_moe)}
            result[f"{metric}_soft_moe_over_dense"] = paired_ratio(soft_moe, dense)
        del models
        _release(self.device)
        return result

    def _step_figures(self, pair: ModelPair, models: Dict[str, nn.Module], times) -> dict:
        """Per model and variant: step, forward+backward and optimizer seconds, the floor, and the ratios."""
        out_dtype_grads = self.device.type == "cuda"  # ExpertLinear: float32 weight grads straight from the GEMM
        figures: dict = {"floor": {}, "step": {}}
        flops = model_flops(pair.shape, self.config.batch)
        for kind, model in models.items():
            counts = parameter_counts(model, out_dtype_grads)
            floor = step_floor(counts, flops[kind]["forward_backward"], self.peak["matmul_bf16_flops_per_s"],
                               self.peak["copy_bytes_per_s"])
            figures["floor"][kind] = {"parameters": vars(counts), **floor.as_dict()}
            for variant in ("eager", "compiled"):
                name = f"{kind}/train_{variant}"
                if name in times:
                    t = times[name]
                    figures["step"][f"{kind}/{variant}"] = {
                        "step_s": median(t["total"]), "forward_backward_s": median(t["forward_backward"]),
                        "optimizer_s": median(t["optimizer"]), "step_over_floor": median(t["total"]) / floor.seconds}
        for variant in ("eager", "compiled"):
            dense, soft_moe = (f"{kind}/train_{variant}" for kind in ("dense", "soft_moe"))
            if dense in times and soft_moe in times:
                figures[f"forward_backward_{variant}_soft_moe_over_dense"] = paired_ratio(
                    times[soft_moe]["forward_backward"], times[dense]["forward_backward"])
                figures[f"train_step_{variant}_soft_moe_over_dense"] = paired_ratio(
                    times[soft_moe]["total"], times[dense]["total"])
        return figures

    def profile(self) -> dict:
        """Where the time of what remains goes (torch.profiler, by op category): the first layer shape's fwd+bwd
        eager and compiled, and the first model pair's training steps, eager. Reported without a target."""
        shape, pair = next(iter(self.config.layer_shapes.values())), self.config.models[0]
        cases = []
        torch.manual_seed(0)
        layer = build_layer(shape, self.device)
        x = torch.randn(shape.batch, shape.tokens, shape.dim, device=self.device, requires_grad=True)
        compiled = self.compile(ReadingHeldCopies(layer), f"profile of layer {shape.name}")
        for impl, module in (("eager", layer), ("compiled", compiled)):
            if module is not None:
                step = layer_pass_cases(module, x, torch.randn_like(x), BF16, self.device,
                                        optimizer_step=True)["forward_backward"]
                cases.append(_profiled(f"layer {shape.name} {impl} fwd+bwd", step, self.device))
        del layer, compiled, x
        images, labels = self._inputs(pair.shape)
        for kind in ("dense", "soft_moe"):
            model = build_benchmark_model(pair.shape, kind, self.device).train()
            step = model_cases(model, make_optimizer(model, "fused"), images, labels, "bf16")["train_step"]
            cases.append(_profiled(f"{pair.label} {kind} training step eager", step, self.device))
            del model, step
            _release(self.device)
        return {"cases": cases}

    def huge(self) -> dict:
        """Soft MoE B/16 against ViT-H/14, inference under bf16 autocast, eager: how many times faster."""
        pair = self.config.huge
        torch.manual_seed(0)
        images, labels = self._inputs(pair.shape)
        models = {kind: build_benchmark_model(pair.shape, kind, self.device).eval() for kind in ("dense", "soft_moe")}
        cases = {kind: model_cases(model, None, images, labels, "bf16")["inference"] for kind, model in models.items()}
        times = interleaved(cases, self.config.rounds, self.config.warmup, self.device)
        result = {"dense": pair.shape.dense_model, "soft_moe": pair.shape.soft_moe_model, "batch": self.config.batch,
                  "images_per_s": {kind: self.config.batch / median(times[kind]["total"]) for kind in models},
                  "soft_moe_speedup": paired_ratio(times["dense"]["total"], times["soft_moe"]["total"]),
                  "limit": pair.inference_limit}
        del models, cases
        _release(self.device)
        return result


def optional_section(suite: Suite, name: str, measure: Callable[[], dict]) -> Optional[dict]:
    """``measure()``, or None with the error listed under ``skipped``: a section reported without a target must
    not cost the figures measured before it."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 -- said in the report instead
        suite.skipped.append(f"{name} section: {type(error).__name__}: {error}")
        return None


def required_section(suite: Suite, name: str, measure: Callable[[], dict]) -> Optional[dict]:
    """``measure()``, or None with the error listed under ``failed``: one section that fails (out of GPU memory,
    say, for B/16's 66 GB of weights, gradients and moments on an 80 GB card) must not cost the others' figures
    on a GPU lent for minutes. Its targets go unreported, and the command exits non-zero."""
    try:
        return measure()
    except Exception as error:  # noqa: BLE001 -- said in the report, and in the exit status
        message = str(error).strip().splitlines()
        suite.failed.append(f"{name}: {type(error).__name__}: {message[0] if message else ''}")
    _release(suite.device)  # what the failed section held, now that its frames are gone
    return None


def _profiled(what: str, step: Callable[[], object], device: torch.device, iterations: int = 2) -> dict:
    step()  # warm-up: the first call allocates and (compiled) compiles
    return {"what": what, **profile_calls(step, device, iterations, rows=12)}


def _bf16_inference(model: nn.Module, images: torch.Tensor):
    images = images.to(BF16)

    def inference():
        with torch.inference_mode():
            model(images)

    return inference


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_suite(args, command: str, progress: Optional[Callable[[str, dict, dict], None]] = None) -> dict:
    """Every section of the suite, then the targets; ``results["targets"]`` lists each with met / NOT met.

    ``progress(section, its figures, results so far)`` is called after each section that measured something,
    so a run cut short (a timeout on a lent GPU) still leaves what it measured."""
    from .environment import machine_info
    from .suite_report import suite_targets

    device = torch.device(args.device)
    config = SuiteConfig.from_args(args)
    suite = Suite(config, device)
    results = {"command": command, "suite": args.suite, "tiny": bool(args.tiny), "machine": machine_info(device),
               "compile_backend": config.compile_backend, "peak": suite.measure_peak(), "layers": [], "models": [],
               "skipped": suite.skipped, "failed": suite.failed}
    # (name, key in the results, measure, runner): optimizer and profile have no target, so their failure is a skip
    sections = [(f"layer {name}", "layers", lambda shape=shape: suite.layer(shape), required_section)
                for name, shape in config.layer_shapes.items()]
    sections += [(f"models {pair.label}", "models", lambda pair=pair: suite.model_pair(pair), required_section)
                 for pair in config.models]
    sections += [("huge", "huge", suite.huge, required_section),
                 ("optimizer", "optimizer", lambda: optimizer_section(suite, config.models[0].shape), optional_section),
                 ("profile", "profile", suite.profile, optional_section)]
    for name, key, measure, run_section in sections:
        figures = run_section(suite, name, measure)
        if figures is None:
            continue
        if isinstance(results.get(key), list):  # one row per layer shape or model pair
            results[key].append(figures)
        else:
            results[key] = figures
        if progress is not None:
            progress(key, figures, results)
    _release(device)
    results["targets"] = suite_targets(results, verdicts=not args.tiny)
    results["wall_s"] = time.perf_counter() - suite.started
    return results
