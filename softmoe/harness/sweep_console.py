"""A sweep's jobs on one console: each line tagged with its job, a warning every job repeats shown once.

:func:`tag_console` tags each job's console lines and shows a warning that every job repeats once for the sweep
(marker files in ``<sweep dir>/.console_warnings``, which :class:`FreshConsoleWarnings` clears when a multirun
starts). :class:`SweepEndHint` is the Hydra callback that prints the ``collect`` command when a multirun ends.

A job of submitit's launchers runs in a process of its own whose console is a log file (``.submitit/<id>/``): the
one line a job that refuses itself prints (another experiment's run directory, a bad dataset) would reach the
sweep's console only inside submitit's traceback (``UncompletedJobError``, exit status 1). Such a job hands its lines
and exit status to the sweep (:func:`hand_to_sweep`, files in ``<sweep dir>/.refused_jobs``) and returns; the
sweep's process prints them and exits with that status when the multirun ends (:class:`RefusedJobs`), as the basic
launcher does at once. A joblib job does the same (``sweep_stop.others_run_on_after_an_error``), its lines shown at
once too: its worker's exit would have made joblib kill the jobs beside it. The callbacks are named in
``conf/hydra/default.yaml``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from .sweep_stop import STOP_FILE


# A warning every job of a sweep logs is shown on the console by the first job only: that job creates the marker
# <sweep dir>/.console_warnings/<sha1 of the message> (it holds no metrics.jsonl, so collect finds no run there).
CONSOLE_WARNINGS_DIR = ".console_warnings"
SHOWN_ONCE_NOTE = " (shown once for the sweep; each job's train.log keeps its own)"
# ``extra=`` of a warning about this job alone (its stop, its resume command): shown for every job, never once
EVERY_JOB = {"every_job": True}


class _FirstInSweep(logging.Filter):
    """Passes a warning to the console only if no job of the sweep has shown its message yet; errors always pass.
    ``O_CREAT | O_EXCL`` makes creating the marker atomic, so of parallel jobs exactly one shows it."""

    def __init__(self, sweep_dir: Path) -> None:
        super().__init__()
        self.markers = Path(sweep_dir) / CONSOLE_WARNINGS_DIR

    def filter(self, record: logging.LogRecord) -> bool:
        if not logging.WARNING <= record.levelno < logging.ERROR or getattr(record, "every_job", False):
            return True
        if not hasattr(record, "first_in_sweep"):  # decided once a record, however many console handlers it meets
            record.first_in_sweep = self._claim(record.getMessage())
        return record.first_in_sweep

    def _claim(self, message: str) -> bool:
        marker = self.markers / hashlib.sha1(message.encode()).hexdigest()
        try:
            self.markers.mkdir(parents=True, exist_ok=True)
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return False
        except OSError:  # no marker can be written (a read-only sweep dir): better every job's copy than none
            return True
        return True


class _SweepConsole(logging.Formatter):
    """A sweep job's console lines: each starts with the job's tag; a warning shown once for the sweep says so."""

    def __init__(self, tag: str, inner: Optional[logging.Formatter]) -> None:
        super().__init__()
        self.tag, self.inner = tag, inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        lines = self.inner.format(record).splitlines() or [""]
        if getattr(record, "first_in_sweep", False):
            lines[0] += SHOWN_ONCE_NOTE
        return "\n".join(self.tag + line for line in lines)


def tag_console(tag: str, sweep_dir: Optional[Path] = None) -> None:
    """Start every console line of this process's log with ``tag`` (e.g. ``[job 3] ``), so the lines of a sweep's
    parallel jobs (``launcher=joblib``) can be told apart; Python warnings go through the log too. With the sweep's
    ``sweep_dir``, a warning every job logs (the same message) is shown on the console once for the whole sweep, by
    the first job to log it, whether the jobs are processes or run one after another in this one. The run
    directory's ``train.log`` is left as it is: it keeps every warning of its job."""
    if not tag and sweep_dir is None:
        return
    logging.captureWarnings(True)
    for handler in console_handlers():
        if not isinstance(handler.formatter, _SweepConsole):
            handler.setFormatter(_SweepConsole(tag, handler.formatter))
        if sweep_dir is not None and not any(isinstance(f, _FirstInSweep) for f in handler.filters):
            handler.addFilter(_FirstInSweep(sweep_dir))


