"""``synthetic``: random images with a learnable class signal, for benchmarks and fast tests.

Image i of a split is ``signal * pattern[label_i] + noise_i``: each class has a smooth random pattern
(a 4x4 grid of N(0, 1) values, bilinearly upsampled) shared by every split, plus white N(0, 1) noise.
The validation split (``data.val_size`` images, 0 for none) is generated as a third split: drawn from
the same distribution as the training images, it is what a hold-out of them would be.
Everything derives from ``data.seed``, the split and the index, so an item is the same in every
process and run, and nothing is held in memory but the labels (8 bytes an image): any class count or length, and
any size whose labels fit in memory.
``data.nan_examples`` (tests only) makes the listed training images all NaN, a numerical fault for the
trainer's ``trainer.nonfinite`` policy to catch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .common import DataBundle

PATTERN_GRID = 4  # class patterns vary on this coarse grid, so they survive any img_size


class SyntheticImages(Dataset):
    def __init__(
        self,
        size: int,
        num_classes: int,
        in_chans: int,
        img_size: int,
        seed: int,
        split: int,
        signal: float,
        nan_examples: tuple[int, ...] = (),
    ):
        self.img_size = img_size
        self.nan_examples = frozenset(nan_examples)
        self.seed, self.split, self.signal = seed, split, signal
        patterns = np.random.default_rng([seed]).standard_normal((num_classes, in_chans, PATTERN_GRID, PATTERN_GRID))
        self.patterns = torch.from_numpy(patterns).float()  # [classes, C, 4, 4], the same for every split
        self.labels = torch.from_numpy(np.random.default_rng([seed, split]).integers(num_classes, size=size))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index])
        pattern = F.interpolate(self.patterns[label : label + 1], size=self.img_size, mode="bilinear")[0]
        rng = np.random.default_rng([self.seed, self.split, index])
        noise = torch.from_numpy(rng.standard_normal(pattern.shape, dtype=np.float32))
        image = self.signal * pattern + noise
        return (torch.full_like(image, math.nan) if index in self.nan_examples else image), label


def build(cfg: dict[str, Any], root: Path) -> DataBundle:
    shape = dict(num_classes=cfg["num_classes"], in_chans=cfg["in_chans"], img_size=cfg["img_size"])
    splits = {
        split: SyntheticImages(
            cfg[f"{split}_size"],
            **shape,
            seed=cfg["seed"],
            split=index,
            signal=cfg["signal"],
            nan_examples=cfg.get("nan_examples", ()) if split == "train" else (),
        )
        for index, split in enumerate(("train", "test", "val"))
        if split != "val" or cfg["val_size"]
    }
    return DataBundle(**splits, **shape, name="synthetic")
