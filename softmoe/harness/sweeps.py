"""A sweep's runs, back in memory and summarised: what ``python -m softmoe.collect`` and the notebooks share.

    runs = load_sweep(Path("outputs/multiruns/2026-11-29/12-00-00"))   # every run dir below it
    by = swept_keys(finished_runs(runs))                               # the overrides that differ, but seed
    print(markdown_table(summarize(runs, by), by))                     # mean ± std over seeds per group

A run directory is one that holds ``metrics.jsonl`` (one JSON object per log event) and Hydra's
``.hydra/overrides.yaml``. Runs are grouped by the overrides that differ between the finished runs, except
``seed`` and the keys that do not change an experiment (``launcher``, ``logger``, ``trainer.device``: the
``exclude_keys`` of ``conf/hydra/default.yaml``); each group reports mean ± std over its runs (seeds) of the best
validation accuracy (the selection), the test accuracy of the final model and that of the best-on-validation
checkpoint (the trainer tests each once), and the final value of any further metric; the std is the sample standard
deviation over the seeds (``statistics.stdev``, n - 1 in the denominator), ``n/a`` for one run. Nothing is ever
selected on a test metric. A run that has not logged its test result (still training, stopped, or its file cut
short) is left out (:func:`is_finished`): its best validation accuracy so far would be pooled with finished runs'.

W&B keeps a run's resolved config, not its command line, so a W&B run's overrides are the config keys
(dotted: ``moe.num_experts``) whose values differ between the runs read: the keys and values a sweep
directory gives, except that a swept config group (``routing=soft,sparse``) shows as the keys it sets.
``softmoe.train`` names a sweep's W&B group after its sweep directory, as typed in ``hydra.sweep.dir``.
:func:`load_wandb_offline` reads every ``offline-run-*/run-*.wandb`` below a directory (what offline runs
leave, before ``wandb sync``).

What a sweep's jobs print on the console while they run is ``sweep_console.py``'s.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

from .errors import NoRunsError
from .plausibility import CONF_DIR
from .rules import closest
# parse_overrides and read_metrics as well: the tests and notebooks read them from here
from .run_files import (  # noqa: F401
    damaged,
    numeric_history,
    override_value,
    parse_overrides,
    read_metrics,
    read_overrides,
    values_used,
)

IGNORED_KEYS = ("seed", "hydra.", "logger.", "trainer.device", "paths.")


@dataclass
class RunResult:
    """One run: its overrides (``key -> value``, as an override writes it) and its metric values in logging order;
    ``read_from`` names what its loader searched (``the run directories below <sweep dir>``), for messages about
    the runs."""

    name: str
    overrides: Dict[str, str]
    history: Dict[str, List[float]] = field(default_factory=dict)
    read_from: str = ""

    def final(self, metric: str) -> Optional[float]:
        values = self.history.get(metric)
        return values[-1] if values else None

    def best(self, metric: str) -> Optional[float]:
        """The highest value: only the selection metric (``val/acc``) is reduced to its best, never a test metric."""
        values = self.history.get(metric)
        return max(values) if values else None


def load_sweep(sweep_dir: Path) -> List[RunResult]:
    """Every run directory below ``sweep_dir``; each run's overrides hold every key any run overrides, at the value
    that run used (:func:`values_used`)."""
    run_dirs = [metrics.parent for metrics in sorted(sweep_dir.rglob("metrics.jsonl"))]
    if not run_dirs:
        raise NoRunsError(f"no run directories (with metrics.jsonl) below {sweep_dir}")
    typed = []
    for run_dir in run_dirs:
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        typed.append(read_overrides(overrides_file) if overrides_file.exists() else {})
    keys = sorted({key for overrides in typed for key in overrides})
    return [
        RunResult(str(run_dir.relative_to(sweep_dir)), {**overrides, **values_used(run_dir, keys)},
                  read_metrics(run_dir / "metrics.jsonl"), read_from=f"the run directories below {sweep_dir}")
        for run_dir, overrides in zip(run_dirs, typed)
    ]


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested config as dotted keys: ``{"moe": {"num_experts": 8}}`` -> ``{"moe.num_experts": 8}``."""
    flat: Dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_overrides(configs: Sequence[Mapping[str, Any]]) -> List[Dict[str, str]]:
    """Each run's overrides, from the resolved configs of the runs read together: the dotted keys whose
    values differ between them, written as a Hydra override would. W&B's own ``_wandb`` entry is dropped;
    seeds and the other ``IGNORED_KEYS`` stay, for :func:`swept_keys` to skip and ``--by seed`` to use."""
    flat = [
        {key: override_value(value) for key, value in flatten_config(config).items()}
        for config in ({key: value for key, value in config.items() if key != "_wandb"} for config in configs)
    ]
    keys = {key for run in flat for key in run}
    differing = {key for key in keys if len({run.get(key) for run in flat}) > 1}
    return [{key: value for key, value in run.items() if key in differing} for run in flat]


