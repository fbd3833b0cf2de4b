"""The training data order: a function of (seed, epoch), so a run resumes mid-epoch without replaying data; and
each rank's share of it, and of an evaluation split, when several processes train (:mod:`.distributed`)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

IGNORED_LABEL = -100  # F.cross_entropy's ignore_index: padding examples add nothing to the test loss


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


class ShardedSampler(ResumableSampler):
    """This rank's share of every global batch of :class:`ResumableSampler`'s order.

    With a DataLoader of batch ``batch_size / world_size``, rank r's k-th batch is the r-th slice of the k-th
    single-process batch (``skip`` counts global examples, as in the single-process run); the last partial
    global batch is dropped, as the single-process training loader drops it.
    """

    def __init__(self, size: int, seed: int, batch_size: int, rank: int, world_size: int) -> None:
        super().__init__(size, seed)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        order = torch.as_tensor(list(super().__iter__()), dtype=torch.int64)  # [size - skip]
        batches = len(order) // self.batch_size
        shares = order[: batches * self.batch_size].view(batches, self.world_size, -1)  # [batches, ranks, local]
        return iter(shares[:, self.rank].reshape(-1).tolist())

    def __len__(self) -> int:
        return (self.size - self.skip) // self.batch_size * (self.batch_size // self.world_size)


class PaddedShard(Dataset):
    """Examples ``positions`` of ``dataset``; a position past its end is padding: example 0 with an ignored label."""

    def __init__(self, dataset: Dataset, positions: list[int], size: int) -> None:
        self.dataset, self.positions, self.size = dataset, positions, size

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int):
        position = self.positions[index]
        if position < self.size:
            return self.dataset[position]
        image, label = self.dataset[0]
        return image, (IGNORED_LABEL if isinstance(label, int) else torch.full_like(label, IGNORED_LABEL))
