"""A training run directory, back in memory: the model with its trained weights, its config, its data, its log.

    run = load_run("outputs/runs/2026-11-29/12-00-00")             # best.pt; checkpoint="last" for last.pt
    images, labels = next(iter(build_loader(run.data.test, 64, train=False)))
    with torch.no_grad(), softmoe.capture_routing(run.model) as records:
        run.model(images.to(run.device))
    events = read_events(run_dir)                                   # metrics.jsonl, one dict per log event

Used by ``python -m softmoe.evaluate`` and the notebooks. The model is rebuilt from the checkpoint alone:
the resolved config saved inside it (through the one config-to-model path, ``build_model``) and the weights.

:class:`RunDirLock` keeps a second process (the same command started twice, a requeued job while the old one
still runs) out of a run directory a live process trains in.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import sharded_checkpoint
from .checkpoint import CONFIG_SECTIONS, CheckpointError, load_checkpoint, saved_config, weights_that_fit
from .config import resolve_device
from .data import DataBundle, build_datasets
from .errors import ConfigError, RunDirInUseError
from .model import build_model
from .telemetry import METRICS_FILE, json_lines
from .whole_files import replaced_whole

CHECKPOINTS = ("best", "last")
LOCK_FILE = ".lock"  # in the run directory; holds the pid and host of the process training there


@dataclass
class LoadedRun:
    """A run rebuilt from one of its checkpoints."""

    model: nn.Module  # in eval mode, on ``device``, with the checkpoint's weights
    cfg: DictConfig  # the run's resolved config, as saved in the checkpoint
    data: DataBundle  # both splits of the run's dataset
    step: int  # the optimizer step the checkpoint was saved at
    checkpoint: Path
    device: torch.device


def checkpoint_path(run_dir: Union[str, Path], checkpoint: str = "best", checkpoint_key: str = "checkpoint",
                    run_dir_key: str = "run_dir") -> Path:
    """``<run_dir>/<checkpoint>.pt`` or the sharded ``<checkpoint>.dcp`` of an FSDP run, the newer when both are there
    (the run changed strategy); a ConfigError for a checkpoint name other than best or last, a CheckpointError when
    neither is there. ``checkpoint_key``, ``run_dir_key``: what the caller's user sets to choose the checkpoint and
    the run, as the errors name them (``SOFTMOE_CHECKPOINT`` and ``SOFTMOE_RUN_DIR`` in the routing notebook)."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"{checkpoint_key}={checkpoint}: must be one of {', '.join(CHECKPOINTS)}")
    if not Path(run_dir).is_dir():  # a notebook's placeholder left as it is, a mistyped path, a checkpoint's path
        what = "a file, not a directory" if Path(run_dir).exists() else "no such directory"
        raise CheckpointError(f"{run_dir_key}={run_dir}: {what} (a training run directory holds best.pt and last.pt)")
    path = sharded_checkpoint.latest(run_dir, f"{checkpoint}.pt")
    sharded = sharded_checkpoint.directory(run_dir, checkpoint) if path is None else path
    found = sharded_checkpoint.problem(sharded) if sharded.is_dir() else None
    if found is not None:  # damaged: the file it lacks, and the checkpoints this setting can name instead (was: all
        # of the run's, last.prev.dcp among them, which it refuses)
        others = [name for name in CHECKPOINTS
                  if name != checkpoint and sharded_checkpoint.latest(run_dir, f"{name}.pt") is not None]
        instead = f", or set {checkpoint_key}={others[0]}" if others else ""
        raise CheckpointError(f"{found}; restore the file from a copy of {sharded.name}{instead}")
    if path is None and checkpoint == "best" and sharded_checkpoint.latest(run_dir, "last.pt") is not None:
        raise CheckpointError(f"{run_dir_key}={run_dir}: holds no best.pt, only last.pt: no validation selected a "
                              "model (data.val_size=0, or a run stopped before its first validation); "
                              f"set {checkpoint_key}=last")
    if path is None:
        raise CheckpointError(sweep_dir_message(Path(run_dir), run_dir_key)
                              or f"{run_dir_key}={run_dir}: holds no {checkpoint}.pt (is it a training run directory?)")
    return path


