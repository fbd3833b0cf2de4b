"""``fashion_mnist``: Zalando's Fashion-MNIST, 60,000 train / 10,000 test 28x28 grayscale images, 10 classes.

Read from the four standard IDX files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``), gzipped or not, found in the first of:

* ``data.root``, or its ``FashionMNIST/raw/`` (torchvision's layout);
* with ``data.root`` unset: ``<paths.data_dir>/fashion_mnist`` (and its ``FashionMNIST/raw/``, where
  ``data.download=true`` puts torchvision's download), then ``/usr/share/datasets/fashion-mnist``,
  where Debian's ``dataset-fashion-mnist`` package installs them (``apt-get install dataset-fashion-mnist``).

Every file is checked as it is parsed (magic number, dimensions, length, labels 0..9), so a bad file is
named in one line instead of surfacing as a reshape error.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
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
from .digits import TensorImages
from .splits import hold_out

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
TORCHVISION_SUBDIR = Path("FashionMNIST") / "raw"
FILES = {  # split -> (images, labels), without the .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FILE_NAMES = tuple(name for pair in FILES.values() for name in pair)  # the four, in FILES' order
IMAGE_MAGIC, LABEL_MAGIC = 0x00000803, 0x00000801  # unsigned bytes; 3 dimensions / 1 dimension
SIDE = 28
NUM_CLASSES = 10
# Mean and std of the 60,000 training images' pixels in [0, 1] (fixed, so a run never depends on its split).
MEAN, STD = 0.2860, 0.3530


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array an IDX file stores (gzipped when its name ends in .gz), checked against ``magic``."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise BadDataError(f"{path}: not a readable IDX file ({type(error).__name__}: {error})") from error
    if len(raw) < 4:
        raise BadDataError(f"{path}: truncated: {len(raw)} bytes, shorter than the 4-byte IDX header")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise BadDataError(
            f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x} "
            f"(IDX {'images' if magic == IMAGE_MAGIC else 'labels'}: unsigned bytes, {magic & 0xFF} dimension(s))"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise BadDataError(f"{path}: truncated: {len(raw)} bytes, shorter than its {header}-byte header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise BadDataError(
            f"{path}: {'truncated' if len(raw) - header < expected else 'too long'}: {len(raw) - header} data bytes, "
            f"its header {list(shape)} says {expected}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def find_file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def search_folders(root: Path, root_given: bool) -> list[Path]:
    folders = [root, root / TORCHVISION_SUBDIR]
    return folders if root_given else folders + [DEBIAN_DIR]


def locate(folders: list[Path]) -> Optional[Path]:
    """The first folder holding all four files (each plain or gzipped)."""
    for folder in folders:
        if all(find_file(folder, name) for name in FILE_NAMES):
            return folder
    return None


def download(root: Path, root_given: bool = False) -> None:
    """torchvision's download (md5-checked) into ``<root>/FashionMNIST/raw``; one clear error without a network
    (``root_given``: data.root is set, so Debian's copy would not be searched)."""
    from torchvision.datasets import FashionMNIST

    try:
        with removed_if_failed(root / TORCHVISION_SUBDIR):
            FashionMNIST(str(root), train=True, download=True)
    except Exception as error:  # URLError, RuntimeError("Error downloading ...") or an md5 mismatch
        raise download_failed(
            "fashion_mnist", root / TORCHVISION_SUBDIR, error,
            f"Place the four IDX files ({', '.join(name + '.gz' for name in FILE_NAMES)}) there by hand, "
            + ("or set data.root to a folder holding them." if root_given else "install Debian's copy with "
               "`apt-get install dataset-fashion-mnist`, or set data.root to a folder holding them."),
        ) from None


def load_split(folder: Path, split: str, report: BadExamples) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [N, 1, 28, 28] normalised, labels [N]) of ``split``; out-of-range labels go to ``report``."""
    image_file, label_file = (find_file(folder, name) for name in FILES[split])
    images = read_idx(image_file, IMAGE_MAGIC)
    labels = read_idx(label_file, LABEL_MAGIC)
    if images.shape[1:] != (SIDE, SIDE):
        raise BadDataError(f"{image_file}: images of {list(images.shape[1:])} pixels, Fashion-MNIST's are [28, 28]")
    if len(images) != len(labels):
        raise BadDataError(f"{label_file}: {len(labels)} labels for the {len(images)} images of {image_file}")
    keep = labels < NUM_CLASSES
    for index in np.flatnonzero(~keep):
        report(f"{label_file}: label {int(labels[index])} of image {index} is outside 0..{NUM_CLASSES - 1}")
    pixels = torch.from_numpy(images[keep].astype(np.float32) / 255.0)
    return ((pixels - MEAN) / STD).unsqueeze(1), torch.from_numpy(labels[keep].astype(np.int64))


def _not_found(folders: list[Path], root: Optional[str]) -> MissingDataError:
    """The missing files' error; with ``data.root`` set (``root``) Debian's folder is not searched, so the advice is
    to fill that folder or point data.root elsewhere."""
    where = " or ".join(map(str, folders))
    files = f"the four IDX files ({', '.join(FILE_NAMES)}, each plain or .gz) are not in {where}"
    if root is not None:
        return MissingDataError(
            f"data=fashion_mnist data.root={root}: {files}. Put them there, fetch them with data.download=true, or "
            "set data.root to the folder that holds them."
        )
    return MissingDataError(
        f"data=fashion_mnist: {files}. Install them with `apt-get install dataset-fashion-mnist`, fetch them with "
        "data.download=true, or set data.root to a folder holding them."
    )


def check_present(cfg: dict[str, Any], root: Path) -> None:
    """The :class:`MissingDataError` :func:`build` would raise for files that are not there, reading none (with
    ``data.download=true`` they are fetched then)."""
    folders = search_folders(root, root_given=cfg["root"] is not None)
    if not cfg["download"] and locate(folders) is None:
        raise _not_found(folders, cfg["root"])


def build(cfg: dict[str, Any], root: Path) -> DataBundle:
    folders = search_folders(root, root_given=cfg["root"] is not None)
    folder = locate(folders)
    if folder is None and cfg["download"]:
        download(root, root_given=cfg["root"] is not None)
        folder = locate(folders)
    if folder is None:
        raise _not_found(folders, cfg["root"])
    log_source("fashion_mnist", folder)
    report = BadExamples(cfg["on_bad_file"])
    splits = {split: load_split(folder, split, report) for split in FILES}
    if cfg["train_subset"] is not None and cfg["train_subset"] < len(splits["train"][1]):
        # a stratified draw that depends on split_seed alone, so every run of a sweep trains on the same images
        _, kept = hold_out(splits["train"][1].tolist(), cfg["train_subset"], cfg["split_seed"])
        splits["train"] = tuple(tensor[torch.from_numpy(kept)] for tensor in splits["train"])
    # Random translation by up to 2 pixels (blank background) and horizontal flips: clothes are symmetric.
    augment = v2.Compose([v2.RandomCrop(SIDE, padding=2, fill=-MEAN / STD), v2.RandomHorizontalFlip()])
    train = TensorImages(*splits["train"], transform=augment if cfg["augment"] else None)
    return report.bundle(
        train=train,
        train_eval=with_transform(train, None),
        test=TensorImages(*splits["test"]),
        num_classes=NUM_CLASSES,
        in_chans=1,
        img_size=SIDE,
        name="fashion_mnist",
    )