def follows_the_seed(key: str, runs: Sequence[Mapping[str, str]]) -> bool:
    """Whether ``key``'s value is the seed's own in another form: one value per seed and one seed per value, each
    value holding its seed (``model.upcycle_from=.../seed${seed}/last.pt`` in the upcycling studies). Such a key
    changes with the seed alone, so it is no column: it would make every seed a group of its own."""
    if key == "seed":
        return False
    pairs = {(run.get(key), run.get("seed")) for run in runs}
    if any(value is None or seed is None for value, seed in pairs):
        return False
    # the same value but for its seed: ".../seed0/last.pt" and ".../seed1/last.pt" (not 0.001 and 0.0001, which
    # merely hold "0" and "1")
    templates = {re.sub(rf"(?<!\d){re.escape(str(seed))}(?!\d)", "{seed}", str(value)) for value, seed in pairs}
    return (len(pairs) == len({value for value, _ in pairs}) == len({seed for _, seed in pairs})
            and len(templates) == 1 and "{seed}" in next(iter(templates)))


@dataclass
class WandbRun:
    """What a W&B run holds for collect: its group, name, resolved config and logged rows (dicts)."""

    group: str
    name: str
    config: Dict[str, Any]
    rows: Iterable[Mapping[str, Any]]


def wandb_results(runs: Sequence[WandbRun], read_from: str) -> List[RunResult]:
    """The results of W&B runs, whether read from offline run files or through the API (``read_from`` says which)."""
    overrides = config_overrides([run.config for run in runs])
    return [RunResult(run.name, own, numeric_history(run.rows), read_from) for run, own in zip(runs, overrides)]


def offline_run_files(wandb_dir: Path) -> List[Path]:
    """Every offline W&B run file below ``wandb_dir``; sorted, so a resumed run's files come oldest first
    (their folders are named ``offline-run-<date>_<time>-<id>``)."""
    return sorted(path for path in wandb_dir.rglob("run-*.wandb") if path.parent.name.startswith("offline-run-"))


def read_offline_run(path: Path) -> Tuple[str, WandbRun]:
    """The run id and the run of one offline run file. Its rows are the dicts the W&B API's ``scan_history``
    gives: a histogram or image logged under ``key`` is a dict there, not numbers to report."""
    from google.protobuf.message import DecodeError

    from .wandb_files import read_records

    run_id, run = path.stem[len("run-"):], WandbRun(group="", name="", config={}, rows=[])
    try:
        records = list(read_records(path))
    except (ValueError, DecodeError, OSError) as error:  # not a run file, damaged bytes: named, not a traceback
        reason = "not a W&B run file" if isinstance(error, ValueError) else getattr(error, "strerror", None)
        raise damaged(path, reason or f"a record cannot be decoded: {error}") from None
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_id, run.group, run.name = record.run.run_id, record.run.run_group, record.run.display_name
            _apply_config_record(run.config, record.run.config)
        elif kind == "config":  # a later wandb.config.update
            _apply_config_record(run.config, record.config)
        elif kind == "history":
            row: Dict[str, Any] = {}
            for item in record.history.item:
                _set_item(row, item)
            run.rows.append(row)
    run.name = run.name or run_id
    return run_id, run


