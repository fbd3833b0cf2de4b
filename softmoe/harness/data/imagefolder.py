"""``imagefolder``: an ImageNet-layout tree, ``root/train/<class>/<image>`` and ``root/val/<class>/<image>``.

ImageNet's convention: the official ``val/`` folder is the test split, and the validation split that
selects models is held out of ``train/`` (``data.val_size``, as big_vision's minival).

Loaded by torchvision's ``ImageFolder`` with timm's standard ViT transforms. Two things differ from
a plain ``ImageFolder``:

- class indices come from the training split's folders and are reused for ``val``, so a class
  missing from ``val`` cannot shift every label after it; an image in a ``val`` folder that is not
  a training class has no valid label and is a bad example;
- images are checked when the dataset is built (``data.verify``), so a corrupt file is reported by
  name (or skipped and counted under ``data.on_bad_file=skip``) before training, not as a traceback
  from a DataLoader worker. A file that breaks later still raises ``BadDataError`` naming it.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

from PIL import Image
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from ..errors import ConfigError
from ..rules import counted
from .common import BadDataError, BadExamples, DataBundle, MissingDataError, log_source, with_transform

log = logging.getLogger(__name__)

SPLIT_DIRS = {"train": "train", "test": "val"}  # DataBundle split -> folder under data.root
IMAGE_MODES = {1: "L", 3: "RGB"}  # in_chans -> the PIL mode every image is converted to


def read_image(path: str, in_chans: int, strict_channels: bool, decode: bool = True) -> Optional[Image.Image]:
    """``path`` as an ``in_chans``-channel PIL image (None when ``decode`` is false: header check only).

    Raises ``BadDataError`` naming the file when it is not a readable image, is truncated (when
    decoded) or, with ``strict_channels``, stores a channel count other than ``in_chans``; otherwise
    grayscale, palette, RGBA and CMYK files are converted, as every ImageNet pipeline does.
    """
    try:
        with Image.open(path) as file:
            bands = file.getbands()
            image = file.convert(IMAGE_MODES[in_chans]) if decode else None
    except Exception as error:  # PIL reports damage as OSError, SyntaxError, ValueError, zlib.error, ...
        raise BadDataError(f"{path}: unreadable image ({type(error).__name__}: {error})") from error
    if strict_channels and len(bands) != in_chans:
        raise BadDataError(
            f"{path}: {counted(len(bands), 'channel')} (PIL mode {''.join(bands)}), but data.in_chans={in_chans} "
            "and data.strict_channels=true"
        )
    return image


class CheckedImageFolder(ImageFolder):
    """``ImageFolder`` with the training split's class indices and images verified when built.

    ``verify``: ``full`` decodes every image (finds truncated files; one pass over the data, in
    threads), ``header`` only opens each file (finds non-images, empty files, wrong channel counts),
    ``none`` checks nothing until an image is loaded.
    """

    def __init__(
        self,
        root: Path,
        class_to_idx: dict[str, int],
        report: BadExamples,
        transform: Callable,
        in_chans: int,
        verify: str,
        strict_channels: bool,
    ):
        # Read by find_classes and make_dataset, which ImageFolder.__init__ calls.
        self.train_class_to_idx, self.report, self.verify = class_to_idx, report, verify
        self.in_chans, self.strict_channels = in_chans, strict_channels
        super().__init__(str(root), transform=transform, loader=self.load_image, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return sorted(self.train_class_to_idx, key=self.train_class_to_idx.get), dict(self.train_class_to_idx)

    def make_dataset(self, directory, class_to_idx, extensions=None, is_valid_file=None, allow_empty=False):
        """The (path, label) pairs of ``directory`` that pass ``data.verify``; the rest go to ``report``."""
        folders = sorted(entry.name for entry in os.scandir(directory) if entry.is_dir())
        # -1 marks a folder that is not a training class; make_dataset lists its files like the others.
        labels = {folder: class_to_idx.get(folder, -1) for folder in folders}
        labelled = make_dataset(directory, labels, extensions, is_valid_file, allow_empty=True)
        samples = []
        for path, label in labelled:
            if label < 0:
                self.report(
                    f"{path}: its folder {Path(path).parent.name!r} is not a class of the training split, "
                    f"so its label is out of range (0..{len(class_to_idx) - 1})"
                )
            else:
                samples.append((path, label))
        if self.verify == "none":
            return samples
        pool = ThreadPoolExecutor()  # decoding releases the GIL
        try:
            problems = list(pool.map(self._problem, (path for path, _ in samples)))
        finally:
            # a Ctrl-C (or an error) drops the checks not yet started: `with` waited for every one of them, minutes
            # over an ImageNet-sized tree on a network disk, before the run could stop
            pool.shutdown(wait=False, cancel_futures=True)
        kept = []
        for sample, problem in zip(samples, problems):
            if problem is None:
                kept.append(sample)
            else:
                self.report(problem)
        return kept

    def _problem(self, path: str) -> Optional[str]:
        try:
            read_image(path, self.in_chans, self.strict_channels, decode=self.verify == "full")
        except BadDataError as error:
            return str(error)
        return None

    def load_image(self, path: str) -> Image.Image:
        try:
            return read_image(path, self.in_chans, self.strict_channels)
        except BadDataError as error:
            hint = "data.verify=full finds such files when the dataset is built; data.on_bad_file=skip then drops them"
            raise BadDataError(f"{error} ({hint})") from error


def _missing_data(root: Path, problem: str) -> MissingDataError:
    return MissingDataError(
        f"data=imagefolder: {problem}. Lay the images out as {root}/train/<class>/<image> and "
        f"{root}/val/<class>/<image> (for ImageNet: extract ILSVRC2012_img_train.tar into train/ and sort the "
        "validation images into class folders, e.g. with valprep.sh), or set data.root to such a folder."
    )


def _split_dirs_and_classes(root: Path) -> tuple[dict[str, Path], list[str], dict[str, int]]:
    """Each split's folder, and the class folders of ``train/``; a :class:`MissingDataError` when they are not there."""
    split_dirs = {split: root / folder for split, folder in SPLIT_DIRS.items()}
    missing = [str(path) for path in split_dirs.values() if not path.is_dir()]
    if missing:
        raise _missing_data(root, f"no folder {' or '.join(missing)}")
    try:
        classes, class_to_idx = find_classes(str(split_dirs["train"]))
    except FileNotFoundError:
        raise _missing_data(root, f"no class folders in {split_dirs['train']}") from None
    return split_dirs, classes, class_to_idx