def sweep_dir_message(run_dir: Path, run_dir_key: str = "run_dir") -> Optional[str]:
    """What to evaluate instead of a sweep directory (Hydra's ``multirun.yaml`` beside its jobs' run directories):
    one of its runs, and their names (``runs 0-5``: numbered jobs as ranges); None for any other directory.
    ``run_dir_key``: how the message names the setting (see :func:`checkpoint_path`)."""
    if not (run_dir / "multirun.yaml").is_file():
        return None
    runs = [path.name for path in run_dir.iterdir() if (path / ".hydra").is_dir() or (path / METRICS_FILE).is_file()]
    if not runs:
        return f"{run_dir_key}={run_dir}: a sweep directory whose jobs have written no run directory yet"
    if all(name.isdigit() for name in runs):  # Hydra's own job numbers (hydra.sweep.subdir)
        spans: list[list[int]] = []
        for job in sorted(map(int, runs)):
            if spans and job == spans[-1][1] + 1:
                spans[-1][1] = job
            else:
                spans.append([job, job])
        first, names = str(spans[0][0]), ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in spans)
    else:  # an experiment's own hydra.sweep.subdir (seed0, ...)
        runs = sorted(runs)
        first, names = runs[0], ", ".join(runs[:6]) + (f", ... ({len(runs)} in all)" if len(runs) > 6 else "")
    return (f"{run_dir_key}={run_dir}: a sweep directory; evaluate one of its runs: {run_dir_key}={run_dir / first} "
            f"(runs {names})")


def load_run(
    run_dir: Union[str, Path],
    checkpoint: str = "best",
    *,
    device: str = "auto",
    data_dir: Optional[str] = None,
    data_root: Optional[str] = None,
    checkpoint_key: str = "checkpoint",
    run_dir_key: str = "run_dir",
) -> LoadedRun:
    """The model, config and data of ``<run_dir>/<checkpoint>.pt``.

    ``device``: ``auto`` (CUDA when present, else MPS, else the CPU), ``cpu``, ``cuda``, ...; ``data_dir``: where the
    datasets are now, when not at the run's ``paths.data_dir`` (relative paths are from the working directory);
    ``data_root``: the folder that holds the run's dataset now, in place of its ``data.root`` (a run that set one
    reads nothing from ``data_dir``);
    ``checkpoint_key``, ``run_dir_key``: how the errors name the settings that chose ``checkpoint`` and ``run_dir``
    (a notebook's environment variables).
    """
    path = checkpoint_path(run_dir, checkpoint, checkpoint_key, run_dir_key)
    state = sharded_checkpoint.read_checkpoint(path) if path.is_dir() else load_checkpoint(path)
    cfg = OmegaConf.create(saved_config(state, path, sections=CONFIG_SECTIONS))
    torch_device = resolve_device(device)

    data = build_datasets(data_config_now(cfg.data, data_dir, data_root), data_dir or cfg.paths.data_dir)
    model = build_model(cfg.model, cfg.moe, upcycle_weights=False)  # the weights are the checkpoint's
    with weights_that_fit(path):
        model.load_state_dict(state["model"])
    model.to(torch_device).eval()
    return LoadedRun(model=model, cfg=cfg, data=data, step=state["step"], checkpoint=path, device=torch_device)


def data_config_now(data: DictConfig, data_dir: Optional[str], data_root: Optional[str]) -> DictConfig:
    """The run's ``data`` config with its files where they are now: ``data.root`` replaced by ``data_root``. A
    ``data_dir`` for a run that set ``data.root`` is refused: that run reads nothing from it."""
    if data_root is not None:
        return OmegaConf.merge(data, {"root": data_root})
    if data_dir is not None and data.get("root"):
        raise ConfigError(f"data_dir={data_dir}: this run read its data from data.root={data.root}, not from "
                          "paths.data_dir; give the folder that holds its files now as data_root=<folder>")
    return data


def read_events(run_dir: Union[str, Path]) -> list[dict[str, Any]]:
    """The log events of ``<run_dir>/metrics.jsonl`` in order, each a dict with ``step`` and ``epoch``.

    A torn last line (a run killed while writing it) is skipped.
    """
    return list(json_lines(Path(run_dir) / METRICS_FILE))


HYDRA_FILES = (".hydra", "train.log")  # Hydra's log, and the configs written for it (save_hydra_configs)


def save_hydra_configs(run_dir: Union[str, Path], task_cfg: Any, hydra_cfg: Any) -> None:
    """Write ``<run_dir>/.hydra/{config,hydra,overrides}.yaml`` as Hydra would. Hydra writes them before any job
    code runs, so a second process refused by the run directory's lock would already have overwritten a live
    run's; ``conf/hydra/default.yaml`` turns that off (``output_subdir: null``) and the trainer calls this once it
    holds the directory."""
    configs = Path(run_dir) / ".hydra"
    configs.mkdir(parents=True, exist_ok=True)
    for name, cfg in (("config", task_cfg), ("hydra", hydra_cfg), ("overrides", hydra_cfg.hydra.overrides.task)):
        (configs / f"{name}.yaml").write_text(OmegaConf.to_yaml(cfg), encoding="utf-8")


