"""What every dataset builder returns (``DataBundle``) and raises (``MissingDataError``, ``BadDataError``)."""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from torch.utils.data import Dataset

from ..errors import BadDataError, MissingDataError


@dataclass
class DataBundle:
    """The splits of a dataset and the shape facts the model is built from.

    Items of every split are ``(image float tensor [in_chans, img_size, img_size], label int)``.
    ``val`` is held out of the training examples (``splits.with_validation``); None when
    ``data.val_size=0``. ``train_eval`` holds the training examples with the evaluation transform
    (no augmentation), the source of ``val``; None where the two transforms are the same.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int  # square side the model should be built for
    name: str
    skipped: int = 0  # bad examples dropped under data.on_bad_file=skip, both splits
    skipped_reasons: tuple[str, ...] = ()  # one line per skipped example, naming its file
    val: Optional[Dataset] = None
    train_eval: Optional[Dataset] = None


log = logging.getLogger("softmoe.harness.data")


def log_source(dataset: str, folder) -> None:
    """Say which folder a dataset was read from: one may be found without being named (Debian's Fashion-MNIST)."""
    log.info("data=%s: read from %s", dataset, folder)


@contextlib.contextmanager
def removed_if_failed(folder: Path) -> Iterator[None]:
    """Remove the folders below ``folder`` (and itself) that the block created, when it fails and leaves them empty:
    a failed download leaves no empty ``FashionMNIST/raw/`` for the next run to find."""
    folder = Path(folder)
    new = [path for path in (folder, *folder.parents) if not path.exists()]  # deepest first
    try:
        yield
    except BaseException:
        for path in new:
            with contextlib.suppress(OSError):  # not empty, or not there: leave it
                path.rmdir()
        raise


def download_failed(dataset: str, folder, error: BaseException, by_hand: str) -> MissingDataError:
    """One line for a download that failed (no network, a server error, a bad md5): the dataset, the folder,
    the last line of the reason, and how to place the files by hand."""
    lines = str(error).strip().splitlines()
    reason = lines[-1].strip() if lines else type(error).__name__
    return MissingDataError(f"data={dataset}: the download into {folder} failed ({reason}). {by_hand}")


def with_transform(dataset: Dataset, transform) -> Dataset:
    """A shallow copy of ``dataset`` (its examples shared, not reloaded) that applies ``transform`` instead."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


@dataclass
class BadExamples:
    """Applies ``data.on_bad_file`` to each bad example a builder finds: ``error`` raises, ``skip`` records."""

    policy: str  # "error" | "skip"
    reasons: list[str] = field(default_factory=list)

    def __call__(self, reason: str) -> None:
        if self.policy == "error":
            raise BadDataError(f"{reason} (data.on_bad_file=skip skips such examples and counts them)")
        self.reasons.append(reason)

    def bundle(self, **fields) -> DataBundle:
        """A ``DataBundle`` carrying the examples skipped so far."""
        return DataBundle(**fields, skipped=len(self.reasons), skipped_reasons=tuple(self.reasons))