def check_present(cfg: dict[str, Any], root: Path) -> None:
    """The :class:`MissingDataError` :func:`build` would raise for folders that are not there, reading no image."""
    _split_dirs_and_classes(root)


def build(cfg: dict[str, Any], root: Path) -> DataBundle:
    from timm.data import create_transform

    split_dirs, classes, class_to_idx = _split_dirs_and_classes(root)
    if len(classes) > cfg["num_classes"]:
        raise ConfigError(  # the train command's one line, exit 2 (a ValueError printed a traceback)
            f"data.num_classes={cfg['num_classes']}: {split_dirs['train']} has "
            f"{counted(len(classes), 'class folder')}; set data.num_classes={len(classes)} or more"
        )
    if len(classes) < cfg["num_classes"]:  # allowed (a copy missing some classes), but likely the default's 1000
        log.warning("data.num_classes=%d: %s has %s, so the model's head has %d outputs no training image has; set "
                    "data.num_classes=%d unless this copy lacks some classes", cfg["num_classes"], split_dirs["train"],
                    counted(len(classes), "class folder"), cfg["num_classes"] - len(classes), len(classes))

    input_size = (cfg["in_chans"], cfg["img_size"], cfg["img_size"])
    common = dict(mean=tuple(cfg["mean"]), std=tuple(cfg["std"]), crop_pct=cfg["crop_pct"], interpolation="bicubic")
    transforms = {
        "train": create_transform(input_size, is_training=cfg["augment"], auto_augment=cfg["auto_augment"], **common),
        "test": create_transform(input_size, is_training=False, **common),
    }
    log_source("imagefolder", root)
    report = BadExamples(cfg["on_bad_file"])
    splits = {}
    for split, directory in split_dirs.items():
        dataset = CheckedImageFolder(
            directory, class_to_idx, report, transforms[split], cfg["in_chans"], cfg["verify"], cfg["strict_channels"]
        )
        if len(dataset) == 0:
            raise _missing_data(root, f"no readable images ({', '.join(IMG_EXTENSIONS)}) under {directory}")
        splits[split] = dataset
    return report.bundle(
        **splits,
        train_eval=with_transform(splits["train"], transforms["test"]),
        num_classes=cfg["num_classes"], in_chans=cfg["in_chans"], img_size=cfg["img_size"], name="imagefolder"
    )