def remove_if_unused(run_dir: Union[str, Path], *, new_parents: int = 0) -> bool:
    """Delete ``run_dir`` when it holds nothing but Hydra's own files (and the run lock): what a run that never
    started (a bad config value, missing data) leaves. Returns whether it was deleted.

    ``new_parents``: then also up to that many of its parent folders, innermost first, each only if that leaves it
    empty: those Hydra made for it (:class:`NewRunDirParents`, counted as Hydra started), never a folder that was
    there before."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or any(path.name not in (*HYDRA_FILES, LOCK_FILE) for path in run_dir.iterdir()):
        return False
    for handler in logging.getLogger().handlers[:]:  # Hydra's <run_dir>/train.log
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).parent == run_dir.resolve():
            logging.getLogger().removeHandler(handler)
            handler.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    for parent in run_dir.absolute().parents[:new_parents]:
        try:
            parent.rmdir()
        except OSError:  # not empty: another run of that day is in it
            break
    return True


SWEEP_RECORD = "multirun.yaml"  # a sweep's config, which Hydra's basic sweeper writes before its first job starts


def read_sweep_record(sweep_dir: Union[str, Path]) -> Optional[bytes]:
    """``<sweep_dir>/multirun.yaml``'s bytes, or None when there is none."""
    try:
        return (Path(sweep_dir) / SWEEP_RECORD).read_bytes()
    except OSError:  # no such file (a new sweep), or no such directory
        return None


def restore_sweep_record(sweep_dir: Union[str, Path], record: Optional[bytes]) -> None:
    """Put ``<sweep_dir>/multirun.yaml`` back as :func:`read_sweep_record` found it (None: no file). Written beside
    it and renamed over it: parallel jobs that refuse their run directories may restore it at once."""
    path = Path(sweep_dir) / SWEEP_RECORD
    if record is None:
        path.unlink(missing_ok=True)
        return
    with replaced_whole(path) as temporary:
        temporary.write_bytes(record)


def missing_parents(run_dir: Union[str, Path]) -> int:
    """How many of ``run_dir``'s parent folders do not exist yet (``outputs/debug/<date>`` in a fresh working
    directory: 3): those that making it makes, which a run that never starts removes again."""
    missing = 0
    for parent in Path(run_dir).absolute().parents:
        if parent.exists():
            break
        missing += 1
    return missing


class NewRunDirParents(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``): as a single run starts, how many parent folders of its run
    directory Hydra is about to make (:func:`missing_parents`), for a run that never starts to remove again.

    Counted here, on the config Hydra makes the directory from, and not on a path resolved before Hydra started: that
    one resolved ``${now:}`` a moment earlier, so a run started just before midnight counted today's date folder,
    there already, and left tomorrow's, which Hydra made, behind. Resolving ``hydra.run.dir`` fills the ``${now:}``
    cache Hydra's ``run_job`` then reads: the same path."""

    count = 0  # this process's run; a class attribute, since Hydra holds the instance

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        NewRunDirParents.count = missing_parents(OmegaConf.select(config, "hydra.run.dir"))


class RunDirLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` while a process trains there.

    The kernel drops the lock when its holder exits however it dies (SIGKILL included), so a lock is never
    stale; the file stays, holding the last holder's pid and host for the message a second process
    gets. Use as a context manager, or :meth:`acquire` / :meth:`release`. A forked child (a DataLoader worker)
    closes its copy of the lock's file at once (:func:`_close_locks_in_child`): a flock belongs to the open file,
    which the child shares, so the workers a SIGKILL orphaned held the killed run's lock for seconds, and its
    rerun was refused as "in use by process <the dead one>".
    """

    def __init__(self, run_dir: Union[str, Path]) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def acquire(self) -> "RunDirLock":
        """Take the lock, or raise :class:`RunDirInUseError` naming the process that holds it."""
        file = open(self.path, "a+")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "another process"
            file.close()
            raise RunDirInUseError(self._in_use(holder)) from None
        file.seek(0)
        file.truncate()
        file.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        file.flush()
        self._file = file
        _HELD_LOCKS.add(self)
        return self

    def in_use(self) -> Optional[str]:
        """Why :meth:`acquire` would refuse now (a live process holds the lock), in one line, or None. Takes no lock
        and writes nothing: a shared lock conflicts only with a holder's exclusive one, and is dropped at once."""
        try:
            file = open(self.path)
        except OSError:  # no lock file: no process has trained here (or the directory is not one)
            return None
        with file:
            try:
                fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return self._in_use(file.read().strip() or "another process")
            fcntl.flock(file, fcntl.LOCK_UN)
        return None

    def _in_use(self, holder: str) -> str:
        return (f"{self.path.parent}: in use by {holder}; wait for it to end or stop it, or give this run another "
                "hydra.run.dir")

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
        _HELD_LOCKS.discard(self)

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc_info: Any) -> None:
        self.release()


_HELD_LOCKS: "weakref.WeakSet[RunDirLock]" = weakref.WeakSet()


def _close_locks_in_child() -> None:
    """In a forked child: close the held locks' files without unlocking them (LOCK_UN on the shared open file would
    unlock the parent too); the parent keeps its lock, and the child holds none."""
    for lock in list(_HELD_LOCKS):
        if lock._file is not None:
            lock._file.close()
            lock._file = None
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_locks_in_child)