def _apply_config_record(config: Dict[str, Any], record) -> None:
    """A ``ConfigRecord``'s updates and removals applied to ``config``."""
    from .wandb_files import item_path

    for item in record.update:
        _set_item(config, item)
    for item in record.remove:
        *parents, last = item_path(item)
        _nested(config, parents).pop(last, None)


def _set_item(target: Dict[str, Any], item) -> None:
    """A config or history item's value (plain JSON) put in ``target``, in nested dicts where its key is nested."""
    from .wandb_files import item_path

    *parents, last = item_path(item)
    _nested(target, parents)[last] = json.loads(item.value_json)


def _nested(target: Dict[str, Any], keys: Sequence[str]) -> Dict[str, Any]:
    for key in keys:
        target = target.setdefault(key, {})
    return target


def load_wandb_offline(wandb_dir: Path, group: Optional[str] = None) -> List[RunResult]:
    """The offline W&B runs below ``wandb_dir`` (those of ``group`` when given). A resumed run left one
    file per attempt, all with its id: they are read as one run, history in order."""
    files = offline_run_files(wandb_dir)
    if not files:
        raise NoRunsError(f"no offline W&B runs (offline-run-*/run-*.wandb) below {wandb_dir}")
    runs: Dict[str, WandbRun] = {}
    for path in files:
        run_id, run = read_offline_run(path)
        if run_id in runs:
            run.rows = [*runs[run_id].rows, *run.rows]
        runs[run_id] = run
    kept = [run for run in runs.values() if group is None or run.group == group]
    if not kept:
        found = ", ".join(repr(name) if name else "(no group)" for name in sorted({run.group for run in runs.values()}))
        raise NoRunsError(f"no offline W&B run below {wandb_dir} is in group {group!r}; groups found: {found}")
    in_group = f" in group {group!r}" if group is not None else ""
    return wandb_results(kept, f"the offline W&B runs below {wandb_dir}{in_group}")


def load_wandb_group(project: str, group: str) -> List[RunResult]:
    """The runs of one W&B group, read through the W&B API (needs network and credentials)."""
    import wandb

    try:
        api_runs = wandb.Api().runs(project, filters={"group": group})
        runs = [WandbRun(group, run.name, dict(run.config), run.scan_history()) for run in api_runs]
        if not runs:
            raise NoRunsError(f"W&B project {project!r} has no runs in group {group!r}")
        return wandb_results(runs, f"the runs of W&B project {project!r} in group {group!r}")  # reads each history
    except wandb.errors.Error as error:  # no API key, a rejected one, W&B out of reach: W&B's own traceback
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise NoRunsError(f"W&B project {project!r}: the W&B API could not be read ({reason}); log in with `wandb "
                          "login` where W&B is reachable, or read the runs' offline files (python -m softmoe.collect "
                          "--wandb-dir SWEEP_DIR)") from None


@functools.lru_cache(maxsize=1)
def non_identity_keys() -> frozenset:
    """The keys the trainer leaves out of a run's name, as not changing its experiment (``launcher``, ``logger``,
    ``trainer.device``, ...): ``hydra.job.config.override_dirname.exclude_keys`` of ``conf/hydra/default.yaml``."""
    import yaml

    hydra_config = CONF_DIR / "hydra" / "default.yaml"
    if not hydra_config.is_file():  # an installed wheel, which has no conf/
        return frozenset()
    override_dirname = yaml.safe_load(hydra_config.read_text())["job"]["config"]["override_dirname"]
    return frozenset(override_dirname.get("exclude_keys") or ())


