"""Can another CPU GEMM kernel run Soft MoE's 32-row expert products faster than torch.bmm (issue 18, session 11)?

    python experiments/throughput/expert_gemm_kernels.py --threads 2

At inference batch 32 each of the 128 experts multiplies 32 slots by its own weights, fc1's shape x [32, 384] @
W [384, 1536]: a short product whose weight streams from memory (expert_gemm_residency.py). This times that
product, interleaved round by round, through every CPU kernel torch can reach without a new dependency:

- ``bmm``: what the layer does (``torch.bmm`` over the stacked weights; MKL's batched GEMM);
- ``mkl_packed``: MKL's GEMM on weights packed once ahead of time (``torch.ops.mkl._mkl_linear``, what
  inductor's freezing uses), one call per expert, so no call repacks a weight;
- ``onednn``: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``), one call per expert;
- ``onednn_packed``: the same on weights reordered once ahead of time (``torch.ops.mkldnn._reorder_linear_weight``),
  as ``softmoe.pack_experts_for_cpu`` runs the experts (session 15);
- ``inductor_cpp``: ``torch.compile`` with max-autotune and freezing, whose C++ GEMM template packs the weights at
  compile time and generates its own micro-kernel (left out with ``--no-compile``: it compiles for about 10 s).

Each case's output is checked against bmm's before it is timed. Prints one JSON line: the median ms and GFLOP/s of
each, each case's time over bmm's (median of the per-round ratios), the load average before and after.
"""

import argparse
import json
import os
import time

import torch
import torch._inductor.config as inductor_config

from softmoe.bench.environment import machine_info
from softmoe.bench.shapes import LAYER_SHAPES
from softmoe.bench.timing import at_least, interleaved, median, paired_ratio

# fc1 of the benchmark's ViT-S/16 layer at inference batch 32 (one slot per expert): 32 rows per expert
S16 = LAYER_SHAPES["vit_s16"]
ROWS, DIM, HIDDEN = S16.batch * S16.slots_per_expert, S16.dim, S16.hidden


class StackedProduct(torch.nn.Module):
    """x @ W per expert, W a parameter: what inductor's freezing turns into a constant it can pack."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = torch.nn.Parameter(weights, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.bmm(x, self.weights)


def per_expert_cases(x: torch.Tensor, weights: torch.Tensor) -> dict:
    """The per-expert kernels torch exposes here, by name (each a function of no arguments)."""
    experts = weights.shape[0]
    linear_weights = weights.transpose(1, 2).contiguous()  # [n, out, in]: nn.Linear's layout, which both take
    cases = {}
    if torch.backends.mkl.is_available():
        packed = [torch.ops.mkl._mkl_reorder_linear_weight(linear_weights[e], ROWS) for e in range(experts)]
        cases["mkl_packed"] = lambda: [torch.ops.mkl._mkl_linear(x[e], packed[e], linear_weights[e], None, ROWS)
                                       for e in range(experts)]
    if torch.backends.mkldnn.is_available():
        cases["onednn"] = lambda: [torch.ops.mkldnn._linear_pointwise(x[e], linear_weights[e], None, "none", [], "")
                                   for e in range(experts)]
        reordered = [torch.ops.mkldnn._reorder_linear_weight(linear_weights[e], ROWS) for e in range(experts)]
        cases["onednn_packed"] = lambda: [torch.ops.mkldnn._linear_pointwise(x[e], reordered[e], None, "none", [], "")
                                          for e in range(experts)]
    return cases


def compiled_case(x: torch.Tensor, weights: torch.Tensor):
    """bmm compiled with max-autotune and freezing, and the time inductor took to compile it."""
    module = StackedProduct(weights).eval()
    with inductor_config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN"):
        compiled = torch.compile(module)
        started = time.perf_counter()
        compiled(x)
        return (lambda: compiled(x)), time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument("--rounds", type=at_least(1), default=7)
    parser.add_argument("--experts", type=at_least(1), default=S16.num_experts,
                        help="fewer: a quick check of the script, not the model")
    parser.add_argument("--no-compile", action="store_true", help="leave out the inductor case (its 10 s compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.experts, ROWS, DIM, generator=generator)
    weights = torch.randn(args.experts, DIM, HIDDEN, generator=generator) * DIM**-0.5
    with torch.inference_mode():
        expected = torch.bmm(x, weights)
        cases = {"bmm": lambda: torch.bmm(x, weights), **per_expert_cases(x, weights)}
        compile_seconds = None
        if not args.no_compile:
            cases["inductor_cpp"], compile_seconds = compiled_case(x, weights)
        max_abs_error = {}
        for name, case in cases.items():
            out = case()
            out = torch.stack(out) if isinstance(out, list) else out
            max_abs_error[name] = (out - expected).abs().max().item()
            if not torch.allclose(out, expected, rtol=1e-4, atol=1e-4):
                raise SystemExit(f"{name} computes another product than bmm: max abs error {max_abs_error[name]}")
        times = interleaved({name: case for name, case in cases.items()}, args.rounds, 1, torch.device("cpu"))
    flops = 2 * args.experts * ROWS * DIM * HIDDEN
    print(json.dumps({
        "experts": args.experts, "threads": args.threads, "rounds": args.rounds,
        "ms": {name: 1e3 * median(t["total"]) for name, t in times.items()},
        "gflop_per_s": {name: flops / median(t["total"]) / 1e9 for name, t in times.items()},
        "over_bmm": {name: paired_ratio(t["total"], times["bmm"]["total"]) for name, t in times.items()},
        "max_abs_error_vs_bmm": max_abs_error, "inductor_compile_s": compile_seconds,
        "load_average": [load[0], os.getloadavg()[0]], "machine": machine_info(torch.device("cpu")),
    }))


if __name__ == "__main__":
    main()
