"""``cifar10`` / ``cifar100``: torchvision's CIFAR datasets, checked by structure instead of md5.

torchvision's ``CIFAR10.__init__`` refuses any file whose md5 differs from the official release and
unpickles it without restriction. We keep torchvision's class (file layout, ``download``, which
fetches and md5-checks the official archive, ``__getitem__``) and replace only the loading step:
each pickle is read with an unpickler that admits nothing but numpy arrays, and checked for what
training needs (uint8 rows of 3 x 32 x 32 values, one label in range per row). This also lets the
tests load small files written in the exact on-disk format through this same code.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torchvision import datasets
from torchvision.datasets.vision import VisionDataset
from torchvision.transforms import v2

from .common import (
    BadDataError,
    BadExamples,
    DataBundle,
    MissingDataError,
    download_failed,
    log_source,
    removed_if_failed,
    with_transform,
)

CIFAR_SIDE = 32
CIFAR_VALUES = 3 * CIFAR_SIDE * CIFAR_SIDE  # one row per image: the red, green, blue planes, row-major

# The only globals a CIFAR pickle needs: numpy arrays (protocol 2 and protocol 5 encodings) and bytes.
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: a CIFAR file holds only arrays, lists and strings"
            )
        return super().find_class(module, name)


def read_cifar_pickle(path: Path) -> dict[str, Any]:
    """The dict stored in one CIFAR file, with keys as str (the official files are Python 2 pickles)."""
    try:
        with open(path, "rb") as file:
            entry = _ArrayUnpickler(file, encoding="latin1").load()
    except Exception as error:  # a damaged pickle fails in many ways: EOFError, UnpicklingError, ValueError, ...
        raise BadDataError(f"{path}: not a readable CIFAR python pickle ({type(error).__name__}: {error})") from error
    if not isinstance(entry, dict):
        raise BadDataError(f"{path}: a CIFAR file holds a dict, found {type(entry).__name__}")
    return {key.decode("latin1") if isinstance(key, bytes) else key: value for key, value in entry.items()}


class CheckedCIFAR10(datasets.CIFAR10):
    """``torchvision.datasets.CIFAR10`` whose loading checks each file's structure instead of its md5.

    ``report`` receives one line per bad example (label out of range) and applies ``data.on_bad_file``;
    damage to a whole file (unreadable, wrong row width, label count) always raises ``BadDataError``.
    """

    num_classes = 10
    label_key = "labels"
    # Per-channel mean and std of the training pixels in [0, 1].
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)

    def __init__(
        self,
        root: str | Path,
        train: bool,
        report: BadExamples,
        transform: Optional[Callable] = None,
        download: bool = False,
    ):
        # Not CIFAR10.__init__: its md5 check and unrestricted unpickling are what we replace.
        VisionDataset.__init__(self, root, transform=transform)
        self.train = train
        if download:
            try:  # torchvision's: a no-op when the official files are present (md5), else fetch and verify
                with removed_if_failed(Path(self.root)):
                    self.download()
            except Exception as error:  # URLError without a network, or a failed md5 check
                raise download_failed(
                    f"cifar{self.num_classes}", self.root, error,
                    f"Fetch {self.url} elsewhere and extract it there (it holds {self.base_folder}/), or set data.root "
                    f"to a folder holding {self.base_folder}/.",
                ) from None
        folder = Path(self.root) / self.base_folder
        self._require_files(folder)
        files = self.train_list if train else self.test_list
        batches = [self._read_batch(folder / name, report) for name, _ in files]
        images = np.concatenate([images for images, _ in batches])
        self.data = images.reshape(-1, 3, CIFAR_SIDE, CIFAR_SIDE).transpose(0, 2, 3, 1)  # HWC, as torchvision has it
        self.targets = [label for _, labels in batches for label in labels]
        self.classes = self._read_class_names(folder / self.meta["filename"])
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}

    @classmethod
    def _require_files(cls, folder: Path) -> None:
        """One message listing every missing file of both splits, and how to fetch them."""
        names = [name for name, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            config_name = f"cifar{cls.num_classes}"
            raise MissingDataError(
                f"data={config_name}: CIFAR-{cls.num_classes} not found in {folder} (missing {', '.join(missing)}). "
                f"Fetch it once with `python -m softmoe.train data={config_name} data.download=true`, "
                f"or set data.root to the folder that holds {cls.base_folder}/."
            )

    def _read_batch(self, path: Path, report: BadExamples) -> tuple[np.ndarray, list[int]]:
        entry = read_cifar_pickle(path)
        images, labels = entry.get("data"), entry.get(self.label_key)
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 2):
            found = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
            raise BadDataError(f"{path}: 'data' must be a uint8 array [N, {CIFAR_VALUES}], found {found}")
        if images.shape[1] != CIFAR_VALUES:
            raise BadDataError(
                f"{path}: {images.shape[1]} values per image, but CIFAR stores 3 channels x 32 x 32 = {CIFAR_VALUES} "
                "(wrong channel count or image size)"
            )
        if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(images):
            found = f"{len(labels)} labels" if isinstance(labels, (list, np.ndarray)) else type(labels).__name__
            raise BadDataError(
                f"{path}: '{self.label_key}' must list one label per image ({len(images)}), found {found}"
            )
        keep = []
        for index, label in enumerate(labels):
            if isinstance(label, (int, np.integer)) and 0 <= label < self.num_classes:
                keep.append(index)
            else:
                report(f"{path}: image {index} has label {label!r}, outside 0..{self.num_classes - 1}")
        return images[keep], [int(labels[index]) for index in keep]

    def _read_class_names(self, path: Path) -> list[str]:
        names = read_cifar_pickle(path).get(self.meta["key"])
        if not isinstance(names, list) or len(names) != self.num_classes:
            raise BadDataError(f"{path}: '{self.meta['key']}' must list {self.num_classes} class names")
        return [name.decode("latin1") if isinstance(name, bytes) else str(name) for name in names]


class CheckedCIFAR100(CheckedCIFAR10, datasets.CIFAR100):
    """CIFAR-100 with its 100 fine labels; the file layout comes from ``torchvision.datasets.CIFAR100``."""

    num_classes = 100
    label_key = "fine_labels"
    mean, std = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)


DATASET_CLASSES = {"cifar10": CheckedCIFAR10, "cifar100": CheckedCIFAR100}


def cifar_transforms(img_size: int, augment: bool, mean: tuple, std: tuple) -> tuple[Callable, Callable]:
    """(train, eval) transforms from a PIL image: the standard pad-4 random crop and flip, then resize to img_size."""
    resize = [v2.Resize(img_size, interpolation=v2.InterpolationMode.BICUBIC)] if img_size != CIFAR_SIDE else []
    to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std), v2.ToPureTensor()]
    augmentation = [v2.RandomCrop(CIFAR_SIDE, padding=4), v2.RandomHorizontalFlip()] if augment else []
    return v2.Compose(augmentation + resize + to_tensor), v2.Compose(resize + to_tensor)


def check_present(cfg: dict[str, Any], root: Path) -> None:
    """The :class:`MissingDataError` :func:`build` would raise for files that are not there, reading none (with
    ``data.download=true`` they are fetched then)."""
    if not cfg["download"]:
        dataset_class = DATASET_CLASSES[cfg["name"]]
        dataset_class._require_files(Path(root) / dataset_class.base_folder)


def build(cfg: dict[str, Any], root: Path) -> DataBundle:
    name = cfg["name"]
    dataset_class = DATASET_CLASSES[name]
    train_transform, eval_transform = cifar_transforms(
        cfg["img_size"], cfg["augment"], dataset_class.mean, dataset_class.std
    )
    report = BadExamples(cfg["on_bad_file"])
    train = dataset_class(root, train=True, report=report, transform=train_transform, download=cfg["download"])
    log_source(name, Path(root) / dataset_class.base_folder)
    return report.bundle(
        train=train,
        train_eval=with_transform(train, eval_transform),
        test=dataset_class(root, train=False, report=report, transform=eval_transform),
        num_classes=dataset_class.num_classes,
        in_chans=3,
        img_size=cfg["img_size"],
        name=name,
    )
