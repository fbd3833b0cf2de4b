"""Train a (Soft MoE) vision transformer from the Hydra configs in ``conf/``.

    python -m softmoe.train                                        # Soft MoE ViT on digits, ~2 min on CPU
    python -m softmoe.train model=vit_small data=cifar10 model.patch_size=4 trainer=gpu
    python -m softmoe.train -m moe.num_experts=4,8 moe.slots_per_expert=1,2   # a sweep: one job each
    python -m softmoe.train hydra.run.dir=outputs/my_run           # again later: resumes from its last.pt

A bad value stops the run before anything loads, with one line naming the key (exit status 2), and leaves no
run directory behind; in a sweep, a bad value in any job stops it before its first job starts. Ctrl-C finishes
the step, saves ``last.pt`` and prints the command that resumes (exit status 130); a second Ctrl-C ends the
process at once.
Every exit status: ``softmoe/harness/errors.py``.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from softmoe.harness import sharded_checkpoint, sweep_stop
from softmoe.harness.distributed import quiet_other_ranks
from softmoe.harness.errors import (
    USER_ERROR_EXIT_CODE,
    USER_ERRORS,
    BadDataError,
    CheckpointWriteError,
    DiskFullError,
    NonFiniteError,
    OtherExperimentError,
    RunDirInUseError,
    disk_full,
    exit_code,
    one_line,
    preempted_exit_code,
    run_command,
    tell_torchrun,
)
from softmoe.harness.faults import Preempted, sigterm_interrupts
from softmoe.harness.launch_check import other_ranks_refusal
from softmoe.harness.console import final_dispatch_entropy, next_steps
from softmoe.harness.loop import train
from softmoe.harness.model import moe_blocks
from softmoe.harness.output_dirs import output_dir, output_dir_error
from softmoe.harness.overrides import composition_error, multirun_flag_first
from softmoe.harness.plausibility import check_model_choice
from softmoe.harness.resume_hint import resume_command
from softmoe.harness.rules import counted
from softmoe.harness.runs import (
    NewRunDirParents,
    read_sweep_record,
    remove_if_unused,
    restore_sweep_record,
    save_hydra_configs,
)
from softmoe.harness.sweep_check import duplicate_runs_warning, single_run_error, sweep_job_error, sweep_warning
from softmoe.harness.sweep_console import (
    EVERY_JOB, console_is_a_log_file, hand_to_sweep, speaks_for_the_job, tag_console,
)
from softmoe.harness.sweep_stop import sweep_resume_line
from softmoe.runtime import tune_allocator

log = logging.getLogger("softmoe.train")


def wandb_group_and_name(hydra_cfg: DictConfig) -> tuple[Optional[str], Optional[str]]:
    """A sweep's jobs share a W&B group (the sweep directory); each run is named by its overrides."""
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group = str(hydra_cfg.sweep.dir)
    return group, hydra_cfg.job.override_dirname or "defaults"


# A sweep job's objective when it stopped or never started (a float, as Optuna's sweeper needs; NaN: no result)
NO_OBJECTIVE = float("nan")

# Errors that can stop a run after it wrote last.pt (a config error stops it before, and its command is wrong).
MID_RUN_ERRORS = (NonFiniteError, BadDataError, CheckpointWriteError, DiskFullError)


def resume_message(tag: str, run_dir: Path) -> Optional[str]:
    """The line naming the run directory's ``last.pt`` (or ``last.dcp``) and the command that continues from it;
    None when it holds neither."""
    kept = sharded_checkpoint.latest_last(run_dir)
    if kept is None:
        return None
    hydra_cfg = HydraConfig.get()
    command = resume_command(hydra_cfg.overrides.task, run_dir, sweep_job=hydra_cfg.mode == RunMode.MULTIRUN)
    return f"{tag}{kept.name} is kept; resume with: {command}"


def preempted_line(preempted: Preempted, hydra_cfg: DictConfig, run_dir: Path) -> str:
    """A stop's line: what it saved, and the command that resumes from it. Not looked for on disk: the stop saved it,
    and under DDP rank 0 alone writes ``last.pt``, which another rank looked for before it was there and said
    "nothing to resume" (torchrun's report repeated that rank's line)."""
    command = resume_command(hydra_cfg.overrides.task, run_dir, sweep_job=hydra_cfg.mode == RunMode.MULTIRUN)
    return f"{preempted}; resume with: {command}"


