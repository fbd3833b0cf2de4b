"""Why Soft MoE's expert GEMMs run slower than the dense MLP's on CPU at inference batch 32: the 32-row product
against the same product with its weight already in cache, and against a tall product (issue 18, session 8).

    python experiments/throughput/expert_gemm_residency.py --threads 1

Times fc1's shape (x [32, 384] @ W [384, 1536] per expert, 128 experts) four ways, median of --rounds:
``streamed`` (torch.bmm over 128 distinct weights: every weight comes from memory, as in the model),
``loop`` (one torch.mm per expert, same weights), ``resident`` (128 torch.mm on one weight, which stays in
cache) and ``tall`` (one weight, all 4,096 rows in one product). Prints one JSON line of GFLOP/s, and the rate
at which the same threads read the 128 weights (``weights.sum()``, 302 MB): with the tall rate, the two floors
of the streamed product, reading its weights and doing its FLOPs.
"""

import argparse
import json
import os
import time

import torch

from softmoe.bench.environment import machine_info
from softmoe.bench.shapes import LAYER_SHAPES
from softmoe.bench.timing import at_least

# fc1 of the benchmark's ViT-S/16 layer at inference batch 32 (one slot per expert): 32 rows per expert
S16 = LAYER_SHAPES["vit_s16"]
ROWS, DIM, HIDDEN = S16.batch * S16.slots_per_expert, S16.dim, S16.hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--rounds", type=at_least(1), default=7)
    parser.add_argument("--experts", type=at_least(1), default=S16.num_experts,
                        help="fewer: a quick check of the script, not the model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    experts = args.experts
    x, weights = torch.randn(experts, ROWS, DIM), torch.randn(experts, DIM, HIDDEN)
    out = torch.empty(experts, ROWS, HIDDEN)
    one = weights[:1].contiguous()
    tall_x, tall_out = x.view(-1, DIM), out.view(-1, HIDDEN)

    def streamed():
        torch.bmm(x, weights, out=out)

    def loop():
        for i in range(experts):
            torch.mm(x[i], weights[i], out=out[i])

    def resident():
        for i in range(experts):
            torch.mm(x[i], one[0], out=out[i])

    def tall():
        torch.mm(tall_x, one[0], out=tall_out)

    def read():
        weights.sum()

    def median_seconds(case):
        case()
        seconds = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            case()
            seconds.append(time.perf_counter() - start)
        return sorted(seconds)[len(seconds) // 2]

    flops = 2 * experts * ROWS * DIM * HIDDEN
    rates = {case.__name__: flops / median_seconds(case) / 1e9 for case in (streamed, loop, resident, tall)}
    weight_bytes = weights.numel() * weights.element_size()
    read_seconds = median_seconds(read)
    print(json.dumps({"gflop_per_s": rates, "weight_read_gb_per_s": weight_bytes / read_seconds / 1e9,
                      "streamed_ms": 1e3 * flops / rates["streamed"] / 1e9,
                      "floors_ms": {"read_weights": 1e3 * read_seconds,
                                    "flops_at_tall_rate": 1e3 * flops / rates["tall"] / 1e9},
                      "threads": args.threads, "rounds": args.rounds, "experts": experts,
                      "load_average": [load[0], os.getloadavg()[0]], "machine": machine_info(torch.device("cpu"))}))


if __name__ == "__main__":
    main()
