"""One checkpoint format for ``last.pt`` and ``best.pt``: written atomically, read without unpickling code.

A checkpoint is a dict of tensors, numbers, strings and containers of them (so ``torch.load(...,
weights_only=True)`` reads it): model, optimizer, scheduler and grad-scaler states, every RNG state,
the step, the best evaluation so far, the resolved config (a JSON string) and the W&B run id.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import zlib
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import numpy as np
import torch

from softmoe.upcycle import load_tensors, why_torch_load_failed

from .errors import CheckpointError, CheckpointWriteError, OtherExperimentError, write_failure
from .plausibility import group_setting
from .rules import format_value

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"
NOT_A_CHECKPOINT = f"not a softmoe checkpoint of format {FORMAT_VERSION}"  # a file torch.load reads: weights alone?
PREVIOUS = "last.prev.pt"  # the `last` before the newest one, kept in case the newest is damaged


def content_checksum(state: Any, crc: int = 0) -> int:
    """CRC-32 of every tensor's bytes and every other value, in order: torch.load does not notice flipped
    bytes inside tensor data, so each checkpoint carries this and loading compares it."""
    if isinstance(state, dict):
        for key, value in state.items():
            crc = content_checksum(value, zlib.crc32(repr(key).encode(), crc))
    elif isinstance(state, (list, tuple)):
        for value in state:
            crc = content_checksum(value, crc)
    elif isinstance(state, torch.Tensor):
        data = state.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        crc = zlib.crc32(repr((str(state.dtype), tuple(state.shape))).encode(), zlib.crc32(data, crc))
    else:
        crc = zlib.crc32(repr(state).encode(), crc)
    return crc


def save_checkpoint(path: Path, state: dict[str, Any], *, keep_previous: bool = False) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, fsync, then rename over the old one.

    A crash at any moment, or a full disk, leaves either the previous checkpoint or the new one, never a
    partial file. ``keep_previous``: the checkpoint being replaced becomes ``last.prev.pt`` (a hard link,
    so ``path`` itself is never missing), the fallback when the new one turns out unreadable.
    """
    path = Path(path)
    state = {**state, "checksum": content_checksum({k: v for k, v in state.items() if k != "checksum"})}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove_stale_temporaries(path.parent)
    try:
        try:
            with open(temporary, "wb") as file:
                torch.save(state, file)
                file.flush()
                os.fsync(file.fileno())
        except (OSError, RuntimeError) as error:  # torch.save: a failed write as a RuntimeError ("unexpected pos")
            cause = write_failure(error)
            if cause is None:
                raise
            full = " (the disk is full)" if cause.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            kept = f"; {path.name} still holds the previous checkpoint" if path.exists() else ""
            problem = f"{path}: could not be written{full}: {cause.strerror or cause}{kept}"
            raise CheckpointWriteError(problem) from error
        if keep_previous and path.exists():
            _keep_previous(path)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def remove_stale_temporaries(run_dir: Path) -> None:
    """Remove the partial checkpoints of processes killed mid-write (``.last.pt.<pid>.tmp``, a model's size each:
    gigabytes for a ViT-H, left forever). The run directory's lock makes this process its only writer, so every
    other process's temporary is stale."""
    own = f".{os.getpid()}.tmp"
    for temporary in Path(run_dir).glob(".*.pt.*.tmp"):
        if not temporary.name.endswith(own) and temporary.name.rsplit(".", 2)[-2].isdigit():
            temporary.unlink(missing_ok=True)


