"""The index draws of scikit-learn's ``train_test_split``, without importing scikit-learn.

Every run draws its test and validation splits with ``train_test_split(..., test_size=<int>,
random_state=<seed>, stratify=<labels or None>)``. Importing scikit-learn for that took about a second of each
run's start (its import pulls in SciPy's statistics), more than a short run's training. The two draws below are
the ones scikit-learn 1.9 makes (``ShuffleSplit`` and ``StratifiedShuffleSplit`` with
``utils.extmath._approximate_mode``, BSD-3-Clause, (c) the scikit-learn developers), written again with NumPy's
``RandomState``: every split, and so every figure, stays the one scikit-learn draws; tests/test_data.py compares
them over seeds, sizes and label sets. A later scikit-learn that changed its draws would no longer change our
splits.
"""

from __future__ import annotations

import numpy as np


def train_test_indices(labels: np.ndarray, test_count: int, seed: int, stratify: bool) -> tuple[np.ndarray, ...]:
    """(train indices, test indices) of ``len(labels)`` examples, in the order ``train_test_split`` returns them
    for ``np.arange(len(labels))``; ``test_count`` examples are held out, the rest train. ``stratify``: each
    class keeps its share in both (every class needs 2 examples, and each side one per class; the callers
    check that first)."""
    rng = np.random.RandomState(seed)
    if not stratify:
        permutation = rng.permutation(len(labels))
        return permutation[test_count:], permutation[:test_count]
    _, class_of, class_counts = np.unique(labels, return_inverse=True, return_counts=True)
    members = np.split(np.argsort(class_of, kind="stable"), np.cumsum(class_counts)[:-1])
    train_per_class = approximate_mode(class_counts, len(labels) - test_count, rng)
    test_per_class = approximate_mode(class_counts - train_per_class, test_count, rng)
    train, test = [], []
    for indices, n_train, n_test in zip(members, train_per_class, test_per_class):
        shuffled = indices[rng.permutation(len(indices))]
        train.extend(shuffled[:n_train])
        test.extend(shuffled[n_train:n_train + n_test])
    return rng.permutation(train), rng.permutation(test)


def approximate_mode(class_counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """How many of ``draws`` examples each class gets: its share rounded down, then one more each for the classes
    with the largest remainders, ties broken at random (scikit-learn's ``_approximate_mode``)."""
    continuous = class_counts / class_counts.sum() * draws
    floored = np.floor(continuous)
    missing = int(draws - floored.sum())
    remainder = continuous - floored
    for value in np.sort(np.unique(remainder))[::-1]:
        if missing == 0:
            break
        (tied,) = np.where(remainder == value)
        chosen = rng.choice(tied, size=min(len(tied), missing), replace=False)
        floored[chosen] += 1
        missing -= len(chosen)
    return floored.astype(int)
