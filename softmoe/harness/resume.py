"""Which checkpoint a run continues from, and the reruns it refuses.

A run continues from its run directory's own ``last.pt`` (or FSDP's ``last.dcp``, the newer of them), else from
``trainer.resume``. It refuses a checkpoint of another model, and its own directory's checkpoint under another
experiment (:class:`~.errors.OtherExperimentError`): the directory would report the old run's results under the new
values. :func:`resume_checkpoint` is the run's own check, on the checkpoint it loads; :func:`resume_refusal` asks
the same before a sweep starts (``sweep_check``), reading only each checkpoint's config, so that a rerun one job
would refuse starts no job at all rather than running those before it. :func:`resumable_checkpoint` is
``trainer.resume``'s config rule, each refusal saying what to name instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional

from . import sharded_checkpoint
from .checkpoint import (
    BEST,
    LAST,
    NOT_A_CHECKPOINT,
    check_same_experiment,
    check_same_model,
    load_resume_checkpoint,
    resume_path,
)
from .errors import CheckpointError, OtherExperimentError
from .rules import counted
from .telemetry import METRICS_FILE

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------- config rules
# trainer.resume and model.upcycle_from (config.py applies them, before anything is read or built)


def _checkpoint_in(directory: Path) -> Optional[Path]:
    """The checkpoint in a run directory given where a checkpoint was asked for: its last, else its best."""
    return next(filter(None, (sharded_checkpoint.latest(directory, name) for name in (LAST, BEST))), None)


def _why_no_checkpoint(value: Any) -> Optional[tuple[str, Any]]:
    """Why ``value`` names no checkpoint file or readable sharded checkpoint, as (what it is, the detail), or None:
    ``missing`` (no such path, or no path at all: ``trainer.resume=3``), ``sharded`` (what is wrong, naming the file),
    ``run directory`` (the checkpoint in it), ``empty directory``. The two rules below word it each their way."""
    path = Path(value).expanduser() if isinstance(value, str) and value else None
    if path is not None and (path.is_file() or (path / ".metadata").is_file()):
        return None
    if path is None or not path.is_dir():
        return "missing", None
    if path.suffix == sharded_checkpoint.SUFFIX:
        return "sharded", sharded_checkpoint.problem(path)
    inside = _checkpoint_in(path)
    return ("run directory", inside) if inside is not None else ("empty directory", None)


def existing_checkpoint(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """A checkpoint file (``last.pt``) or a sharded checkpoint's directory (``last.dcp``, with DCP's ``.metadata``)."""
    why = _why_no_checkpoint(value)
    if why is None:
        return None
    kind, detail = why
    return {
        "missing": "no such checkpoint file",
        "sharded": f"a sharded checkpoint that cannot be read: {detail}",
        "run directory": f"a run directory, not a checkpoint; name one of its checkpoints ({detail})",
        "empty directory": "a directory holding no checkpoint (last.pt, best.pt); name a checkpoint file",
    }[kind]


START_FROM = "name another run's checkpoint (its last.pt, best.pt or last.dcp) to start from, or null to start afresh"


def resumable_checkpoint(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """null, or :func:`existing_checkpoint`, each refusal saying what to name instead; a run directory's own
    checkpoint is continued in place instead, its run resumed (``hydra.run.dir``)."""
    why = None if value is None else _why_no_checkpoint(value)
    not_whole = None if why is not None or value is None else sharded_checkpoint.train_state_not_a_checkpoint(value)
    if not_whole:
        return not_whole
    if why is None and str(value).endswith(".safetensors"):
        return ("an export of a model's weights (python -m softmoe.to_safetensors), not a training checkpoint: name "
                "the last.pt or best.pt it was exported from, or null to start afresh")
    if why is None:
        return None
    kind, detail = why
    return {
        "missing": f"no such file or directory; {START_FROM}",
        "sharded": f"a sharded checkpoint that cannot be read: {detail}; restore the file from a copy, or name another "
                   "checkpoint to start from, or null",
        "run directory": f"a run directory, not a checkpoint: to start a new run from it, name one of its checkpoints "
                         f"(trainer.resume={detail}); to continue that run, set hydra.run.dir={value} instead",
        "empty directory": f"a directory holding no checkpoint; {START_FROM}",
    }[kind]


# ----------------------------------------------------------------------------------------------- the run's own


def checkpoint_to_resume(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint a run in ``run_dir`` starts from (a sharded one: its directory), or None for a fresh start."""
    start_from = resume_path(run_dir, resume)
    own = sharded_checkpoint.latest_last(run_dir)  # of last.pt and FSDP's last.dcp (the strategy changed), the newer
    if own is not None and own.is_dir():
        start_from = own  # the run directory's own sharded checkpoint, before trainer.resume
    return start_from


