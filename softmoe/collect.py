"""Turn a sweep into a results table and a plot.

    python -m softmoe.collect multirun/2026-11-29/12-00-00            # every run dir below it
    python -m softmoe.collect SWEEP_DIR --metric val/acc --by moe.num_experts,moe.slots_per_expert
    python -m softmoe.collect --wandb ENTITY/PROJECT --group SWEEP_NAME  # the same from the W&B API

A run directory is one that holds ``metrics.jsonl`` (one JSON object per log event) and Hydra's
``.hydra/overrides.yaml``. Runs are grouped by the overrides that differ between runs, except
``seed``; each group reports mean ± std over its runs (seeds) of the metric's final value and of
its best value. Writes ``results.md`` and ``results.png`` (to ``--out``, default the sweep dir).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

IGNORED_KEYS = ("seed", "hydra.", "logger.", "trainer.device", "paths.")


@dataclass
class RunResult:
    """One run: its overrides (``key -> value`` as typed) and its metric values in logging order."""

    name: str
    overrides: Dict[str, str]
    history: Dict[str, List[float]] = field(default_factory=dict)

    def final(self, metric: str) -> Optional[float]:
        values = self.history.get(metric)
        return values[-1] if values else None

    def best(self, metric: str) -> Optional[float]:
        values = self.history.get(metric)
        if not values:
            return None
        return min(values) if metric.endswith("loss") else max(values)


def parse_overrides(lines: Iterable[str]) -> Dict[str, str]:
    """Hydra override strings (``a.b=1``, ``+x=y``, ``~z``) as a dict; deletions are dropped."""
    overrides = {}
    for line in lines:
        line = str(line).strip()
        if "=" not in line or line.startswith("~"):
            continue
        key, value = line.split("=", 1)
        overrides[key.lstrip("+")] = value
    return overrides


def read_metrics(path: Path) -> Dict[str, List[float]]:
    """Every numeric value of ``metrics.jsonl``, by key, in logging order (a torn last line is skipped)."""
    history: Dict[str, List[float]] = {}
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in event.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                history.setdefault(key, []).append(float(value))
    return history


def load_sweep(sweep_dir: Path) -> List[RunResult]:
    """Every run directory below ``sweep_dir``."""
    import yaml

    runs = []
    for metrics in sorted(sweep_dir.rglob("metrics.jsonl")):
        run_dir = metrics.parent
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = parse_overrides(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else {}
        runs.append(RunResult(str(run_dir.relative_to(sweep_dir)), overrides, read_metrics(metrics)))
    if not runs:
        raise SystemExit(f"error: no run directories (with metrics.jsonl) below {sweep_dir}")
    return runs


def load_wandb_group(project: str, group: str) -> List[RunResult]:
    """The runs of one W&B group, read through the W&B API (needs network and credentials)."""
    import wandb

    runs = []
    for run in wandb.Api().runs(project, filters={"group": group}):
        overrides = parse_overrides(run.config.get("_overrides", []))
        history: Dict[str, List[float]] = {}
        for row in run.scan_history():
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    history.setdefault(key, []).append(float(value))
        runs.append(RunResult(run.name, overrides, history))
    if not runs:
        raise SystemExit(f"error: W&B project {project!r} has no runs in group {group!r}")
    return runs


def swept_keys(runs: Sequence[RunResult]) -> List[str]:
    """The override keys whose values differ between runs, excluding seeds and non-identity keys."""
    keys = sorted({key for run in runs for key in run.overrides})
    return [
        key for key in keys
        if not key.startswith(IGNORED_KEYS) and len({run.overrides.get(key) for run in runs}) > 1
    ]


def _sort_key(value: Optional[str]):
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


@dataclass
class GroupSummary:
    values: Tuple[Optional[str], ...]
    runs: int
    final_mean: float
    final_std: float
    best_mean: float
    best_std: float


def summarise(runs: Sequence[RunResult], by: Sequence[str], metric: str) -> List[GroupSummary]:
    groups: Dict[Tuple[Optional[str], ...], List[RunResult]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(key) for key in by), []).append(run)
    summaries = []
    for values in sorted(groups, key=lambda v: tuple(_sort_key(x) for x in v)):
        finals = [r.final(metric) for r in groups[values] if r.final(metric) is not None]
        bests = [r.best(metric) for r in groups[values] if r.best(metric) is not None]
        if not finals:
            continue
        summaries.append(GroupSummary(values, len(finals), *_mean_std(finals), *_mean_std(bests)))
    if not summaries:
        raise SystemExit(f"error: no run logged {metric!r}")
    return summaries


def _mean_std(values: Sequence[float]) -> Tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def markdown_table(summaries: Sequence[GroupSummary], by: Sequence[str], metric: str) -> str:
    header = [*by, "runs", f"final {metric}", f"best {metric}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [*(str(v) for v in s.values), str(s.runs), f"{s.final_mean:.4f} ± {s.final_std:.4f}", f"{s.best_mean:.4f} ± {s.best_std:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summaries: Sequence[GroupSummary], by: Sequence[str], metric: str, path: Path) -> None:
    """Final metric (mean ± std) against the first swept key, one line per value of the others."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: Dict[Tuple, List[GroupSummary]] = {}
    for s in summaries:
        series.setdefault(s.values[1:], []).append(s)
    x_labels = sorted({s.values[0] if by else "all" for s in summaries}, key=_sort_key)
    for rest, points in series.items():
        xs = [x_labels.index(p.values[0] if by else "all") for p in points]
        label = ", ".join(f"{k}={v}" for k, v in zip(by[1:], rest)) or None
        ax.errorbar(xs, [p.final_mean for p in points], yerr=[p.final_std for p in points], marker="o", capsize=3, label=label)
    ax.set_xticks(range(len(x_labels)), [str(x) for x in x_labels], rotation=30 if len(x_labels) > 4 else 0)
    ax.set_xlabel(by[0] if by else "")
    ax.set_ylabel(f"final {metric} (mean ± std)")
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m softmoe.collect", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a Hydra multirun directory")
    parser.add_argument("--metric", default="val/acc", help="metric to report (default: val/acc)")
    parser.add_argument("--by", default=None, help="comma-separated override keys to group by (default: the swept keys)")
    parser.add_argument("--out", type=Path, default=None, help="where to write results.md and results.png")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None, help="read runs from the W&B API instead")
    parser.add_argument("--group", default=None, help="with --wandb: the W&B group (the sweep)")
    args = parser.parse_args(argv)

    if args.wandb:
        if not args.group:
            parser.error("--wandb needs --group")
        runs = load_wandb_group(args.wandb, args.group)
    else:
        if args.sweep_dir is None or not args.sweep_dir.is_dir():
            parser.error(f"sweep_dir must be an existing directory, got {args.sweep_dir}")
        runs = load_sweep(args.sweep_dir)
    by = args.by.split(",") if args.by else swept_keys(runs)
    summaries = summarise(runs, by, args.metric)
    table = markdown_table(summaries, by, args.metric)
    out = args.out or args.sweep_dir or Path(".")
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(table)
    plot(summaries, by, args.metric, out / "results.png")
    print(table, end="")
    print(f"wrote {out / 'results.md'} and {out / 'results.png'} ({len(runs)} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
