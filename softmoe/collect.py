"""Turn a sweep into a results table and a plot.

    python -m softmoe.collect multirun/2026-11-29/12-00-00            # every run dir below it
    python -m softmoe.collect SWEEP_DIR --by moe.num_experts,moe.slots_per_expert
    python -m softmoe.collect SWEEP_DIR --metric routing/block3/dispatch_entropy  # a further column, plotted
    python -m softmoe.collect --wandb-dir SWEEP_DIR --group SWEEP_DIR    # the same from offline W&B run files
    python -m softmoe.collect --wandb ENTITY/PROJECT --group SWEEP_DIR   # the same from the W&B API

Each group of runs (the overrides that differ between the finished runs, except ``seed`` and the keys that do not
change an experiment: ``launcher``, ``logger``, ``trainer.device``, ...) reports mean ± std over its seeds of the
best validation accuracy (the selection) and the test accuracy of the final model and of the best-on-validation
checkpoint, and the final value of any ``--metric``; nothing is ever selected on a test metric. The ± is the
sample standard deviation over the seeds (n - 1 in the denominator; ``n/a`` for one seed). A run that has not
logged its test result (still training, stopped, cut short) is left out of the table, with a warning naming it. Writes
``results.md`` and ``results.png`` (to ``--out``, default the sweep dir). The reading, grouping and plotting live
in ``softmoe.harness.sweeps``, which the notebooks import too; this module is the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from softmoe.harness.errors import USER_ERRORS, ConfigError, NoRunsError, exit_code, run_command
from softmoe.harness.overrides import closest
from softmoe.harness.rules import counted
from softmoe.harness.sweeps import (
    RESULT_COLUMNS,
    RunResult,
    column_label,
    finished_runs,
    is_finished,
    load_sweep,
    load_wandb_group,
    load_wandb_offline,
    markdown_table,
    plot,
    summarize,
    swept_keys,
    table_columns,
)
from softmoe.harness.whole_files import replaced_whole

FEW = 8  # logged metrics a --metric no run logged lists, when none is close to it


def load_runs(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[RunResult]:
    """The runs the command line names: a sweep directory's, offline W&B files' or a W&B group's."""
    if args.sweep_dir is not None and (args.wandb or args.wandb_dir):
        parser.error(f"give sweep_dir or --wandb/--wandb-dir, not both (sweep_dir is {args.sweep_dir})")
    if args.group is not None and not (args.wandb or args.wandb_dir):
        parser.error(f"--group {args.group} needs --wandb or --wandb-dir")
    if args.wandb:
        if not args.group:
            parser.error("--wandb needs --group")
        return load_wandb_group(args.wandb, args.group)
    if args.wandb_dir is not None:
        if not args.wandb_dir.is_dir():
            parser.error(f"--wandb-dir must be an existing directory, got {args.wandb_dir}")
        return load_wandb_offline(args.wandb_dir, args.group)
    if args.sweep_dir is None:
        parser.error("name the runs to tabulate: a sweep (or run) directory, --wandb-dir DIR or --wandb ENTITY/PROJECT")
    if not args.sweep_dir.is_dir():
        what = "a file" if args.sweep_dir.exists() else "no such directory"
        parser.error(f"sweep_dir must be an existing directory, got {args.sweep_dir} ({what})")
    return load_sweep(args.sweep_dir)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m softmoe.collect", description=__doc__.split("\n\n")[0],
        epilog="Each cell is the mean ± the sample standard deviation (n - 1) over a group's seeds; n/a for one seed.",
    )
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a Hydra multirun directory")
    parser.add_argument(
        "--metric", default="",
        help="comma-separated further metrics to report, as their final value (e.g. routing/block3/dispatch_entropy); "
        "the table always has the best val/acc and the test/acc of the final model and of the best-val checkpoint",
    )
    parser.add_argument(
        "--plot", default=None,
        help="the column to plot, by its label or its metric's name when one column reports it (test/acc: "
        "test/acc (final model)); default: test/acc (final model), or the first --metric",
    )
    parser.add_argument(
        "--by", default=None, help="comma-separated override keys to group by (default: the swept keys)"
    )
    parser.add_argument("--out", type=Path, default=None, help="where to write results.md and results.png")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None, help="read runs from the W&B API instead")
    source.add_argument("--wandb-dir", metavar="DIR", type=Path, default=None,
                        help="read the offline W&B run files (offline-run-*/run-*.wandb) below DIR instead")
    parser.add_argument("--group", default=None,
                        help="the W&B group (a sweep's: its sweep dir); needed with --wandb, optional with --wandb-dir")
    args = parser.parse_args(argv)
    try:
        return collect(args, parser)
    except USER_ERRORS as error:  # e.g. a sweep without runs: one line, no traceback
        print(f"error: {error}", file=sys.stderr)
        return exit_code(error)


