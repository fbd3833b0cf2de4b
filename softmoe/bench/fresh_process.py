"""A library user's process, from its start: the layer's float32 forward+backward timed in fresh processes,
one per allocator mode, the modes alternating round by round (glibc's settings are per process, so only
fresh processes show what a user who never calls ``softmoe.tune_allocator()`` gets).

    python -m softmoe.bench.fresh_process --shape vit_s16 --rounds 3 --calls 4

Modes:

* ``library_default``: nothing called; the layer tunes glibc itself before its first backward
  (``softmoe.runtime.tune_allocator_once``);
* ``tune_allocator``: ``softmoe.tune_allocator()`` at start-up, as the README used to ask;
* ``opted_out``: ``SOFTMOE_TUNE_ALLOCATOR=0``: glibc's own settings, what every user got before.

Each process times ``--calls`` calls after one untimed call; a mode's figure is the median over rounds of
its process's median, a ratio the median over rounds of the ratio within the round.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

MODES = {"library_default": {}, "tune_allocator": {}, "opted_out": {"SOFTMOE_TUNE_ALLOCATOR": "0"}}


def child(mode: str, shape_name: str, calls: int, threads: int) -> dict:
    """In this (fresh) process: ``calls`` timed forward+backward passes of the layer, float32, on CPU."""
    import torch

    import softmoe

    from .layer import build_layer
    from .shapes import LAYER_SHAPES

    if mode == "tune_allocator":
        softmoe.tune_allocator()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    shape = LAYER_SHAPES[shape_name]
    layer = build_layer(shape, "cpu")
    x = torch.randn(shape.batch, shape.tokens, shape.dim, requires_grad=True)
    grad = torch.randn_like(x)
    wall, cpu = [], []
    for _ in range(calls + 1):  # the first call is untimed: lazy initialisation
        start, start_cpu = time.perf_counter(), time.process_time()
        layer.zero_grad(set_to_none=True)
        x.grad = None
        layer(x).backward(grad)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"mode": mode, "seconds": wall[1:], "cpu_seconds": cpu[1:]}


def run_rounds(shape: str, rounds: int, calls: int, threads: int) -> Dict[str, List[dict]]:
    """Every mode once per round, in an order that rotates, each in a fresh process."""
    names = list(MODES)
    results: Dict[str, List[dict]] = {name: [] for name in names}
    for r in range(rounds):
        for mode in names[r % len(names):] + names[:r % len(names)]:
            env = {key: value for key, value in os.environ.items() if key != "SOFTMOE_TUNE_ALLOCATOR"}
            env.update(MODES[mode])
            command = [sys.executable, "-m", "softmoe.bench.fresh_process", "--child", mode, "--shape", shape,
                       "--calls", str(calls), "--threads", str(threads)]
            completed = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            results[mode].append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return results


def summarize(results: Dict[str, List[dict]]) -> dict:
    """Per mode the median over rounds of each process's median; ratios to ``tune_allocator``, per round."""
    per_round = {mode: [statistics.median(run["seconds"]) for run in runs] for mode, runs in results.items()}
    per_round_cpu = {mode: [statistics.median(run["cpu_seconds"]) for run in runs] for mode, runs in results.items()}
    summary = {"median_s": {mode: statistics.median(values) for mode, values in per_round.items()},
               "per_round_s": per_round}
    for mode in ("library_default", "opted_out"):
        pairs = zip(per_round[mode], per_round["tune_allocator"])
        pairs_cpu = zip(per_round_cpu[mode], per_round_cpu["tune_allocator"])
        summary[f"{mode}_over_tune_allocator"] = statistics.median(a / b for a, b in pairs)
        summary[f"{mode}_over_tune_allocator_cpu_time"] = statistics.median(a / b for a, b in pairs_cpu)
    return summary


def main(argv: Optional[Sequence[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m softmoe.bench.fresh_process", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="vit_s16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=sorted(MODES), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        result = child(args.child, args.shape, args.calls, args.threads)
        print(json.dumps(result))
        return result
    load = os.getloadavg()
    summary = summarize(run_rounds(args.shape, args.rounds, args.calls, args.threads))
    summary.update(shape=args.shape, rounds=args.rounds, calls=args.calls, threads=args.threads,
                   load_average=[load, os.getloadavg()])
    for mode, seconds in summary["median_s"].items():
        print(f"{mode:16} {1e3 * seconds:8.1f} ms  per round: "
              + ", ".join(f"{1e3 * s:.0f}" for s in summary["per_round_s"][mode]))
    for mode in ("library_default", "opted_out"):
        print(f"{mode} / tune_allocator: {summary[f'{mode}_over_tune_allocator']:.2f} "
              f"(CPU time {summary[f'{mode}_over_tune_allocator_cpu_time']:.2f})")
    print(f"load average {load[0]:.2f} -> {os.getloadavg()[0]:.2f}")
    return summary


if __name__ == "__main__":
    main()
