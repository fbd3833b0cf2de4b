"""The training data order: a function of (seed, epoch), so a run resumes mid-epoch without replaying data."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableSampler(Sampler[int]):
    """A fresh permutation of ``size`` indices each epoch, drawn from ``seed + epoch`` (as PyTorch's
    ``DistributedSampler`` does), starting ``skip`` indices in.

    A resumed run calls ``set_epoch(epoch, skip=batches_done * batch_size)`` and sees exactly the
    examples the interrupted run had not reached, without loading the ones it had.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch = epoch
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator)  # [size]
        return iter(order[self.skip :].tolist())

    def __len__(self) -> int:
        return self.size - self.skip