def _keep_previous(path: Path) -> None:
    previous = path.with_name(PREVIOUS)
    link = path.with_name(f".{PREVIOUS}.{os.getpid()}.tmp")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, previous)
    except OSError:  # a file system without hard links: the previous checkpoint is not kept
        link.unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; never executes code stored in the file (``weights_only=True``).

    Raises :class:`CheckpointError` for a truncated or corrupted file (its checksum disagrees), or one
    carrying objects other than tensors, numbers, strings and containers of them (a pickle that would
    run code is refused, not run).
    """
    try:
        state = load_tensors(path)
    except Exception as error:  # truncated, corrupted, or carrying objects other than tensors and containers
        raise CheckpointError(f"{path}: not a readable checkpoint ({why_torch_load_failed(error)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: {NOT_A_CHECKPOINT}")
    if "checksum" in state:
        stored = state.pop("checksum")
        if content_checksum(state) != stored:
            raise CheckpointError(f"{path}: corrupted (its contents do not match the checksum saved with them)")
    return state


# The config sections of every checkpoint the trainer writes, from which evaluate rebuilds the run
CONFIG_SECTIONS = ("model", "moe", "data", "trainer")


@contextlib.contextmanager
def weights_that_fit(path: Path) -> Iterator[None]:
    """Around loading checkpoint ``path``'s weights into the model its config built: torch's ``load_state_dict``
    error for weights that do not fit it (an edited checkpoint) becomes a :class:`CheckpointError` in one line."""
    try:
        yield
    except RuntimeError as error:
        lines = str(error).splitlines()
        if not lines or not lines[0].startswith("Error(s) in loading state_dict"):
            raise
        details = "; ".join(line.strip().rstrip(".") for line in lines[1:] if line.strip())
        raise CheckpointError(f"{path}: its weights do not fit the model its config builds ({details[:400]}"
                              f"{'...' if len(details) > 400 else ''})") from None


def load_resume_checkpoint(path: Path) -> tuple[dict[str, Any], Path]:
    """The checkpoint to resume from and where it came from: ``path``, or when that is damaged or missing and it is
    the run directory's ``last.pt``, the ``last.prev.pt`` kept beside it (with a warning saying why; a missing one
    restarted the run from step 0, "its earlier attempt stopped before its first checkpoint")."""
    path = Path(path)
    previous = path.with_name(PREVIOUS)
    if path.name == LAST and not path.is_file() and previous.is_file():  # deleted (or a dangling link)
        log.warning("%s: missing; resuming from the checkpoint before it, %s", path, previous)
        return load_checkpoint(previous), previous
    try:
        return load_checkpoint(path), path
    except CheckpointError as error:
        if path.name != LAST or not previous.is_file():
            raise
        log.warning("%s; resuming from the checkpoint before it, %s", error, previous)
        try:
            return load_checkpoint(previous), previous
        except CheckpointError as second:
            raise CheckpointError(f"{error}; and the previous one: {second}") from None


def resume_path(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint a run starts from: the run directory's own ``last.pt`` (a re-run of the same command
    resumes by itself), else ``trainer.resume``, else none."""
    last = Path(run_dir) / LAST
    if last.is_file() or last.with_name(PREVIOUS).is_file():  # a missing last.pt beside last.prev.pt: that one
        return last
    return Path(resume).expanduser() if resume else None


def saved_config(state: dict[str, Any], path: Optional[Path] = None, sections: tuple = ()) -> dict[str, Any]:
    """The run config a checkpoint saved (JSON), with each of ``sections`` a mapping; a checkpoint edited so that
    it is not is refused naming ``path`` (was: json's, OmegaConf's or a ``KeyError``'s traceback)."""
    try:
        config = json.loads(state["config"])
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: no run can be rebuilt from it (its config is not the JSON of a run's "
                              "config)") from None
    missing = [name for name in sections if not isinstance(config, dict) or not isinstance(config.get(name), dict)]
    if missing:
        raise CheckpointError(f"{path}: no run can be rebuilt from it (its config has no {missing[0]} section)")
    return config


# moe keys that set how the router trains, not which model: the optimizer's groups carry them
ROUTER_OPTIMIZATION_KEYS = {("moe", key) for key in ("router_lr_mult", "router_weight_decay", "phi_weight_decay")}


def check_same_model(state: dict[str, Any], config: dict[str, Any], path: Path, *, own: bool = False) -> None:
    """Refuse to resume a checkpoint whose ``model`` or ``moe`` config, or whose optimizer class, differs from this
    run's (another optimizer's state does not fit: SGD's has no Adam moments). ``own``: the run directory's own
    checkpoint, else ``trainer.resume``'s; each is refused with what to do in its case."""
    saved = saved_config(state, path, sections=("model", "moe"))
    before, now = (cfg.get("optimizer", {}).get("_target_") for cfg in (saved, config))
    if before is not None and before != now:
        raise CheckpointError(_refusal(group_setting("optimizer", now), group_setting("optimizer", before), path,
                                       own, "whose state another optimizer cannot take"))
    for section in ("model", "moe"):
        # the group's option first (model=vit_tiny), before the keys it sets (model.depth)
        for key in sorted(set(saved[section]) | set(config[section]), key=lambda key: (key != "name", key)):
            if (section, key) == ("moe", "expert_parallel"):
                continue  # where the experts live, not which model: checkpoints always hold the whole model
            if (section, key) in (("model", "upcycle_from"), ("model", "upcycle_noise_std")):
                continue  # where the weights started, not which model: a resumed run takes the checkpoint's
            before, now = saved[section].get(key), config[section].get(key)
            if before != now:
                why = ("whose optimizer state holds the router's learning rate and weight decay per group (a resumed "
                       "optimizer takes them back)" if (section, key) in ROUTER_OPTIMIZATION_KEYS
                       else "another model, whose weights this one cannot take")
                raise CheckpointError(_refusal(*_what_the_user_set(saved, config, section, key), path, own, why))