def say(message: Optional[str]) -> None:
    """``message`` on stderr as one line in one write: a parallel sweep's workers share the console, and print's two
    writes (the text, then its newline) let another job's line in between ("[job 1] ...[job 0] ...", then both
    newlines)."""
    if message:
        try:
            sys.stderr.write(f"{message}\n")
            sys.stderr.flush()
        except OSError:  # the terminal is gone (SIGHUP stopped the run): train.log has the line
            pass


def say_how_to_resume(tag: str, run_dir: Path) -> None:
    """Print the command that continues from the run directory's ``last.pt`` (or ``last.dcp``), if it holds one."""
    say(resume_message(tag, run_dir))


# The resume line a crash leaves for the end of the output, printed after Hydra's traceback (registered at import:
# nothing is left to happen between a crash and its exit but storing the line, which a retry repeats harmlessly).
_resume_line_at_exit: list = []


@atexit.register
def _say_the_resume_line_at_exit() -> None:
    if _resume_line_at_exit:
        try:
            say(_resume_line_at_exit[-1])
        except Exception:  # a signal handler raised inside the first print (see the function below): again
            say(_resume_line_at_exit[-1])


def say_how_to_resume_after_a_crash(tag: str, run_dir: Path, after_the_traceback: bool) -> None:
    """:func:`say_how_to_resume` for a crash, whose traceback Hydra prints once the crash has left ``main``.

    ``after_the_traceback``: the line is printed as the process exits, so it is the last thing on screen rather
    than above a long traceback. A sweep's job says it at once instead: joblib's worker processes outlive the job.

    A signal handler may raise inside it, from its very first line on: PyTorch reports a DataLoader worker that
    died (the OOM killer's SIGKILL) from its SIGCHLD handler, which runs in the main thread wherever it is; when
    the worker's death first surfaced as another error (its half-sent batch), that is here. So the caller calls it
    inside a ``try`` and, on an error, once more before raising that error (``main``)."""
    message = resume_message(tag, run_dir)
    if after_the_traceback:
        _resume_line_at_exit[:] = [message] if message else []
    else:
        say(message)


def end_before_training(signum: int, tag: str, run_dir: Path, new_parents: int, hydra_cfg: DictConfig) -> NoReturn:
    """A run stopped by ``signum`` before its first step: one line, no run directory left (the folders made for it
    removed), the resume of a resumed run that was loading, and under the basic launcher the sweep's rerun."""
    by = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
    say(f"{tag}error: interrupted{by} before training started")
    remove_if_unused(run_dir, new_parents=new_parents)
    say_how_to_resume(tag, run_dir)  # a resumed run interrupted while loading
    say_the_sweeps_rerun(hydra_cfg, signum)
    sys.exit(preempted_exit_code(signum))


def say_the_sweeps_rerun(hydra_cfg: DictConfig, signum: int) -> None:
    """Under the basic launcher a job's exit by ``signum`` ends the whole sweep: say the rerun that resumes it."""
    if sweep_stop.in_this_process(hydra_cfg) and speaks_for_the_job():
        say(sweep_resume_line(signum, hydra_cfg.sweep.dir, sys.argv[1:], hydra_cfg.sweeper))


# (sweep dir, its multirun.yaml's bytes or None), read before Hydra starts: Hydra's basic sweeper rewrites that file
# before the first job runs (a plain copy goes to joblib's and submitit's job processes, which pickle main by value).
_sweep_record_found: list = [None]


def keep_sweep_record(sweep_dir: Path) -> None:
    """Put ``<sweep dir>/multirun.yaml`` back as this command found it: a job that refuses its run directory (it
    holds another experiment, or a live process trains there) changed no run of the sweep, so the sweep's record of
    its runs must not change either. The command refuses such a rerun before Hydra starts (``sweep_check`` reads each
    job's checkpoint config); this is for what it cannot foresee: a process that took a run directory since, a grid
    of more jobs than it checks, run directories named after ``hydra.job.id``, which only the launcher knows. Hydra
    writes the file before any job code runs, so undoing that one write is what the job can do. Every torchrun rank
    puts it back after its own sweeper's write, so none of those writes is left last."""
    found = _sweep_record_found[0]
    if found is not None and found[0] == sweep_dir.absolute():  # else ${now:} moved on: a new sweep dir
        restore_sweep_record(sweep_dir, found[1])


