"""Soft MoE S/16 against timm's ViT-S/16, float32 inference on CPU, side by side (issue 18's CPU target <= 1.0x).

    python experiments/throughput/cpu_inference.py --batch 32 --rounds 5 --threads 1 --allocator glibc

Both models come from timm.create_model (``vit_small_patch16_224``, ``soft_moe_vit_small``); every round runs
each once in an order that rotates, and the ratio is the median of the per-round ratios (wall clock, and CPU
time, which counts work done rather than waiting for a core on a shared machine).

``--allocator``: ``glibc`` keeps glibc's own malloc settings, as a process that only runs inference has them
(the layer tunes the allocator at its first *training* forward); ``tuned`` calls ``softmoe.tune_allocator()``
first, as in a process that also trains (and in ``python -m softmoe.benchmark``). Both models run under the
same setting. ``--threads 0`` keeps torch's own thread count.

``--blocks`` also times each block's attention and MLP (forward hooks; medians over the calls) and reports the
Soft MoE layers' time against the dense MLPs': where the two models' difference sits.

``--packed`` adds three cases: ``soft_moe_packed``, a copy of the Soft MoE model with its expert weights packed for
oneDNN (``softmoe.pack_experts_for_cpu``), and, like for like, ``dense_all_packed`` and ``soft_moe_all_packed``:
every ``nn.Linear`` of each model packed the same way as well (a helper of this script; the library packs only
its expert banks). Needs memory for a second Soft MoE model and its packed expert weights (11 GB at S/16).
"""

import argparse
import copy
import json
import os
import time
import types

import torch