def console_handlers() -> list[logging.StreamHandler]:
    """The root logger's console handlers: its stream handlers that do not write a file (``train.log``)."""
    return [handler for handler in logging.getLogger().handlers
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)]


class _RankZeroSpeaks(logging.Filter):
    """Under torchrun, on a rank other than 0: errors and the warnings about this rank alone (``EVERY_JOB``: the
    signal it received, its stop) pass; any other warning comes from what every rank shares (the config, the data,
    the all-reduced loss), and rank 0 shows it once (was: once per rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or getattr(record, "every_job", False)


def show_only_this_ranks_own_warnings() -> None:
    """On a rank other than 0 (``distributed.quiet_other_ranks``): the console keeps its errors and its own warnings."""
    for handler in console_handlers():
        if not any(isinstance(f, _RankZeroSpeaks) for f in handler.filters):
            handler.addFilter(_RankZeroSpeaks())


def speaks_for_the_job() -> bool:
    """Whether this process prints a job's lines and writes its sweep files: rank 0 under torchrun (read from the
    variables torchrun sets, so it answers before any process group exists), and a process without torchrun."""
    return os.environ.get("RANK", "0") == "0"


class FreshConsoleWarnings(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``): when a multirun starts, forget the warnings an earlier multirun
    in the same sweep directory showed, so that rerunning a sweep (to resume it) shows them again, once."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if not speaks_for_the_job():
            return
        shutil.rmtree(Path(config.hydra.sweep.dir) / CONSOLE_WARNINGS_DIR, ignore_errors=True)


REFUSED_JOBS_DIR = ".refused_jobs"
SUBMITIT_LAUNCHERS = "hydra_plugins.hydra_submitit_launcher."  # submitit_local's and slurm's _target_


def console_is_a_log_file(hydra_cfg: Any) -> bool:
    """Whether this sweep job runs in a process of its own whose console is a log file (submitit's launchers)."""
    return str(hydra_cfg.launcher.get("_target_", "")).startswith(SUBMITIT_LAUNCHERS)


def hand_to_sweep(sweep_dir: Path, job_num: int, lines: list[str], status: int) -> None:
    """Leave a refused job's console ``lines`` and exit ``status`` for the sweep's process (:class:`RefusedJobs`)."""
    if not speaks_for_the_job():  # under torchrun, a SLURM job's tasks too
        return
    folder = Path(sweep_dir) / REFUSED_JOBS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{job_num}.json").write_text(json.dumps({"job": job_num, "lines": lines, "status": status}))


def jobs_handed_to_sweep(sweep_dir: Path) -> bool:
    """Whether a job of this sweep has handed its lines and exit status to the sweep (:func:`hand_to_sweep`)."""
    return any((Path(sweep_dir) / REFUSED_JOBS_DIR).glob("*.json"))


class RefusedJobs(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``): when a multirun ends, print the lines of the jobs that refused
    themselves or stopped on an error in processes of their own (:func:`hand_to_sweep`) and exit with the first
    one's status, so that a submitit or joblib sweep ends as the basic launcher's does; listed after
    :class:`SweepEndHint`, so it runs first."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if speaks_for_the_job():
            shutil.rmtree(Path(config.hydra.sweep.dir) / REFUSED_JOBS_DIR, ignore_errors=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = Path(config.hydra.sweep.dir) / REFUSED_JOBS_DIR
        if not speaks_for_the_job() or not folder.is_dir():
            return
        refused = sorted((json.loads(path.read_text()) for path in folder.glob("*.json")), key=lambda j: j["job"])
        shutil.rmtree(folder, ignore_errors=True)  # the sweep directory keeps only its runs
        for job in refused:
            print("\n".join(job["lines"]), file=sys.stderr, flush=True)
        if refused:
            sys.exit(refused[0]["status"])


class SweepEndHint(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``): when a multirun ends, print the command that tabulates it."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if not speaks_for_the_job():
            return
        sweep_dir = config.hydra.sweep.dir
        if (Path(sweep_dir) / STOP_FILE).exists():  # stopped, not done: sweep_stop.SweepStop says how to resume
            return
        print(f"sweep done: {sweep_dir}; tabulate it with: python -m softmoe.collect {sweep_dir}", flush=True)
