"""A training run directory, back in memory: the model with its trained weights, its config, its data, its log.

    run = load_run("outputs/runs/2026-11-29/12-00-00")             # best.pt; checkpoint="last" for last.pt
    images, labels = next(iter(build_loader(run.data.test, 64, train=False)))
    with torch.no_grad(), softmoe.capture_routing(run.model) as records:
        run.model(images.to(run.device))
    events = read_events(run_dir)                                   # metrics.jsonl, one dict per log event

Used by ``python -m softmoe.evaluate`` and the notebooks. The model is rebuilt from the checkpoint alone:
the resolved config saved inside it (through the one config-to-model path, ``build_model``) and the weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from .checkpoint import CheckpointError, load_checkpoint, saved_config
from .config import ConfigError, resolve_device
from .data import DataBundle, build_datasets
from .model import build_model
from .telemetry import METRICS_FILE

CHECKPOINTS = ("best", "last")


@dataclass
class LoadedRun:
    """A run rebuilt from one of its checkpoints."""

    model: nn.Module  # in eval mode, on ``device``, with the checkpoint's weights
    cfg: DictConfig  # the run's resolved config, as saved in the checkpoint
    data: DataBundle  # both splits of the run's dataset
    step: int  # the optimizer step the checkpoint was saved at
    checkpoint: Path
    device: torch.device


def checkpoint_path(run_dir: Union[str, Path], checkpoint: str = "best") -> Path:
    """``<run_dir>/<checkpoint>.pt``; a ConfigError for a checkpoint name other than best or last, a
    CheckpointError when the file is not there."""
    if checkpoint not in CHECKPOINTS:
        raise ConfigError(f"checkpoint={checkpoint}: must be one of {', '.join(CHECKPOINTS)}")
    path = Path(run_dir) / f"{checkpoint}.pt"
    if not path.is_file():
        raise CheckpointError(f"run_dir={run_dir}: holds no {checkpoint}.pt (is it a training run directory?)")
    return path


def load_run(
    run_dir: Union[str, Path], checkpoint: str = "best", *, device: str = "auto", data_dir: Optional[str] = None
) -> LoadedRun:
    """The model, config and data of ``<run_dir>/<checkpoint>.pt``.

    ``device``: ``auto`` (CUDA when present, else MPS, else the CPU), ``cpu``, ``cuda``, ...; ``data_dir``: where the
    datasets are now, when not at the run's ``paths.data_dir`` (relative paths are from the working directory).
    """
    path = checkpoint_path(run_dir, checkpoint)
    state = load_checkpoint(path)
    cfg = OmegaConf.create(saved_config(state))
    torch_device = resolve_device(device)

    data = build_datasets(cfg.data, data_dir or cfg.paths.data_dir)
    model = build_model(cfg.model, cfg.moe)
    model.load_state_dict(state["model"])
    model.to(torch_device).eval()
    return LoadedRun(model=model, cfg=cfg, data=data, step=state["step"], checkpoint=path, device=torch_device)


def read_events(run_dir: Union[str, Path]) -> list[dict[str, Any]]:
    """The log events of ``<run_dir>/metrics.jsonl`` in order, each a dict with ``step`` and ``epoch``.

    A torn last line (a run killed while writing it) is skipped.
    """
    events = []
    for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return events
