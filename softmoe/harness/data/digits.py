"""``digits``: the 1,797 real 8x8 handwritten digits bundled inside scikit-learn (no download).

The test split is fixed by ``data.split_seed`` (stratified, independent of the run seed), so every
run evaluates on the same test images; the validation split is then held out of the training images
with the same seed (``splits.with_validation``). All images live in memory as normalised tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .common import DataBundle
from .config import DIGITS_EXAMPLES

PIXEL_MAX = 16.0  # load_digits counts ink in 4x4 blocks of a 32x32 bitmap: integers 0..16
# Mean and std of all 1,797 x 64 pixels after division by PIXEL_MAX (computed once, fixed so a run
# never depends on its split): the network sees zero-mean, unit-variance inputs.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


class TensorImages(Dataset):
    """Images already in memory as one tensor [N, C, H, W], with an optional per-item tensor transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Optional[Callable] = None):
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def load_digits_split(test_size: int, split_seed: int) -> tuple[torch.Tensor, ...]:
    """(train_images [N, 1, 8, 8], train_labels [N], test_images, test_labels), normalised."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = (torch.from_numpy(digits.images).float() / PIXEL_MAX - DIGITS_MEAN) / DIGITS_STD
    images = images.unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.from_numpy(digits.target).long()
    assert len(labels) == DIGITS_EXAMPLES
    train_idx, test_idx = train_test_split(
        np.arange(DIGITS_EXAMPLES), test_size=test_size, random_state=split_seed, stratify=digits.target
    )
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def build(cfg: dict[str, Any], root: Path) -> DataBundle:
    train_images, train_labels, test_images, test_labels = load_digits_split(cfg["test_size"], cfg["split_seed"])
    # Random translation by at most one pixel, filling with blank paper (raw value 0 after normalisation).
    shift = v2.RandomCrop(8, padding=1, fill=-DIGITS_MEAN / DIGITS_STD) if cfg["augment"] else None
    return DataBundle(
        train=TensorImages(train_images, train_labels, transform=shift),
        train_eval=TensorImages(train_images, train_labels),
        test=TensorImages(test_images, test_labels),
        num_classes=10,
        in_chans=1,
        img_size=8,
        name="digits",
    )
