"""What every dataset builder returns (``DataBundle``) and raises (``MissingDataError``, ``BadDataError``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.utils.data import Dataset


class MissingDataError(FileNotFoundError):
    """The dataset is not on disk; the message says where we looked and how to fetch or lay it out."""


class BadDataError(ValueError):
    """A file or example is unusable (unreadable, wrong channel count, label out of range); the message names it."""


@dataclass
class DataBundle:
    """Both splits of a dataset and the shape facts the model is built from.

    Items of ``train`` and ``test`` are ``(image float tensor [in_chans, img_size, img_size], label int)``.
    """

    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int  # square side the model should be built for
    name: str
    skipped: int = 0  # bad examples dropped under data.on_bad_file=skip, both splits
    skipped_reasons: tuple[str, ...] = ()  # one line per skipped example, naming its file


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
