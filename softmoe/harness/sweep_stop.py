"""Ctrl-C (or SIGTERM) on a sweep: every running job saves its step, no new job starts, one line says how to resume.

Under ``launcher=joblib`` the jobs run in worker processes of the sweep's process. Left to joblib, the first job
to stop by a signal (its exit status 130 is an exception in the parent) or the parent's own KeyboardInterrupt
aborts the pool and kills the other workers, mid-save; a worker waiting for its next job dies of the Ctrl-C
and breaks the pool the same way. So, in a process-parallel sweep (:class:`SweepStop`, a Hydra callback in
``conf/hydra/default.yaml``):

- the sweep's process takes the first SIGINT or SIGTERM itself and writes the stop file
  ``<sweep dir>/.sweep_stop`` (the signal's number); a second one ends it, and every job, at once;
- a job stops after its step when it receives the signal (the terminal sends Ctrl-C to every process) or finds
  the stop file (a signal sent to the sweep's process alone), saves ``last.pt`` and returns instead of exiting, so
  the other jobs finish saving theirs; a job that stops writes the stop file too, so the whole sweep stops, as it
  does under the basic launcher;
- a job that starts after the stop file appeared does not run (:func:`stop_requested`);
- a worker is born with SIGINT and SIGTERM blocked, so a Ctrl-C in the seconds it spends starting (importing torch,
  before this package's code runs in it) cannot kill it and break the pool; its first job takes one that is pending
  as a stop (it writes the stop file and does not start), then ignores them and unblocks them
  (:func:`ignore_stop_signals_between_jobs`), and between jobs it ignores them;
- when the last job has returned, the sweep prints the command that resumes it and exits with ``128 + signal``.

Rerunning a sweep into its ``hydra.sweep.dir`` resumes each job from the ``last.pt`` it left, and a finished job
reports its result again (``docs/reliability.md``). Under the basic launcher the jobs run in this process: a stop
exits it (the job's own line, then the sweep's, :func:`sweep_resume_line`); a Ctrl-C between two jobs, in
Hydra's own code, which no job's guard covers, ends it with the same rerun line (:func:`interrupted_sweep_line`).
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from .errors import preempted_exit_code
from .resume_hint import launcher_prefix, shown_path

STOP_FILE = ".sweep_stop"  # in the sweep directory: the number of the signal that stopped the sweep
STOP_FILE_ENV = "SOFTMOE_SWEEP_STOP_FILE"  # set for the jobs of a process-parallel sweep: where to look for it
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# launchers whose jobs run in worker processes the sweep's process waits on (Hydra's joblib plugin)
PROCESS_PARALLEL_LAUNCHERS = ("hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",)
BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
# sweepers whose search stops after a batch that a job's error cut short, leaving its other jobs to finish
SWEEPERS_THAT_END_AFTER_A_BATCH = (BASIC_SWEEPER,
                                   "hydra_plugins.softmoe_optuna_sweeper.optuna_sweeper.OptunaSweeper")


# (sweep dir, hydra.sweeper) of the basic-launcher sweep this process runs, from its start to its end: a Ctrl-C
# between its jobs reaches the command's top level, where the sweep's config is out of reach
_sweep_in_this_process: list = [None]


def _stop_file() -> Optional[Path]:
    named = os.environ.get(STOP_FILE_ENV)
    return Path(named) if named else None


def in_parallel_sweep() -> bool:
    """Whether this process runs a job of a process-parallel sweep (``launcher=joblib``)."""
    return _stop_file() is not None


def stop_requested() -> Optional[int]:
    """The signal that stopped this process's sweep, or None (and None outside a process-parallel sweep)."""
    path = _stop_file()
    return None if path is None else stop_signal_of(path)


def request_stop(signum: int) -> None:
    """Stop this process's sweep: the other jobs stop after their step, and no new job starts."""
    path = _stop_file()
    if path is not None and not path.exists():
        path.write_text(str(int(signum)))


def is_grid_sweeper(target: Any) -> bool:
    """Whether a sweeper's ``_target_`` is Hydra's basic sweeper, whose jobs are the grid of the swept values (job
    ``n`` the ``n``-th of their product); another (Optuna's) draws each job's values itself."""
    return str(target) == BASIC_SWEEPER


def others_run_on_after_an_error(hydra_cfg: Any) -> bool:
    """Whether a job that stops on its error (a NaN, a bad file met mid-run, a full disk, a refused config) returns
    and leaves its exit status to the sweep, which exits with it once the other jobs ended: in a process-parallel
    sweep (joblib) under Hydra's grid sweeper or this package's Optuna sweeper (``optuna_sweeper``, which ends its
    search after that batch). Its worker's exit made joblib kill the jobs beside it mid-step, with no line of theirs
    and no resume command. The plugin's own Optuna sweeper raises on the NaN objective of a job that has no result,
    so there the error still ends the sweep at once."""
    return in_parallel_sweep() and str(hydra_cfg.sweeper.get("_target_")) in SWEEPERS_THAT_END_AFTER_A_BATCH


