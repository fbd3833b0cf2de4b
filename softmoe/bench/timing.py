"""Side-by-side timing: every case of a comparison once per round, in an order that rotates."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def interleaved(cases: Dict[str, Callable[[], Optional[dict]]], rounds: int, warmup: int,
                device: torch.device) -> Dict[str, Dict[str, List[float]]]:
    """Seconds per call of every case, round-robin: round r starts at case r, so no case always runs
    first (each still follows the same neighbour, except where the round wraps). ``"total"`` is wall-clock
    time, ``"cpu"`` the CPU time of all this process's threads (on a shared machine it counts the work done,
    not the waiting for a core). A case may return {phase: seconds} to split its time."""
    names = list(cases)
    times: Dict[str, Dict[str, List[float]]] = {name: {"total": [], "cpu": []} for name in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            phases = cases[name]()
            synchronize(device)
            if r < warmup:
                continue
            times[name]["total"].append(time.perf_counter() - start)
            times[name]["cpu"].append(time.process_time() - start_cpu)
            for phase, seconds in (phases if isinstance(phases, dict) else {}).items():
                times[name].setdefault(phase, []).append(seconds)
    return times


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator/denominator measured in the same round."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))
