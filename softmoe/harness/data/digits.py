"""``digits``: the 1,797 real 8x8 handwritten digits bundled inside scikit-learn (no download).

The test split is fixed by ``data.split_seed`` (stratified, independent of the run seed), so every
run evaluates on the same test images; the validation split is then held out of the training images
with the same seed (``splits.with_validation``). All images live in memory as normalised tensors.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from .common import BadDataError, DataBundle
from .config import DIGITS_EXAMPLES
from .split_draws import train_test_indices

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


def digits_file() -> Path:
    """scikit-learn's bundled ``digits.csv.gz`` (what ``sklearn.datasets.load_digits`` reads), found without
    importing scikit-learn: its import took about a second of every run's start."""
    spec = importlib.util.find_spec("sklearn")  # finds the package's folder; runs none of its code
    if spec is None or not spec.submodule_search_locations:
        raise BadDataError("data=digits reads scikit-learn's bundled digits: pip install -r requirements.txt")
    return Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(images [1797, 8, 8] float64, labels [1797] int64), as ``load_digits()`` returns them."""
    path = digits_file()
    if not path.is_file():  # a scikit-learn that moved its file: its own loader
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt", encoding="utf-8") as text:
        rows = np.loadtxt(text, delimiter=",")
    return rows[:, :-1].reshape(-1, 8, 8), rows[:, -1].astype(np.int64)


def load_digits_split(test_size: int, split_seed: int) -> tuple[torch.Tensor, ...]:
    """(train_images [N, 1, 8, 8], train_labels [N], test_images, test_labels), normalised; the split is
    scikit-learn's ``train_test_split(stratify=labels, random_state=split_seed)``."""
    pixels, targets = load_digits_arrays()
    images = (torch.from_numpy(pixels).float() / PIXEL_MAX - DIGITS_MEAN) / DIGITS_STD
    images = images.unsqueeze(1)  # [1797, 1, 8, 8]
    labels = torch.from_numpy(targets).long()
    if len(labels) != DIGITS_EXAMPLES:
        raise BadDataError(f"data=digits: read {len(labels)} examples, expected {DIGITS_EXAMPLES}")
    train_idx, test_idx = train_test_indices(targets, test_size, split_seed, stratify=True)
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