def in_this_process(hydra_cfg: Any) -> bool:
    """Whether this job is one of a sweep whose jobs run one after another in the sweep's own process (the basic
    launcher), so that its stop ends the sweep and ``sys.argv`` is the sweep's command line (a submitit job's is
    submitit's)."""
    return hydra_cfg.mode == RunMode.MULTIRUN and str(hydra_cfg.launcher.get("_target_")) == BASIC_LAUNCHER


def ignore_stop_signals_between_jobs() -> None:
    """In a joblib worker: a Ctrl-C (or a SIGTERM to the process group) that arrives while no job runs is the sweep
    process's to answer; the worker would otherwise die of it, and joblib would kill every other worker, mid-save.
    A job's own stop guard (``faults.PreemptionGuard``) takes them while it trains and puts this back when it ends.

    The worker was born with them blocked (:meth:`SweepStop.on_multirun_start`): one that arrived while it started
    is pending, and ignoring before unblocking drops it. The sweep's process took it too, but Python runs its
    handler, which writes the stop file, only when its main thread next runs bytecode, which may be after this job
    started: so a pending one writes the stop file here too, and this job does not start."""
    if in_parallel_sweep():
        pending = sorted(set(STOP_SIGNALS) & signal.sigpending())
        if pending:
            request_stop(pending[0])
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


_receiver: Optional[threading.Thread] = None


def _keep_a_thread_that_receives_stop_signals() -> None:
    """A thread, idle for good, that leaves SIGINT and SIGTERM unblocked while the main thread blocks them: the
    kernel delivers them to it, and Python runs the handlers in the main thread as ever (within joblib's 10 ms
    polling of its results)."""
    global _receiver
    if _receiver is None or not _receiver.is_alive():  # none yet, or this is a fork, which has none of its threads
        _receiver = threading.Thread(target=threading.Event().wait, name="softmoe-stop-signals", daemon=True)
        _receiver.start()


def sweep_resume_command(sweep_dir: Union[str, Path], argv: Sequence[str]) -> str:
    """The sweep's command line ``argv`` rerun into the same ``hydra.sweep.dir``: it resumes every unfinished job."""
    kept = [arg for arg in argv  # the sweep directory in any spelling (+ adds the key, ++ adds or overrides it)
            if arg not in ("-m", "--multirun") and not arg.lstrip("+").startswith("hydra.sweep.dir=")]
    return shlex.join([*launcher_prefix(), "-m", "softmoe.train", "-m", *kept,
                       f"hydra.sweep.dir={shown_path(sweep_dir)}"])


def sweep_resume_line(signum: int, sweep_dir: Union[str, Path], argv: Sequence[str], sweeper: Any = None,
                      between_jobs: bool = False) -> str:
    """The line a stopped sweep ends with: the signal, and the rerun that resumes every unfinished job; or, for a
    ``sweeper`` whose unseeded sampler draws other trials at each run (``hydra.sweeper.sampler.seed=null``), that
    no rerun can (each stopped job's own line resumes it; was: the rerun's jobs refused their run directories).
    ``between_jobs``: no job was running, so none was stopped (and a rerun of an unseeded search starts new ones)."""
    name = signal.Signals(signum).name
    if between_jobs:
        name = f"{name} while no job ran"
        if sweeper is not None and draws_other_trials_each_run(sweeper):
            return (f"sweep stopped by {name}; its sampler is not seeded (hydra.sweeper.sampler.seed=null), so a rerun "
                    "draws new trials: the finished ones keep their results in their job directories")
    if sweeper is not None and draws_other_trials_each_run(sweeper):
        return (f"sweep stopped by {name}; its sampler is not seeded (hydra.sweeper.sampler.seed=null), so a rerun "
                "would draw other trials than the stopped ones: resume each stopped trial with its own line above")
    return f"sweep stopped by {name}; rerun it to resume its unfinished jobs: {sweep_resume_command(sweep_dir, argv)}"


def interrupted_sweep_line(argv: Sequence[str]) -> Optional[str]:
    """The line for a Ctrl-C that reached a basic-launcher sweep between two jobs (in Hydra's code: the job before
    it has returned, the next has not started, so nothing is lost and a rerun into the sweep directory resumes it);
    None outside such a sweep. Was: "interrupted" alone."""
    running = _sweep_in_this_process[0]
    if running is None:
        return None
    sweep_dir, sweeper = running
    return sweep_resume_line(signal.SIGINT, sweep_dir, argv, sweeper, between_jobs=True)


