"""Small datasets written in the exact on-disk formats the loaders read, for tests that cannot download.

- CIFAR: torchvision's python-pickle batches (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
  ``batches.meta``; ``cifar-100-python/train``, ``test``, ``meta``), dicts with bytes keys as
  ``pickle.load(f, encoding="bytes")`` shows the official files, ``b'data'`` uint8 [N, 3072].
- ImageFolder: ``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` written with PIL.
"""

from __future__ import annotations

import pickle
from pathlib import Path
import numpy as np
from omegaconf import DictConfig, OmegaConf
from PIL import Image

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"

CIFAR_LAYOUT = {
    # name: (folder, train files, test file, meta file, label key, label-names key, classes)
    "cifar10": (
        "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "batches.meta",
        b"labels", b"label_names", 10,
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", b"fine_labels", b"fine_label_names", 100),
}


def data_config(dataset: str, /, **overrides) -> DictConfig:
    """``conf/data/<dataset>.yaml`` with ``overrides`` applied, as Hydra would compose it."""
    return OmegaConf.merge(OmegaConf.load(CONF_DATA / f"{dataset}.yaml"), overrides)


def write_pickle(path: Path, obj, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def cifar_batch(name: str, images: np.ndarray, labels) -> dict:
    """One batch dict with the keys of the official files (CIFAR-100 also stores coarse labels)."""
    filenames = [b"img%d.png" % i for i in range(len(images))]
    batch = {b"batch_label": b"generated", b"data": images, b"filenames": filenames}
    batch[CIFAR_LAYOUT[name][4]] = list(labels)
    if name == "cifar100":
        batch[b"coarse_labels"] = [label // 5 for label in labels]
    return batch


def write_cifar(root: Path, name: str, per_file: int = 3, seed: int = 0, protocol: int = 2) -> dict[str, tuple]:
    """Write a small CIFAR dataset under ``root``; returns {'train'|'test': (images [N, 3072] uint8, labels [N])}."""
    folder, train_files, test_file, meta_file, _, names_key, classes = CIFAR_LAYOUT[name]
    rng = np.random.default_rng(seed)
    written = {"train": ([], []), "test": ([], [])}
    for split, file in [("train", f) for f in train_files] + [("test", test_file)]:
        images = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = [int(label) for label in rng.integers(0, classes, size=per_file)]
        write_pickle(root / folder / file, cifar_batch(name, images, labels), protocol)
        written[split][0].append(images)
        written[split][1].extend(labels)
    write_pickle(root / folder / meta_file, {names_key: [b"class%d" % i for i in range(classes)]}, protocol)
    return {split: (np.concatenate(images), np.array(labels)) for split, (images, labels) in written.items()}


def write_png(path: Path, size: int = 12, mode: str = "RGB", seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = len(Image.new(mode, (1, 1)).getbands())
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels).save(path)
    return path


def write_image_tree(
    root: Path, train: dict[str, int], val: dict[str, int], size: int = 12, mode: str = "RGB", seed: int = 0
) -> Path:
    """``root/{train,val}/<class>/<i>.png`` with the given number of images per class."""
    for split, counts in (("train", train), ("val", val)):
        for class_index, (name, count) in enumerate(counts.items()):
            for i in range(count):
                write_png(root / split / name / f"{i}.png", size, mode, seed=seed + 100 * class_index + i)
    return root


def truncate(path: Path, keep: float = 0.5) -> Path:
    """Cut ``path`` to a fraction of its bytes, as an interrupted copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


# ----------------------------------------------------------------------------- Fashion-MNIST (IDX)

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file's bytes: magic (0, 0, 0x08 = unsigned byte, ndim), big-endian dimensions, the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.tobytes()


def write_fashion_mnist(folder: Path, sizes=(("train", 40), ("test", 20)), gz: bool = True, seed: int = 0) -> dict:
    """The four Fashion-MNIST IDX files (gzipped or not) in ``folder``; returns {split: (images, labels)}."""
    import gzip

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in sizes:
        images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
        labels = (np.arange(count) % 10).astype(np.uint8)
        for name, array in zip(IDX_FILES[split], (images, labels)):
            data = idx_bytes(array)
            (folder / (name + ".gz" if gz else name)).write_bytes(gzip.compress(data) if gz else data)
        written[split] = (images, labels)
    return written
