"""One checkpoint format for ``last.pt`` and ``best.pt``: written atomically, read without unpickling code.

A checkpoint is a dict of tensors, numbers, strings and containers of them (so ``torch.load(...,
weights_only=True)`` reads it): model, optimizer, scheduler and grad-scaler states, every RNG state,
the step, the best evaluation so far, the resolved config (a JSON string) and the W&B run id.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

FORMAT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: unreadable, or saved by a different model."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file, fsync, then rename over the old one.

    A crash at any moment leaves either the previous checkpoint or the new one, never a partial file.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU; never executes code stored in the file (``weights_only=True``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, corrupted, or carrying objects other than tensors and containers
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a softmoe checkpoint of format {FORMAT_VERSION}")
    return state


def resume_path(run_dir: Path, resume: Optional[str]) -> Optional[Path]:
    """The checkpoint a run starts from: the run directory's own ``last.pt`` (a re-run of the same command
    resumes by itself), else ``trainer.resume``, else none."""
    last = Path(run_dir) / LAST
    if last.is_file():
        return last
    return Path(resume).expanduser() if resume else None


def saved_config(state: dict[str, Any]) -> dict[str, Any]:
    return json.loads(state["config"])


def check_same_model(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse to resume a checkpoint whose ``model`` or ``moe`` config differs from this run's."""
    saved = saved_config(state)
    for section in ("model", "moe"):
        for key in sorted(set(saved[section]) | set(config[section])):
            before, now = saved[section].get(key), config[section].get(key)
            if before != now:
                raise CheckpointError(
                    f"{section}.{key}={json.dumps(now)}: the checkpoint {path} was saved with {section}.{key}="
                    f"{json.dumps(before)}; resume with the same model or start a new run directory"
                )


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