def draws_other_trials_each_run(sweeper: Any) -> bool:
    """Whether a sweeper (``hydra.sweeper``) draws its jobs' values anew at each run: not the grid, and its sampler
    unseeded."""
    if is_grid_sweeper(sweeper.get("_target_")):
        return False
    sampler = sweeper.get("sampler")
    return sampler is None or sampler.get("seed") is None


class SweepEndedAtOnce(KeyboardInterrupt):
    """A second SIGINT or SIGTERM to a stopping sweep: joblib ends every worker at once (it does for any
    KeyboardInterrupt), and ``python -m softmoe.train`` exits with ``128 + signal`` after :attr:`message`."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum, self.message = signum, message
        self.exit_code = preempted_exit_code(signum)


class SweepStop(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``): in a process-parallel sweep, the first SIGINT or SIGTERM stops
    the sweep as the module docstring says; a second one ends it at once (:class:`SweepEndedAtOnce`)."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self._stop_file: Optional[Path] = None
        self._sweep_dir = ""
        self._signalled = False  # this process took a stop signal: the next one ends the sweep at once
        self._redraws = False  # the sweeper draws other trials at each run (an unseeded Optuna sampler)
        self._mask: set[int] = set()  # the main thread's signal mask before the sweep blocked the stop signals

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(config.hydra.launcher.get("_target_"))
        if launcher == BASIC_LAUNCHER:
            _sweep_in_this_process[0] = (str(config.hydra.sweep.dir), config.hydra.sweeper)
        if launcher not in PROCESS_PARALLEL_LAUNCHERS:
            return
        self._sweep_dir = str(config.hydra.sweep.dir)
        self._redraws = draws_other_trials_each_run(config.hydra.sweeper)  # no rerun resumes its stopped trials
        self._stop_file = Path(self._sweep_dir).absolute() / STOP_FILE
        self._stop_file.parent.mkdir(parents=True, exist_ok=True)
        self._stop_file.unlink(missing_ok=True)  # an earlier run of this sweep was stopped: this one resumes it
        os.environ[STOP_FILE_ENV] = str(self._stop_file)  # the workers start after this, with this environment
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._on_signal)
        # Workers are forked (and exec'd) by the main thread or by threads it starts from now on, and inherit the
        # forking thread's signal mask: with the stop signals blocked here, a Ctrl-C while a worker imports torch
        # waits for its job's code. The stdlib's resource tracker starts its server the same way, but unblocks them
        # again afterwards (SIG_UNBLOCK, not the mask it found): joblib starts it, so it starts before the block.
        resource_tracker.ensure_running()
        _keep_a_thread_that_receives_stop_signals()
        self._mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)

    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if not self._signalled:  # the first to this process (a job that stopped may have written the file already)
            self._signalled = True
            request_stop(signum)
            again = "Ctrl-C" if signum == signal.SIGINT else name
            print(f"sweep: {name} received: each running job stops after its step and saves last.pt, no further "
                  f"job starts; {again} again ends every job at once", file=sys.stderr, flush=True)
            return
        for other in STOP_SIGNALS:  # the end is under way: a third signal is the previous handlers' to answer
            signal.signal(other, self._previous.get(other, signal.SIG_DFL))
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        rerun = sweep_resume_command(self._sweep_dir, sys.argv[1:])
        resume = (f"rerun the sweep to resume its unfinished jobs: {rerun}" if not self._redraws else
                  "its sampler is not seeded, so a rerun would draw other trials: resume each trial alone with the "
                  "overrides in <its job dir>/.hydra/overrides.yaml and hydra.mode=RUN hydra.run.dir=<its job dir>")
        raise SweepEndedAtOnce(signum, f"sweep: {name} again: every job ended at once, keeping the last.pt it "
                                       f"saved before; {resume}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        _sweep_in_this_process[0] = None  # every job has ended: a Ctrl-C from here on leaves nothing to resume
        if self._stop_file is None:
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._mask)
        os.environ.pop(STOP_FILE_ENV, None)
        stopped = stop_signal_of(self._stop_file)
        self._stop_file.unlink(missing_ok=True)
        if stopped is not None:
            print(sweep_resume_line(stopped, self._sweep_dir, sys.argv[1:], config.hydra.sweeper), file=sys.stderr,
                  flush=True)
            sys.exit(preempted_exit_code(stopped))


def stop_signal_of(path: Path) -> Optional[int]:
    """The signal number a stop file holds; None where there is none (nobody stopped the sweep)."""
    try:
        return int(path.read_text() or signal.SIGINT)  # empty: read as it was being written
    except (OSError, ValueError):
        return None