def make_out_dir(out: Path) -> None:
    """``--out``, made if missing; one that cannot be a directory is a user's mistake, not a traceback."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file of that name (FileExistsError), a file on the path, no permission
        raise ConfigError(f"--out {out} cannot be a directory ({error.strerror}: {error.filename}); --out names the "
                          "directory results.md and results.png go to") from None


def write_results(out: Path, table: str, draw) -> None:
    """``results.md`` and ``results.png`` in ``out``, each put in place whole once both are written, so a stop or a
    failure leaves the previous pair (was: a new table beside an old or empty plot); a folder that takes no files
    (``/proc``, a read-only mount) is a :class:`ConfigError` naming ``--out``."""
    writing = out / "results.md"
    try:
        with replaced_whole(out / "results.md") as table_file, replaced_whole(out / "results.png") as plot_file:
            table_file.write_text(table)
            writing = out / "results.png"
            draw(plot_file)
    except OSError as error:
        raise ConfigError(f"--out {out}: {writing} could not be written ({error.strerror}); name a directory you can "
                          "write to") from None


def warn_unfinished(runs: Sequence[RunResult], sweep_dir: Optional[Path]) -> None:
    """One line naming the runs the table leaves out: no test result yet (still training, stopped, cut short);
    none finished is :func:`~softmoe.harness.sweeps.finished_runs`' error."""
    finished_runs(runs)
    unfinished = [str(sweep_dir / run.name) if sweep_dir else run.name for run in runs if not is_finished(run)]
    if unfinished:
        print(f"warning: left out of the table {counted(len(unfinished), 'unfinished run')} "
              f"(no test/acc logged yet): {', '.join(unfinished)}", file=sys.stderr)


def logged_metrics(runs: Sequence[RunResult]) -> List[str]:
    """Every metric some finished run (one the table pools) logged, sorted."""
    return sorted({metric for run in finished_runs(runs) for metric in run.history})


def check_metrics(metrics: Sequence[str], logged: Sequence[str]) -> None:
    """Refuse a ``--metric`` no finished run logged (a typo: ``block2`` where only block 3 is an MoE block), naming
    the closest logged metric, else a few of those with its first part (``routing/``), else of all."""
    for metric in metrics:
        if metric in logged:
            continue
        hint = closest(metric, logged)
        if not hint:
            alike = [name for name in logged if name.split("/")[0] == metric.split("/")[0]] or logged
            more = f", ... ({len(alike)} in all)" if len(alike) > FEW else ""
            hint = f" (the runs logged: {', '.join(alike[:FEW])}{more})"
        raise NoRunsError(f"--metric {metric}: no finished run logged it{hint}")


def plot_column(requested: str, columns: Sequence[Tuple[str, str]], logged: Sequence[str]) -> str:
    """The table column ``--plot`` names: a column's label, or the metric of exactly one column (``test/acc``: the
    column ``test/acc (final model)``); else a NoRunsError naming the closest label or metric, and every label."""
    labels = [label for label, _ in columns]
    matching = [label for label, metric in columns if requested in (label, metric)]
    if len(matching) == 1:
        return matching[0]
    reported = f"; add --metric {requested} to report and plot it" if requested in logged else ""
    hint = reported or closest(requested, [*labels, *(metric for _, metric in columns)])
    raise NoRunsError(f"--plot {requested}: not a column of the table{hint} (its columns: {', '.join(labels)})")


def group_keys(by: str) -> list:
    """``--by``'s comma-separated keys, spaces around them dropped; one that names no key is refused."""
    keys = [key.strip() for key in by.split(",") if key.strip()]
    if not keys:
        raise NoRunsError(f"--by {by!r}: names no override key; give them comma-separated "
                          "(--by moe.num_experts,moe.slots_per_expert), or leave --by out to group by the swept keys")
    return keys


def collect(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.out is not None and args.out.exists() and not args.out.is_dir():
        make_out_dir(args.out)  # refused before any run is read
    runs = load_runs(args, parser)
    warn_unfinished(runs, args.sweep_dir)
    # grouped by what differs between the runs the table pools: an unfinished run's overrides make no column
    by = group_keys(args.by) if args.by is not None else swept_keys(finished_runs(runs))
    metrics = [metric for metric in args.metric.split(",") if metric]
    logged = logged_metrics(runs)
    check_metrics(metrics, logged)
    summaries = summarize(runs, by, metrics)
    table = markdown_table(summaries, by, metrics)
    column = column_label(metrics[0] if metrics else RESULT_COLUMNS[1][1])
    if args.plot:  # a column the table lacks is refused before results.md is written
        column = plot_column(args.plot, table_columns(summaries, metrics), logged)
    out = args.out or args.sweep_dir or args.wandb_dir or Path(".")
    make_out_dir(out)
    write_results(out, table, lambda path: plot(summaries, by, column, path))
    print(table, end="")
    pooled = sum(summary.runs for summary in summaries)
    print(f"wrote {out / 'results.md'} and {out / 'results.png'} ({counted(pooled, 'run')})")
    return 0


if __name__ == "__main__":
    run_command(main)