def swept_keys(runs: Sequence[RunResult]) -> List[str]:
    """The override keys whose values differ between ``runs``, except seeds and keys that do not change an
    experiment (:data:`IGNORED_KEYS`, :func:`non_identity_keys`). ``collect`` passes the runs its table pools
    (:func:`finished_runs`): a key only an unfinished run sets is no column, nor one that :func:`follows_the_seed`."""
    keys = sorted({key for run in runs for key in run.overrides})
    return [
        key for key in keys
        if not key.startswith(IGNORED_KEYS) and key not in non_identity_keys()
        and len({run.overrides.get(key) for run in runs}) > 1
        and not follows_the_seed(key, [run.overrides for run in runs])
    ]


def check_group_keys(runs: Sequence[RunResult], by: Sequence[str]) -> None:
    """Refuse a key no run overrides (a typo: ``moe.num_expert``): grouping by it would pool every run into one
    mean ± std, different configs averaged as if they were seeds."""
    keys = sorted({key for run in runs for key in run.overrides})
    for key in by:
        if key not in keys:
            raise NoRunsError(f"no run overrides {key!r}, so grouping by it would pool every run{closest(key, keys)} "
                              f"(the runs override: {', '.join(keys) or 'nothing'})")


def _sort_key(value: Optional[str]):
    """Numbers by value, then text in natural order (digit runs compared as numbers): 4x4 < 8x2 < 16x1."""
    try:
        return (0, float(value), ())
    except (TypeError, ValueError):
        chunks = re.split(r"(\d+)", str(value))
        return (1, 0.0, tuple((0, int(c), "") if c.isdigit() else (1, 0, c) for c in chunks if c))


# The columns every table has. Models are selected on the validation split alone; the test split is read for
# the final model and for the best-on-validation checkpoint, each logged once by the trainer (never a best).
SELECTION_METRIC = "val/acc"
RESULT_COLUMNS = (
    ("best val/acc", SELECTION_METRIC, "best"),
    ("test/acc (final model)", "test/acc", "final"),
    ("test/acc (best-val checkpoint)", "test/acc_at_best_val", "final"),
)


def is_accuracy(metric: str) -> bool:
    """Accuracies (``val/acc``, ``test/acc_at_best_val``) are reported in percent, as the trainer prints them."""
    return metric.rsplit("/", 1)[-1].startswith("acc")


@dataclass
class Cell:
    """One table cell: the mean and std of a metric over a group's runs (std None for a single run); ``percent``:
    an accuracy, shown in percent like every accuracy the commands print."""

    mean: float
    std: Optional[float]
    runs: int
    percent: bool = False

    def shown(self, value: float) -> float:
        return 100 * value if self.percent else value

    def __str__(self) -> str:
        if self.percent:
            return f"{self.shown(self.mean):.2f}% ± {'n/a' if self.std is None else f'{self.shown(self.std):.2f}'}"
        return f"{self.mean:.4f} ± {'n/a' if self.std is None else f'{self.std:.4f}'}"


@dataclass
class GroupSummary:
    values: Tuple[Optional[str], ...]
    runs: int
    cells: Dict[str, Optional[Cell]]  # column label -> cell (None: no run of the group logged it)


def columns_for(metrics: Sequence[str]) -> List[Tuple[str, str, str]]:
    """(label, metric, reduction) of the result columns, then each other metric asked for, as its final value.
    Only the validation metrics may be reduced to their best epoch: a best test value would be a selection
    on the test split."""
    columns = list(RESULT_COLUMNS)
    for metric in metrics:
        if column_label(metric) not in [label for label, _, _ in columns]:
            columns.append((column_label(metric), metric, "final"))
    return columns


def column_label(metric: str) -> str:
    """The table column that reports ``metric``: a result column's label, else ``final <metric>``."""
    return next((label for label, column_metric, _ in RESULT_COLUMNS if column_metric == metric), f"final {metric}")


