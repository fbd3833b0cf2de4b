"""Soft MoE S/16 against timm's ViT-S/16, float32 inference on CPU, side by side (issue 18's CPU target <= 1.0x).

    python experiments/throughput/cpu_inference.py --batch 32 --rounds 5 --threads 1 --allocator glibc

Both models come from timm.create_model (``vit_small_patch16_224``, ``soft_moe_vit_small``); every round runs
each once in an order that rotates, and the ratio is the median of the per-round ratios (wall clock, and CPU
time, which counts work done rather than waiting for a core on a shared machine).

``--allocator``: ``glibc`` keeps glibc's own malloc settings, as a process that only runs inference has them
(the layer tunes the allocator at its first *training* forward); ``tuned`` calls ``softmoe.tune_allocator()``
first, as in a process that also trains (and in ``python -m softmoe.benchmark``). Both models run under the
same setting. ``--threads 0`` keeps torch's own thread count.
"""

import argparse
import json
import os

import torch

import softmoe
from softmoe.bench.environment import machine_info
from softmoe.bench.model import MODEL_KINDS, build_benchmark_model, model_cases
from softmoe.bench.shapes import MODEL_SHAPES
from softmoe.bench.timing import interleaved, median, paired_ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 0: torch's own")
    parser.add_argument("--allocator", choices=("glibc", "tuned"), default="glibc")
    parser.add_argument("--shape", default="vit_s16", choices=sorted(MODEL_SHAPES))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    softmoe.runtime.set_auto_tune_allocator(False)  # only --allocator decides (no training forward runs here)
    if args.allocator == "tuned" and not softmoe.tune_allocator():
        parser.error("--allocator tuned needs glibc (Linux)")
    torch.manual_seed(0)
    shape, device = MODEL_SHAPES[args.shape], torch.device("cpu")
    images = torch.randn(args.batch, 3, shape.img_size, shape.img_size)
    load, machine = os.getloadavg(), machine_info(device)
    cases = {kind: model_cases(build_benchmark_model(shape, kind, device).eval(), None, images, None)["inference"]
             for kind in MODEL_KINDS}
    times = interleaved(cases, args.rounds, 1, device)
    result = {"batch": args.batch, "rounds": args.rounds, "threads": torch.get_num_threads(),
              "allocator": args.allocator,
              "seconds": {kind: median(times[kind]["total"]) for kind in MODEL_KINDS},
              "soft_moe_over_dense": paired_ratio(times["soft_moe"]["total"], times["dense"]["total"]),
              "soft_moe_over_dense_cpu_time": paired_ratio(times["soft_moe"]["cpu"], times["dense"]["cpu"]),
              "load_average": [load[0], os.getloadavg()[0]], "machine": machine}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