def train_on_this_disk(*args: Any, **kwargs: Any):
    """``train``, with a full disk under ``metrics.jsonl`` or ``train.log`` raised as :class:`DiskFullError`: one line,
    as for a checkpoint's (was: three chained OSError tracebacks)."""
    try:
        return train(*args, **kwargs)
    except Exception as error:
        full = disk_full(error)
        if full is None:
            raise
        raise full from error


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    tune_allocator()  # glibc keeps freed memory for reuse: the expert gradients are not page-faulted every step
    quiet_other_ranks()  # under torchrun rank 0 logs; the others only warn, on the console
    # parallel jobs (launcher=joblib) share the terminal: each line says whose it is, and a warning every job
    # repeats is shown once for the sweep
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tag = f"[job {hydra_cfg.job.num}] " if multirun else ""
    tag_console(tag, Path(hydra_cfg.sweep.dir) if multirun else None)
    group, name = wandb_group_and_name(hydra_cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # the parent folders Hydra made for the run directory (outputs/debug/<date> in a fresh working directory): a
    # run that never starts removes them again, no folder that was there; a job's is in its sweep dir, which stays
    new_parents = NewRunDirParents.count if not multirun else 0
    sweep_stop.ignore_stop_signals_between_jobs()  # a joblib worker; its job's stop guard takes Ctrl-C while it trains
    stopped = sweep_stop.stop_requested()
    if stopped is not None:  # a job of a parallel sweep that was stopped while it waited for a worker
        say(f"{tag}not started: the sweep was stopped by {signal.Signals(stopped).name}")
        remove_if_unused(run_dir)
        return NO_OBJECTIVE
    try:
        check_model_choice(OmegaConf.select(cfg, "model.name"), hydra_cfg.runtime.choices.get("model"))
        # Hydra's .hydra/ configs are written once this process holds the run directory (conf/hydra/default.yaml)
        hydra_configs = functools.partial(save_hydra_configs, task_cfg=cfg, hydra_cfg=HydraConfig.instance().cfg)
        with sigterm_interrupts():  # until the run's stop guard takes over: one line, as for Ctrl-C
            summary = train_on_this_disk(cfg, run_dir, wandb_group=group, wandb_name=name, on_claim=hydra_configs)
    except (*USER_ERRORS, NonFiniteError) as error:
        lines = [f"{tag}error: {one_line(error)}"]
        say(lines[0])
        if not isinstance(error, RunDirInUseError):  # that directory is the other process's
            remove_if_unused(run_dir, new_parents=new_parents)  # a run that never started leaves no folder
        if multirun and isinstance(error, (OtherExperimentError, RunDirInUseError)):  # a refused rerun
            keep_sweep_record(Path(hydra_cfg.sweep.dir))
        if isinstance(error, MID_RUN_ERRORS):  # a NaN stop, a bad file met mid-run, a full disk: last.pt is kept
            resume = resume_message(tag, run_dir)
            say(resume)
            lines += [resume] if resume else []
        # submitit's job: the sweep's process prints its lines; joblib's: the jobs beside it run on, and the sweep
        # repeats its lines as it ends
        if multirun and (console_is_a_log_file(hydra_cfg) or sweep_stop.others_run_on_after_an_error(hydra_cfg)):
            hand_to_sweep(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, lines, exit_code(error))
            return NO_OBJECTIVE
        tell_torchrun(lines)
        sys.exit(exit_code(error))
    except Preempted as preempted:
        stopped = preempted_line(preempted, hydra_cfg, run_dir)  # the console's line, and torchrun's root cause
        log.warning("%s", stopped, extra=EVERY_JOB)
        if sweep_stop.in_parallel_sweep():  # the worker outlives its job: an exit would abort the other jobs' saves
            sweep_stop.request_stop(preempted.signum)  # the whole sweep stops, as under the basic launcher
            return NO_OBJECTIVE
        preempted.handover()  # e.g. submitit's requeue on SLURM; it may exit the process itself
        tell_torchrun([f"{tag}{stopped}"])
        say_the_sweeps_rerun(hydra_cfg, preempted.signum)
        sys.exit(preempted.exit_code)
    except KeyboardInterrupt as interrupted:  # Ctrl-C or SIGTERM (TerminatedEarly) before training started
        end_before_training(getattr(interrupted, "signum", signal.SIGINT), tag, run_dir, new_parents, hydra_cfg)
    except Exception:  # a crash: Hydra prints the traceback; a checkpoint written before it is not lost
        try:  # the call inside the try: a signal handler may raise as the function starts (see its docstring)
            say_how_to_resume_after_a_crash(tag, run_dir, after_the_traceback=not multirun)
        except Exception:
            say_how_to_resume_after_a_crash(tag, run_dir, after_the_traceback=not multirun)
            raise
        raise
    log.info("done: %s, %s", summary.describe(), counted(summary.steps, "step"))
    entropy = final_dispatch_entropy(summary.run_dir)
    if entropy:
        log.info(entropy)
    log.info("run directory: %s", summary.run_dir)
    log.info("W&B run: %s", summary.wandb_run_path or "none")
    if not multirun and speaks_for_the_job():
        routed = bool(moe_blocks(cfg.moe, cfg.model.depth))  # a dense ViT has no routing to look at
        log.info("next:\n  %s", "\n  ".join(next_steps(summary.run_dir, routed)))  # a sweep's end names collect
    # The objective a Hydra sweeper (e.g. Optuna) maximises: validation, never test, accuracy.
    return summary.best_val_acc


def command_line() -> None:
    """``python -m softmoe.train``: the checks that need no Hydra, then Hydra's main."""
    sys.argv[1:] = multirun_flag_first(sys.argv[1:])  # -m anywhere: Hydra's parser takes it before the overrides
    try:
        check_before_hydra()
    except KeyboardInterrupt:  # the checks write nothing (a sweep's record is read, not written)
        print("interrupted while starting (checking the config): nothing was run or written", file=sys.stderr)
        sys.exit(preempted_exit_code(signal.SIGINT))
    try:
        main()
    except sweep_stop.SweepEndedAtOnce as ended:  # a second Ctrl-C to a stopping joblib sweep
        print(ended.message, file=sys.stderr)
        sys.exit(ended.exit_code)
    except KeyboardInterrupt:  # in Hydra's code, outside every job; between two jobs of a basic sweep, say the rerun
        between_jobs = sweep_stop.interrupted_sweep_line(sys.argv[1:])
        if not between_jobs:
            raise
        print(between_jobs, file=sys.stderr)
        sys.exit(preempted_exit_code(signal.SIGINT))


def say_refusal(problem: str) -> None:
    """``error: <problem>`` on the console, and for torchrun's report."""
    if os.environ.get("LOCAL_RANK", "0") == "0":  # under torchrun, once per node: its ranks read the same files
        print(f"error: {problem}", file=sys.stderr, flush=True)
    tell_torchrun([f"error: {problem}"])  # every rank's: torchrun names the first to end as the root cause


def check_before_hydra() -> None:
    """The checks that need no Hydra: a bad command line exits here with one line (status 2)."""
    # a mistyped key or option, a run dir Hydra cannot make (or an empty one), a sweep with a bad value in any job:
    # one line, before Hydra starts; the run dir before the jobs, whose checks look into their run dirs
    planned = output_dir(sys.argv[1:], "train")  # composed once: checked here, a sweep's multirun.yaml read below
    problem = (composition_error(sys.argv[1:], "train") or output_dir_error(planned, sys.argv[1:])
               or sweep_job_error(sys.argv[1:], "train") or single_run_error(sys.argv[1:], "train"))
    # under torchrun every rank hears the others' verdict before any goes on: another node's files may differ, and
    # a rank that went on would wait in init_process_group for ranks that refused and exited
    if problem:
        say_refusal(problem)
    elsewhere = other_ranks_refusal(problem)
    if elsewhere:
        say_refusal(f"not started: {elsewhere}")
    if problem or elsewhere:
        sys.exit(USER_ERROR_EXIT_CODE)
    for warning in (sweep_warning(sys.argv[1:], "train"), duplicate_runs_warning(sys.argv[1:], "train")):
        if warning:  # once for the sweep, here: not once per job
            print(f"warning: {warning}", file=sys.stderr)
    if planned and planned[0] == "hydra.sweep.dir":
        _sweep_record_found[0] = (planned[1].absolute(), read_sweep_record(planned[1]))


if __name__ == "__main__":
    run_command(command_line)