import softmoe
from softmoe.bench.environment import machine_info
from softmoe.bench.model import MODEL_KINDS, build_benchmark_model, model_cases
from softmoe.bench.shapes import MODEL_SHAPES
from softmoe.bench.timing import at_least, interleaved, median, paired_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=at_least(1), default=32)
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--threads", type=at_least(0), default=1, help="torch threads; 0: torch's own")
    parser.add_argument("--allocator", choices=("glibc", "tuned"), default="glibc")
    parser.add_argument("--shape", default="vit_s16", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--blocks", action="store_true", help="also time each block's attention and MLP")
    parser.add_argument("--packed", action="store_true", help="also the models with weights packed for oneDNN")
    args = parser.parse_args()
    if args.blocks and args.packed:  # the packed cases run the same modules, whose hooks would mix their times in
        parser.error("--blocks and --packed time different things: run them separately")
    if args.threads:
        torch.set_num_threads(args.threads)
    softmoe.runtime.set_auto_tune_allocator(False)  # only --allocator decides (no training forward runs here)
    if args.allocator == "tuned" and not softmoe.tune_allocator():
        parser.error("--allocator tuned needs glibc (Linux)")
    torch.manual_seed(0)
    shape, device = MODEL_SHAPES[args.shape], torch.device("cpu")
    images = torch.randn(args.batch, 3, shape.img_size, shape.img_size)
    load, machine = os.getloadavg(), machine_info(device)
    models = {kind: build_benchmark_model(shape, kind, device).eval() for kind in MODEL_KINDS}
    block_seconds = {kind: time_blocks(model) for kind, model in models.items()} if args.blocks else None
    cases = {kind: model_cases(model, None, images, None)["inference"] for kind, model in models.items()}
    packed_banks = None
    if args.packed:
        packed, packed_banks = packed_cases(models, images)
        cases.update(packed)
    times = interleaved(cases, args.rounds, 1, device)
    result = {"batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "allocator": args.allocator,
              "seconds": {kind: median(times[kind]["total"]) for kind in MODEL_KINDS},
              "soft_moe_over_dense": paired_ratio(times["soft_moe"]["total"], times["dense"]["total"]),
              "soft_moe_over_dense_cpu_time": paired_ratio(times["soft_moe"]["cpu"], times["dense"]["cpu"]),
              "load_average": [load[0], os.getloadavg()[0]], "machine": machine}
    if args.packed:
        result["seconds"].update({name: median(times[name]["total"]) for name in cases if name not in MODEL_KINDS})
        result["packed_banks"] = packed_banks
        result["packed"] = {f"{a}_over_{b}": {"wall": paired_ratio(times[a]["total"], times[b]["total"]),
                                              "cpu": paired_ratio(times[a]["cpu"], times[b]["cpu"])}
                            for a, b in (("soft_moe_packed", "dense"), ("soft_moe_packed", "soft_moe"),
                                         ("soft_moe_all_packed", "dense_all_packed"),
                                         ("dense_all_packed", "dense"))}
    if block_seconds is not None:
        result["blocks"] = summarize_blocks(block_seconds, models["soft_moe"])
    print(json.dumps(result))


def packed_cases(models: dict, images: torch.Tensor):
    """The packed cases (see the module's docstring), each checked against its unpacked model's output first, and
    how many of the Soft MoE model's expert banks ran packed (none below softmoe.cpu_packing.MIN_ROWS rows)."""
    soft_moe = copy.deepcopy(models["soft_moe"])  # the same weights; the unpacked model stays as it is
    softmoe.pack_experts_for_cpu(soft_moe)
    instances = {"dense": models["dense"], "soft_moe": soft_moe}
    switches = {kind: pack_linears(model) for kind, model in instances.items()}
    with torch.inference_mode():  # each unpacked model's output, once, for its packed cases to match
        expected = {kind: models[kind](images) for kind in instances}
    packed = {"soft_moe_packed": ("soft_moe", False), "dense_all_packed": ("dense", True),
              "soft_moe_all_packed": ("soft_moe", True)}
    cases = {}
    for name, (kind, linears_packed) in packed.items():

        def run(kind=kind, linears_packed=linears_packed):
            switches[kind][0] = linears_packed
            with torch.inference_mode():
                output = instances[kind](images)
            switches[kind][0] = False  # the unpacked cases of the same model run as before
            return output

        error = (run() - expected[kind]).abs().max().item()
        if error > 1e-4:
            raise RuntimeError(f"{name} differs from its unpacked model by {error:.2e}")
        cases[name] = run
    banks = [m for m in soft_moe.modules() if isinstance(m, softmoe.BatchedMlp)]
    return cases, f"{sum(bank.cpu_packing.key is not None for bank in banks)} of {len(banks)}"


def pack_linears(model: torch.nn.Module) -> list:
    """Every ``nn.Linear`` in ``model`` reads a oneDNN-packed copy of its weight in inference while the returned
    one-element list holds True (a switch, so that one model serves packed and unpacked cases)."""
    switch = [False]
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            with torch.no_grad():
                packed = torch.ops.mkldnn._reorder_linear_weight(module.weight, 32)

            def forward(self, x, packed=packed, unpacked=module.forward):
                if not switch[0] or torch.is_grad_enabled():
                    return unpacked(x)
                return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")

            module.forward = types.MethodType(forward, module)
    return switch


def time_blocks(model: torch.nn.Module) -> dict:
    """{"<block>.attn" / "<block>.mlp": [seconds of each call]}, filled by forward hooks as the model runs."""
    seconds: dict = {}
    for index, block in enumerate(model.blocks):
        for part in ("attn", "mlp"):
            module, name = getattr(block, part), f"{index}.{part}"

            def start(module, inputs):
                module._started = time.perf_counter()

            def stop(module, inputs, output, name=name):
                seconds.setdefault(name, []).append(time.perf_counter() - module._started)

            module.register_forward_pre_hook(start)
            module.register_forward_hook(stop)
    return seconds


def summarize_blocks(block_seconds: dict, soft_moe_model: torch.nn.Module) -> dict:
    """Median seconds per block part, and the Soft MoE layers' mean against the dense MLPs' in the same blocks."""
    medians = {kind: {name: median(calls) for name, calls in seconds.items()}
               for kind, seconds in block_seconds.items()}
    moe_blocks = [i for i, block in enumerate(soft_moe_model.blocks) if isinstance(block.mlp, softmoe.SoftMoE)]

    def mean(kind, names):
        return sum(medians[kind][name] for name in names) / len(names)

    moe_mlps = [f"{i}.mlp" for i in moe_blocks]
    attns = [f"{i}.attn" for i in range(len(soft_moe_model.blocks))]
    return {"median_s": medians, "moe_blocks": moe_blocks,
            "moe_layer_over_dense_mlp": mean("soft_moe", moe_mlps) / mean("dense", moe_mlps),
            "attention_soft_moe_over_dense": mean("soft_moe", attns) / mean("dense", attns)}


if __name__ == "__main__":
    main()
