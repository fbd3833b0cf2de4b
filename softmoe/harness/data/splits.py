"""The validation split: held out from the training examples, never from the test split.

Model selection (``best.pt``, the epoch a sweep reports, a sweeper's objective) reads the validation
split only; the test split is evaluated for the final model and the best-on-validation checkpoint.
The held-out examples depend on ``data.split_seed`` alone, never on the run's seed, so every run of a
sweep selects on the same images. The hold-out is stratified by label where every class has at least
two training examples (so each class keeps its share), else a plain random draw.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from typing import Sequence, Union

import numpy as np
from torch.utils.data import Dataset, Subset

from .common import BadDataError, DataBundle
from .split_draws import train_test_indices

log = logging.getLogger(__name__)


def validation_count(val_size: Union[int, float], train_examples: int) -> int:
    """``data.val_size`` as a number of examples: an int is a count, a float in (0, 1) a fraction of train."""
    if isinstance(val_size, float):
        return int(round(val_size * train_examples))
    return int(val_size)


def hold_out(labels: Sequence[int], count: int, split_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices), sorted: ``count`` of ``len(labels)`` examples held out."""
    labels = np.asarray(labels)
    per_class = Counter(labels.tolist())
    stratify = min(per_class.values()) >= 2 and len(per_class) <= min(count, len(labels) - count)
    train, val = train_test_indices(labels, count, split_seed, stratify)
    return np.sort(train), np.sort(val)


def dataset_labels(dataset: Dataset) -> Sequence[int]:
    """Every label of ``dataset`` without loading an image (torchvision's ``targets`` or our ``labels``)."""
    for attribute in ("targets", "labels"):
        labels = getattr(dataset, attribute, None)
        if labels is not None:
            return [int(label) for label in labels]
    return [int(dataset[index][1]) for index in range(len(dataset))]


def with_validation(bundle: DataBundle, val_size: Union[int, float], split_seed: int) -> DataBundle:
    """``bundle`` with ``val`` held out of ``train`` (``val_size`` 0: none, and no model selection).

    The validation examples come from ``bundle.train_eval`` (the same examples as ``train``, with the
    evaluation transform), so they are never augmented. A builder that made its own ``val`` keeps it.
    """
    if bundle.val is not None:
        return bundle
    count = validation_count(val_size, len(bundle.train))
    if count == 0:
        return bundle
    if count >= len(bundle.train):  # known only now for a folder of files (the config check knows CIFAR's size)
        raise BadDataError(
            f"data.val_size={val_size}: holds out {count} of the {len(bundle.train)} training examples of "
            f"data={bundle.name}, leaving none to train on; use fewer (0 turns validation off)"
        )
    train_idx, val_idx = hold_out(dataset_labels(bundle.train), count, split_seed)
    evaluated = bundle.train_eval if bundle.train_eval is not None else bundle.train
    return dataclasses.replace(
        bundle,
        train=Subset(bundle.train, train_idx.tolist()),
        val=Subset(evaluated, val_idx.tolist()),
        train_eval=Subset(evaluated, train_idx.tolist()),
    )
