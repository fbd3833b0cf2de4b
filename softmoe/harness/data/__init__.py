"""The harness's data layer: the ``data`` config group (``conf/data/*.yaml``) turned into datasets and loaders.

    check_data_config(cfg.data)                    # before anything loads: one line per bad key
    bundle = build_datasets(cfg.data, cfg.paths.data_dir)
    loader = build_loader(bundle.train, batch_size, train=True, seed=cfg.seed)

Datasets (one module each): ``digits`` (default, bundled in scikit-learn), ``cifar10``/``cifar100``
(torchvision files), ``fashion_mnist`` (IDX files; Debian's package or torchvision's layout),
``imagefolder`` (ImageNet layout), ``synthetic`` (generated). Every dataset has train / val / test
splits, the validation split held out of the training examples (``splits.py``). Data that is
absent raises ``MissingDataError`` saying where we looked and how to fetch it; a bad file or
example raises ``BadDataError`` naming it, or is skipped and counted with ``data.on_bad_file=skip``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import cifar, digits, fashion_mnist, imagefolder, synthetic
from .common import BadDataError, DataBundle, MissingDataError
from ..rules import counted
from .splits import with_validation
from .config import DATASETS, checked_config, dataset_size, check_data_config

log = logging.getLogger(__name__)

_BUILDERS = {
    "digits": digits.build,
    "cifar10": cifar.build,
    "cifar100": cifar.build,
    "fashion_mnist": fashion_mnist.build,
    "imagefolder": imagefolder.build,
    "synthetic": synthetic.build,
}


# Whether a dataset's files are there, without reading them; the datasets without files have none.
_PRESENCE_CHECKS = {
    "cifar10": cifar.check_present,
    "cifar100": cifar.check_present,
    "fashion_mnist": fashion_mnist.check_present,
    "imagefolder": imagefolder.check_present,
}


def _root(cfg: dict[str, Any], data_dir: str) -> Path:
    return Path(cfg.get("root") or Path(data_dir) / cfg["name"]).expanduser()


def check_data_present(data_cfg: Any, data_dir: str) -> None:
    """Raise the :class:`MissingDataError` :func:`build_datasets` would for files that are not there, reading none
    of them: a sweep checks every job's data before its first job starts."""
    cfg = checked_config(data_cfg)
    check = _PRESENCE_CHECKS.get(cfg["name"])
    if check is not None:
        check(cfg, _root(cfg, data_dir))


def build_datasets(data_cfg: Any, data_dir: str) -> DataBundle:
    """The train, validation and test splits of the dataset ``data_cfg`` names; files are read from
    ``data.root``, else ``<data_dir>/<name>``. The validation split is held out of the training examples
    (``data.val_size``, by ``data.split_seed``); ``bundle.val`` is None when ``data.val_size=0``."""
    cfg = checked_config(data_cfg)
    root = _root(cfg, data_dir)
    bundle = with_validation(_BUILDERS[cfg["name"]](cfg, root), cfg["val_size"], cfg.get("split_seed", 0))
    if bundle.skipped:
        log.warning(
            "data=%s: skipped %s (data.on_bad_file=skip); the first: %s",
            bundle.name,
            counted(bundle.skipped, "bad example"),
            bundle.skipped_reasons[0],
        )
    return bundle


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    sampler: Optional[Sampler] = None,
    drop_last: Optional[bool] = None,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffling is determined by ``seed``; shuffles only when ``train`` and no ``sampler``.

    The order comes from ``loader.generator`` (a ``torch.Generator`` seeded with ``seed``): each epoch
    draws from it, so a run's sequence of epochs repeats exactly, and ``loader.generator.get_state()``
    is what a checkpoint needs to resume it. Worker processes are started each epoch and PyTorch seeds
    them from the same generator, so their random augmentations repeat too (with ``num_workers=0``
    augmentations draw from the global RNG, which the trainer seeds). ``drop_last`` defaults to
    ``train``: every training step sees a full batch.
    """
    drop_last = train if drop_last is None else drop_last
    if drop_last and sampler is None and len(dataset) < batch_size:
        raise ValueError(
            f"batch_size={batch_size}: larger than the {counted(len(dataset), 'example')} of this split, so dropping "
            "the last partial batch leaves none; lower trainer.batch_size"
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=train and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        drop_last=drop_last,
        pin_memory=pin_memory,
    )


__all__ = [
    "DATASETS",
    "BadDataError",
    "DataBundle",
    "MissingDataError",
    "build_datasets",
    "build_loader",
    "dataset_size",
    "check_data_config",
    "check_data_present",
]