def is_finished(run: RunResult) -> bool:
    """Whether ``run`` logged ``test/acc``, which the trainer logs once, when training ends."""
    return run.final(RESULT_COLUMNS[1][1]) is not None


def finished_runs(runs: Sequence[RunResult]) -> List[RunResult]:
    """The runs that logged ``test/acc`` (:func:`is_finished`); when none did, a NoRunsError naming what was searched,
    what was looked for and the runs found: the one message for it, from ``collect`` and the notebooks alike."""
    finished = [run for run in runs if is_finished(run)]
    if not finished:
        searched = " and ".join(dict.fromkeys(run.read_from for run in runs if run.read_from)) or "the runs given"
        names = ", ".join("the directory itself" if run.name == "." else run.name for run in runs)  # a run's own dir
        raise NoRunsError(f"no run has finished: none of {searched} logged {RESULT_COLUMNS[1][1]} (the trainer logs "
                          f"it when training ends): {names}")
    return finished


def summarize(runs: Sequence[RunResult], by: Sequence[str], metrics: Sequence[str] = ()) -> List[GroupSummary]:
    """Mean ± std over each group's finished runs (its seeds) of every column of :func:`columns_for` ``metrics``.
    Unfinished runs (:func:`is_finished`) are left out: a run stopped early would add its best val/acc so far."""
    if isinstance(metrics, str):
        metrics = [metrics]
    check_group_keys(runs, by)
    finished = finished_runs(runs)
    columns = columns_for(metrics)
    groups: Dict[Tuple[Optional[str], ...], List[RunResult]] = {}
    for run in finished:
        groups.setdefault(tuple(run.overrides.get(key) for key in by), []).append(run)
    summaries = []
    for values in sorted(groups, key=lambda v: tuple(_sort_key(x) for x in v)):
        cells = {}
        for label, metric, reduction in columns:
            found = [getattr(run, reduction)(metric) for run in groups[values]]
            cells[label] = _cell([value for value in found if measured(value, metric)], percent=is_accuracy(metric))
        summaries.append(GroupSummary(values, len(groups[values]), cells))
    return summaries


def measured(value: Optional[float], metric: str) -> bool:
    """Whether a run's ``value`` of ``metric`` counts in its group's cell: logged, and for an accuracy not NaN, which
    marks one never measured (no validation split; a ``best.pt`` damaged before its test). A NaN loss counts: the
    run diverged, and its cell shows it."""
    return value is not None and not (is_accuracy(metric) and math.isnan(value))


def _cell(values: Sequence[float], percent: bool = False) -> Optional[Cell]:
    if not values:
        return None
    if not all(math.isfinite(value) for value in values):  # a diverged run's: statistics' exact arithmetic raises
        return Cell(statistics.fmean(values), math.nan if len(values) > 1 else None, len(values), percent)
    std = statistics.stdev(values) if len(values) > 1 else None
    return Cell(statistics.fmean(values), std, len(values), percent)


def markdown_table(summaries: Sequence[GroupSummary], by: Sequence[str], metrics: Sequence[str] = ()) -> str:
    """The summaries as a markdown table: mean ± sample std (n - 1) over the runs (seeds) counted in ``runs``; a cell
    over fewer runs (a metric some runs did not log) says how many: ``(n=2)``."""
    labels = [label for label, _ in table_columns(summaries, metrics)]
    header = [*by, "runs", *labels]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for s in summaries:
        cells = [_shown_cell(s.cells.get(label), s.runs) for label in labels]
        lines.append("| " + " | ".join([*(str(v) for v in s.values), str(s.runs), *cells]) + " |")
    return "\n".join(lines) + "\n"