# The model keys that follow the data's (conf/model/*.yaml: ``img_size: ${data.img_size}``)
MODEL_KEYS_FROM_DATA = ("img_size", "in_chans", "num_classes")


def _what_the_user_set(saved: dict[str, Any], config: dict[str, Any], section: str, key: str) -> tuple[str, str]:
    """(now, before) as the settings a user types for the differing ``section.key``: ``model=vit_tiny`` for the
    group's option, and for a model key that follows the data, the data's option (``data=synthetic``) or key
    (``data.img_size=32``), which the command line set; ``model.img_size`` itself must equal it."""
    if key == "name":
        return f"{section}={config[section][key]}", f"{section}={saved[section][key]}"
    if (section, key) == ("moe", "placement"):  # conf/moe's options set only it: moe=every_other, moe=dense (none)
        option = {"none": "dense"}
        return (f"moe={option.get(config[section][key], config[section][key])}",
                f"moe={option.get(saved[section][key], saved[section][key])}")
    saved_data, data = saved.get("data", {}), config.get("data", {})
    if section == "model" and key in MODEL_KEYS_FROM_DATA and saved_data.get(key) != data.get(key):
        if saved_data.get("name") != data.get("name"):
            return f"data={data.get('name')}", f"data={saved_data.get('name')}"
        section = "data"
    return (f"{section}.{key}={json.dumps(config[section].get(key))}",
            f"{section}.{key}={json.dumps(saved[section].get(key))}")


def _refusal(now: str, before: str, path: Path, own: bool, why: str) -> str:
    """The refusal of a checkpoint saved with the setting ``before`` (``key=value``) by a run set to ``now``."""
    if own:  # a rerun in the run directory: it holds that run, which a new directory leaves alone
        return (f"{now}: this run directory's checkpoint {path} was saved with {before}, and a run directory resumes "
                f"only the experiment it holds; rerun with {before}, or give this run a new run directory (a new "
                "hydra.run.dir, or hydra.sweep.dir for a sweep)")
    return (f"{now}: trainer.resume's checkpoint {path} was saved with {before}, {why}; start from it with "
            f"{before}, or set trainer.resume=null to train afresh")


# Keys (or whole sections) that change where a run reads and writes, how fast it computes and what it logs, not what
# it trains or reports: a run directory resumes under other values of these (conf/hydra/default.yaml leaves the same
# out of a run's name). Every other key defines the experiment the directory holds.
NOT_THE_EXPERIMENT = (
    "logger", "launcher", "paths", "data.root", "data.download", "model.upcycle_from", "model.upcycle_noise_std",
    "moe.expert_parallel", "optimizer.fused", "optimizer.compile", "optimizer.write_expert_copies",
    "trainer.device", "trainer.num_threads", "trainer.num_workers", "trainer.data_on_device",
    "trainer.cuda_memory_fraction", "trainer.eval_batch_size", "trainer.log_every", "trainer.checkpoint_every",
    "trainer.progress_bar", "trainer.resume", "trainer.strategy", "trainer.expert_parallel_size",
    "trainer.reshard_after_forward", "trainer.activation_checkpointing", "trainer.init_device", "trainer.compile",
    "trainer.nonfinite", "trainer.max_nonfinite_skips", "trainer.max_tokens_per_image",
)
RUN_LENGTH = ("trainer.max_steps", "trainer.max_epochs")


