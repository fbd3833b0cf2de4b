"""Side-by-side timing: every case of a comparison once per round, in an order that rotates."""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``. A zero or negative count of rounds, images or experts is
    refused as argparse's one line (``argument --rounds: must be >= 1, got 0``), not a ``StatisticsError`` or a
    shape error after the models are built."""

    def count(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return count


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