def check_resumable(checkpoint: dict[str, Any], config: dict[str, Any], start_from: Path, run_dir: Path) -> None:
    """Refuse ``checkpoint`` (read from ``start_from``) for the run ``config`` in ``run_dir``: another model's, or,
    from the run directory itself, another experiment's (:class:`~.errors.OtherExperimentError`)."""
    own = start_from.parent == run_dir  # not trainer.resume's: this directory's run, to continue as it was started
    try:
        check_same_model(checkpoint, config, start_from, own=own)
    except CheckpointError as error:
        if own:  # the directory holds another model's run: refused as another experiment's is
            raise OtherExperimentError(str(error)) from None
        raise
    if own:
        check_same_experiment(checkpoint, config, start_from)


def resume_checkpoint(run_dir: Path, resume: Optional[str], config: dict) -> tuple[Optional[dict], Optional[Path]]:
    """(the checkpoint the run starts from, its path), or (None, None) for a fresh start: this directory's
    ``last.pt`` (or the ``last.prev.pt`` kept beside a damaged one) or sharded ``last.dcp``, else ``trainer.resume``.
    Refuses what :func:`check_resumable` refuses."""
    start_from = checkpoint_to_resume(run_dir, resume)
    check_no_results_replaced(run_dir, start_from)
    if start_from is None:
        return None, None
    try:
        if start_from.is_dir():
            checkpoint, start_from = sharded_resume_checkpoint(start_from, run_dir)
        else:
            checkpoint, start_from = load_resume_checkpoint(start_from)
    except CheckpointError as error:
        if start_from.parent == run_dir:  # the run directory's own: its message says what to do
            raise
        raise CheckpointError(unusable_resume(resume, start_from, error)) from None
    check_resumable(checkpoint, config, start_from, run_dir)
    if start_from.parent == run_dir and resume and Path(resume).expanduser().resolve() != start_from.resolve():
        log.warning("trainer.resume=%s is ignored: this run directory holds its own %s, which it continues; a "
                    "new run directory starts from trainer.resume", resume, start_from.name)
    return checkpoint, start_from


def check_no_results_replaced(run_dir: Path, start_from: Optional[Path]) -> None:
    """Refuse a run that would start afresh in a run directory holding a finished run's results without the
    checkpoint that continues it (its ``.pt`` files deleted to save space): the new run's ``metrics.jsonl`` and
    ``.hydra/`` would replace the old one's, test results and all."""
    if start_from is not None and start_from.parent == run_dir:
        return
    try:
        finished = '"test/acc"' in (run_dir / METRICS_FILE).read_text(errors="replace")
    except OSError:  # none: a new run directory
        return
    if finished:
        raise OtherExperimentError(
            f"{run_dir}: holds a finished run's results ({METRICS_FILE} logged its test accuracy) but no last.pt to "
            f"continue it, and a run started here would replace them; give a new run directory (hydra.run.dir=...)")