def augmentation_source(flat: Mapping[str, Any], here: bool = False) -> Optional[dict[str, Any]]:
    """The settings that draw a run's random augmentations (flat config), where it augments: the device's generator
    (``trainer.data_on_device=true``), else the DataLoader, whose workers' seeds decide them (``false``: one stream
    per worker count); None where that is not known from the config (``auto``: the device where the split fits a
    CUDA device; ``here``, the run about to start, knows it is the DataLoader without one) or nothing is drawn. A
    run resumed at step 13 with 2 workers instead of 0 ended at neither one's test accuracy."""
    if not (flat.get("data.augment") or flat.get("data.auto_augment")):
        return None
    on_device = flat.get("trainer.data_on_device", False)
    device = str(flat.get("trainer.device", "auto"))
    on_cuda = device.startswith("cuda") or device == "auto" and torch.cuda.is_available()
    if on_device == "auto" and here and not on_cuda:
        on_device = False  # auto batches on the device only on CUDA
    if on_device is True:
        return {"trainer.data_on_device": True}
    if on_device is False:
        return {"trainer.data_on_device": False, "trainer.num_workers": flat.get("trainer.num_workers", 0)}
    return None


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``config``'s values by dotted key (``optimizer.lr``); lists are values."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flat_config(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_same_experiment(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse to resume the run directory's own checkpoint under a config that changes the experiment (every key but
    :data:`NOT_THE_EXPERIMENT`): the directory would report the old run's results under the new values. A key the
    checkpoint's config lacks (added to the configs after it was written) is not compared."""
    saved, now = flat_config(saved_config(state, path)), flat_config(config)
    new_run = f"start a new run directory from it with trainer.resume={path}"
    for key in sorted(set(saved) | set(now), key=lambda key: (not key.endswith(".name"), key)):  # data.name first
        if key not in saved or key.startswith(tuple(f"{ignored}." for ignored in NOT_THE_EXPERIMENT)):
            continue
        if key in NOT_THE_EXPERIMENT or key in RUN_LENGTH or saved[key] == now.get(key):
            continue
        before, after = format_value(saved[key]), format_value(now.get(key))
        raise OtherExperimentError(
            f"{key}={after}: this run directory's checkpoint {path} was saved with {key}={before}, and a run "
            f"directory resumes only the experiment it holds; rerun with {key}={before}, or {new_run} (a new "
            "hydra.run.dir, or hydra.sweep.dir for a sweep)"
        )
    drawn_before, drawn_now = augmentation_source(saved), augmentation_source(now, here=True)
    if None not in (drawn_before, drawn_now) and drawn_before != drawn_now:
        if drawn_before["trainer.data_on_device"] == drawn_now["trainer.data_on_device"]:  # the DataLoader both times:
            drawn_before, drawn_now = ({"trainer.num_workers": drawn["trainer.num_workers"]}  # only the workers differ
                                       for drawn in (drawn_before, drawn_now))
        before, after = (" ".join(f"{key}={format_value(value)}" for key, value in drawn.items())
                         for drawn in (drawn_before, drawn_now))
        raise OtherExperimentError(
            f"{after}: this run directory's checkpoint {path} was saved with {before}, and with data augmentation on "
            "that decides the random augmentations each step draws (the device's generator, or the DataLoader "
            f"workers' seeds): the rest of the run would train on augmentations neither gives; rerun with {before}, "
            f"or {new_run}"
        )
    _check_same_length(run_length(saved), run_length(now), path, new_run)


def run_length(flat: Mapping[str, Any]) -> tuple[str, Any]:
    """The key that sets a run's length, and its value: ``trainer.max_steps`` when set (``max_epochs`` is then
    unused), else ``trainer.max_epochs``."""
    steps = flat.get("trainer.max_steps")
    return ("trainer.max_steps", steps) if steps is not None else ("trainer.max_epochs", flat.get("trainer.max_epochs"))


def _check_same_length(saved: tuple[str, Any], now: tuple[str, Any], path: Path, new_run: str) -> None:
    """A run's length is not changed in place: its learning-rate schedule would change mid-run, and it would report
    a second test result. Was: ``max_epochs`` compared even where ``max_steps`` set the length, so a switch from 45
    steps to 3 epochs read "a run of trainer.max_epochs=30, which is not shortened in place"."""
    if saved == now:
        return
    (saved_key, saved_value), (key, value) = saved, now
    before, after = f"{saved_key}={format_value(saved_value)}", f"{key}={format_value(value)}"
    if saved_key == "trainer.max_epochs" and key == "trainer.max_steps":
        before += " trainer.max_steps=null"  # what a rerun must say to be measured in epochs again
    why = "its learning-rate schedule would change mid-run and it would report a second test result"
    if key == saved_key and _shorter(value, saved_value):  # nothing to train on: a run of its own
        raise OtherExperimentError(
            f"{after}: this run directory's checkpoint {path} is of a run of {before}, which is not shortened in place "
            f"({why}); rerun with {before}, or train a run of {after} in a new run directory (a new hydra.run.dir, or "
            "hydra.sweep.dir for a sweep)"
        )
    change = "lengthened" if key == saved_key else f"re-measured in {key.rsplit('_', 1)[-1]}"
    raise OtherExperimentError(
        f"{after}: this run directory's checkpoint {path} is of a run of {before}, which is not {change} in place "
        f"({why}); rerun with {before}, or to train on, {new_run} {after}"
    )


def _shorter(now: Any, before: Any) -> bool:
    """Whether the run length ``now`` is shorter than ``before`` (both numbers; null, the other unit's, is not)."""
    return all(isinstance(value, int) and not isinstance(value, bool) for value in (now, before)) and now < before


def rng_state() -> dict[str, Any]:
    """Every RNG a training step draws from, as tensors and numbers."""
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": numpy_state["state"]["pos"],
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
            "has_gauss": numpy_state["has_gauss"],
            "gauss": numpy_state["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
