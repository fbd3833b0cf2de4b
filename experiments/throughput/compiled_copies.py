"""Compiled inference under bf16 autocast: Soft MoE reading its expert banks' bf16 copies (held eagerly before the
graph, the default) against casting every expert weight inside the graph at every call (the earlier behaviour,
``compiled_reads_expert_copies = False``), beside timm's dense ViT compiled the same way; side by side.

    python experiments/throughput/compiled_copies.py --batch 32 --rounds 5

One Soft MoE model serves both Soft MoE cases (the attribute is read when dynamo traces, so each setting has its
compiled graph and none recompiles after the warm-up round); every round runs each case once in an order that
rotates, and each ratio is the median of the per-round ratios. Each call moves, besides the activations, the
weights it reads: the cast reads 4 and writes 2 bytes per expert parameter, the held copy is read at 2.
"""

import argparse
import json
import os

import torch

import softmoe
from softmoe.bench.cli import compile_backend_problem
from softmoe.bench.environment import machine_info
from softmoe.bench.model import build_benchmark_model
from softmoe.bench.shapes import MODEL_SHAPES
from softmoe.bench.timing import at_least, interleaved, median, paired_ratio


def compiled_inference(compiled, images, model=None, reads_copies=None):
    def call():
        if model is not None:
            model.compiled_reads_expert_copies = reads_copies
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16):
            compiled(images)
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=at_least(1), default=32)
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--shape", default="vit_s16", choices=sorted(MODEL_SHAPES))
    parser.add_argument("--backend", default="inductor", help="torch.compile's backend (the tests: aot_eager)")
    parser.add_argument("--out", help="also write the result here as JSON")
    args = parser.parse_args()
    problem = compile_backend_problem(args.backend)
    if problem:  # was: InvalidBackend's traceback once the models were built
        parser.error(f"--backend {problem}")
    softmoe.tune_allocator()  # as every command of the project does at start-up
    torch.manual_seed(0)
    shape, device = MODEL_SHAPES[args.shape], torch.device("cpu")
    images = torch.randn(args.batch, 3, shape.img_size, shape.img_size)
    load, machine = os.getloadavg(), machine_info(device)
    dense = build_benchmark_model(shape, "dense", device).eval()
    soft_moe = build_benchmark_model(shape, "soft_moe", device).eval()
    compiled_dense, compiled_soft_moe = (torch.compile(model, backend=args.backend) for model in (dense, soft_moe))
    cases = {"dense": compiled_inference(compiled_dense, images),
             "soft_moe_reads_copies": compiled_inference(compiled_soft_moe, images, soft_moe, True),
             "soft_moe_casts_in_graph": compiled_inference(compiled_soft_moe, images, soft_moe, False)}
    times = interleaved(cases, args.rounds, 1, device)  # the warm-up round compiles
    soft_moe.compiled_reads_expert_copies = True
    total = {name: times[name]["total"] for name in cases}
    result = {"batch": args.batch, "rounds": args.rounds, "shape": args.shape, "backend": args.backend,
              "threads": torch.get_num_threads(),
              "seconds": {name: median(seconds) for name, seconds in total.items()},
              "casts_in_graph_over_reads_copies": paired_ratio(total["soft_moe_casts_in_graph"],
                                                               total["soft_moe_reads_copies"]),
              "soft_moe_over_dense": {name: paired_ratio(total[name], total["dense"])
                                      for name in ("soft_moe_reads_copies", "soft_moe_casts_in_graph")},
              "rounds_s": total, "load_average": [load[0], os.getloadavg()[0]], "machine": machine}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