def unusable_resume(resume: str, path: Path, error: CheckpointError) -> str:
    """``trainer.resume``'s checkpoint could not be read (``error``): the key, what is wrong, what to name instead."""
    problem = str(error).removeprefix(f"{path}: ")
    if path.is_dir():  # a sharded checkpoint's message names its file and the run's other checkpoints
        return f"trainer.resume={resume}: {problem}"
    instead = "name a run's last.pt, best.pt or last.dcp to start from, or null to start afresh"
    if problem == NOT_A_CHECKPOINT:  # torch.load reads it: a model's weights, likely
        instead += "; to start an MoE model from a dense ViT's weights, set model.upcycle_from to the file instead"
    return f"trainer.resume={resume}: {problem}; {instead}"


def sharded_resume_checkpoint(path: Path, run_dir: Path) -> tuple[dict[str, Any], Path]:
    """The sharded checkpoint to resume from and where it came from: ``path``, or when that is damaged and it is a
    ``last.dcp``, the ``last.prev.dcp`` kept beside it (with a warning saying why), as for ``last.pt``."""
    found = sharded_checkpoint.problem(path)
    if found is None:
        return sharded_checkpoint.resume_checkpoint(path), path
    previous = sharded_checkpoint.previous(path)
    if path.name == sharded_checkpoint.directory(Path(), LAST).name and sharded_checkpoint.problem(previous) is None:
        log.warning("%s; resuming from the checkpoint before it, %s", found, previous)
        return sharded_checkpoint.resume_checkpoint(previous), previous
    if path.parent == run_dir:  # the run directory's own, which it continues before any trainer.resume
        others = [path.parent / name for name in sharded_checkpoint.others(path)]
        start = f" with trainer.resume={others[0]}" if others else ""
        raise CheckpointError(f"{found}; the run cannot continue from {path.name}: restore the file from a copy, or "
                              f"start a new run directory (a new hydra.run.dir){start}")
    raise sharded_checkpoint.damaged(path, found)  # trainer.resume's: naming the run's other checkpoints


def saved_config_only(path: Path) -> Optional[dict[str, Any]]:
    """``{"config": ..., "step": ...}`` of the checkpoint at ``path`` (a sharded one: its directory), read without
    its tensors (memory-mapped, never copied in), or None where it cannot be read so: the run itself then says why,
    or falls back to the ``last.prev.pt`` beside a damaged ``last.pt``."""
    try:
        state = sharded_checkpoint.state_without_tensors(path)
        if not isinstance(state, dict):  # a bare tensor: indexing it by name made torch warn before the refusal
            return None
        return {"config": state["config"], "step": state.get("step")}
    except Exception:  # unreadable, damaged, not a checkpoint: not this check's to report
        return None


def resume_refusal(run_dir: Path, resume: Optional[str], config: dict[str, Any]) -> Optional[str]:
    """Why the run ``config`` would refuse to start in ``run_dir`` (:func:`check_resumable`), in one line, or None;
    reads no tensor. A checkpoint it cannot read this way is left to the run."""
    start_from = checkpoint_to_resume(run_dir, resume)
    try:
        check_no_results_replaced(run_dir, start_from)
    except OtherExperimentError as error:
        return str(error)
    if start_from is None or not start_from.exists():
        return None
    checkpoint = saved_config_only(start_from)
    if checkpoint is None:
        return None
    try:
        check_resumable(checkpoint, config, start_from, run_dir)
    except CheckpointError as error:
        return str(error)
    total_steps = config["trainer"]["max_steps"]  # else the epochs' steps, which need the dataset: the run checks
    if start_from.parent != run_dir and isinstance(checkpoint["step"], int) and isinstance(total_steps, int):
        return past_the_runs_end(resume, checkpoint["step"], total_steps)
    return None


def past_the_runs_end(resume: str, step: int, total_steps: int) -> Optional[str]:
    """Why ``trainer.resume``'s checkpoint at ``step`` cannot start a run of ``total_steps`` steps (it would log
    "resuming at step 10 of 10", and test no best.pt of its own), or None."""
    if step < total_steps:
        return None
    return (f"trainer.resume={resume}: that checkpoint is at step {step}, already this run's "
            f"{counted(total_steps, 'step')}; raise trainer.max_steps (or trainer.max_epochs) to train on from it")