def table_columns(summaries: Sequence[GroupSummary], metrics: Sequence[str] = ()) -> List[Tuple[str, str]]:
    """(label, metric) of the columns :func:`markdown_table` shows: those of :func:`columns_for` some group has."""
    metrics = [metrics] if isinstance(metrics, str) else metrics
    return [(label, metric) for label, metric, _ in columns_for(metrics) if any(s.cells.get(label) for s in summaries)]


def _shown_cell(cell: Optional[Cell], runs: int) -> str:
    if cell is None:
        return "n/a"
    return str(cell) if cell.runs == runs else f"{cell} (n={cell.runs})"


def plotted(summaries: Sequence[GroupSummary], column: str) -> List[GroupSummary]:
    """The groups that have a value in ``column``, the bars :func:`plot` draws; a NoRunsError when none has."""
    shown = [s for s in summaries if s.cells.get(column)]
    if not shown:
        raise NoRunsError(f"no run logged the column {column!r}")
    return shown


def plot(summaries: Sequence[GroupSummary], by: Sequence[str], column: str, path: Path) -> None:
    """Bars of one table column (mean, with the std over seeds as error bars when there is a spread) against the first
    swept key, one bar colour per value of the others, each bar labelled with its value. The seed count is in the
    title; the value axis starts at 0 for metrics in [0, 1] (accuracies in percent, 0-100) so that a gap of a few
    tenths of a point looks like one, and the labels tell 0.73 from 0.74."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = plotted(summaries, column)
    series: Dict[Tuple, List[GroupSummary]] = {}
    for s in shown:
        series.setdefault(s.values[1:], []).append(s)
    x_labels = sorted({s.values[0] if by else "all" for s in shown}, key=_sort_key)
    percent = all(s.cells[column].percent for s in shown)
    spread = any(s.cells[column].std is not None for s in shown)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(x_labels) * len(series) + 2), 4))
    width = 0.8 / len(series)
    for index, (rest, points) in enumerate(series.items()):
        xs = [x_labels.index(p.values[0] if by else "all") + (index - (len(series) - 1) / 2) * width for p in points]
        cells = [p.cells[column] for p in points]
        label = ", ".join(f"{k}={v}" for k, v in zip(by[1:], rest)) or None
        errors = [c.shown(c.std) if c.std is not None else 0.0 for c in cells] if spread else None
        bars = ax.bar(xs, [c.shown(c.mean) for c in cells], width=width * 0.9, label=label,
                      yerr=errors, capsize=3 if spread else 0, error_kw={"linewidth": 1})
        ax.bar_label(bars, labels=[f"{c.shown(c.mean):.2f}" if percent else f"{c.mean:.3g}" for c in cells],
                     fontsize=6, padding=2)
    tick_labels = [str(x) for x in x_labels]
    # long values (routing names such as uniform_dispatch_soft_combine) or many of them would overlap
    slanted = len(tick_labels) > 4 or max(map(len, tick_labels)) > 8
    ax.set_xticks(range(len(x_labels)), tick_labels, rotation=30 if slanted else 0, ha="right" if slanted else "center")
    ax.set_xlabel(by[0] if by else "all runs")
    ax.set_ylabel(f"{column} ({'%, ' * percent}mean ± std)" if spread else f"{column}{' (%)' * percent}")
    seeds = sorted({p.cells[column].runs for p in shown})
    seed_text = f"{seeds[0]}" + (f"-{seeds[-1]}" if len(seeds) > 1 else "") + f" seed{'s' if seeds[-1] > 1 else ''}"
    title = f"mean ± std over {seed_text} per bar" if spread else f"{seed_text} per bar, so no spread to show"
    ax.set_title(f"{column}: {title}", fontsize=10)
    means = [p.cells[column].mean for p in shown]
    if 0 <= min(means) and max(means) <= 1:
        ax.set_ylim(0, 100.0 if percent else 1.0)
    if len(series) > 1:  # beside the axes, where it covers no bar however many series there are
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight" grows the image to hold the legend and labels
    plt.close(fig)
