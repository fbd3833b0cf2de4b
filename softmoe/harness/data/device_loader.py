"""Small datasets on the device: the training split copied to the accelerator once, batches drawn there.

    loader = device_loader(data.train, batch_size, sampler, device)   # None: this split cannot go there
    for images, labels in loader: ...                                 # already on ``device``

A :class:`DeviceLoader` stands in for the training ``DataLoader`` (``build_loader``): it takes the same
resumable ``sampler`` (``set_epoch(epoch, skip=...)``), has a ``generator`` the loop seeds each epoch and
a length, and yields ``(images [b, c, h, w], labels [b])`` without worker processes or host-to-device copies.

What it reproduces of the DataLoader path, and what it does not (``tests/test_device_loader.py``):

* the order: the sampler's, so the same examples form the same batches, and a resumed run skips exactly
  what it had seen; without augmentation the batches are identical to the DataLoader's;
* the augmentation: the dataset's own random crop (constant padding) and horizontal flip, the transforms
  ``v2.RandomCrop`` and ``v2.RandomHorizontalFlip`` that digits, Fashion-MNIST and synthetic data use, with
  the same distribution of offsets and flips. The draws differ: the DataLoader path draws per example from
  the global RNG as examples load; here one table of draws per epoch, one row per example, comes from
  ``loader.generator`` (seeded ``seed + epoch`` by the loop), so a resumed epoch sees the draws of the
  uninterrupted one whatever the RNG state, and every rank of a data-parallel run draws the same table.

Datasets held as tensors (``TensorImages``, possibly behind ``Subset``) go to the device; others (CIFAR's
uint8 arrays, image folders) and other transforms stay with the DataLoader, for the reason
:func:`device_loader` logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch.utils.data import Dataset, Sampler, Subset
from torchvision.transforms import v2

from ..errors import ConfigError
from .digits import TensorImages

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RandomCropSpec:
    """``v2.RandomCrop(side, padding=padding, fill=fill)`` of a square image: an offset in [0, 2 * padding]."""

    padding: int
    fill: float


@dataclass(frozen=True)
class FlipSpec:
    """``v2.RandomHorizontalFlip(p)``."""

    p: float


Augmentation = Union[RandomCropSpec, FlipSpec]


class NotOnDevice(ValueError):
    """Why a split cannot be batched on the device (its storage or its transform)."""


def augmentation_of(transform, side: int) -> list[Augmentation]:
    """The device's version of ``transform`` (None, one transform or a ``v2.Compose``), in order."""
    steps = [] if transform is None else list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]
    specs: list[Augmentation] = []
    for step in steps:
        if isinstance(step, v2.RandomHorizontalFlip):
            specs.append(FlipSpec(float(step.p)))
        elif (
            isinstance(step, v2.RandomCrop)
            and tuple(step.size) == (side, side)
            and len(set(step.padding)) == 1
            and step.padding_mode == "constant"
            and not step.pad_if_needed
            and isinstance(step.fill, (int, float))
        ):
            specs.append(RandomCropSpec(int(step.padding[0]), float(step.fill)))
        else:
            raise NotOnDevice(f"its transform {step!r} has no device version (random crop with constant padding "
                              "of the full image, horizontal flip)")  # fmt: skip
    return specs


def split_tensors(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(images [N, c, h, w], labels [N], transform) of a ``TensorImages``, possibly behind ``Subset``s."""
    if isinstance(dataset, Subset):
        images, labels, transform = split_tensors(dataset.dataset)
        indices = torch.as_tensor(dataset.indices, dtype=torch.int64)
        return images[indices], labels[indices], transform
    if isinstance(dataset, TensorImages):
        return dataset.images, dataset.labels, dataset.transform
    raise NotOnDevice(f"its examples are a {type(dataset).__name__}, not tensors in memory")


def random_crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, spec: RandomCropSpec) -> torch.Tensor:
    """Each image [c, s, s] of ``images`` padded by ``spec.padding`` with ``spec.fill``, cropped back to s x s at its
    own (top, left): ``v2.RandomCrop``'s output for those offsets."""
    batch, _, side, _ = images.shape
    padded = torch.nn.functional.pad(images, [spec.padding] * 4, value=spec.fill)  # [b, c, s + 2p, s + 2p]
    span = torch.arange(side, device=images.device)
    rows = (top[:, None] + span)[:, :, None]  # [b, s, 1]
    cols = (left[:, None] + span)[:, None, :]  # [b, 1, s]
    picked = padded.permute(0, 2, 3, 1)[torch.arange(batch, device=images.device)[:, None, None], rows, cols]
    return picked.permute(0, 3, 1, 2)  # [b, s, s, c] -> [b, c, s, s]


class DeviceLoader:
    """Batches of a split held on ``device``, in ``sampler``'s order (``None``: in order), augmented there."""

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *, sampler: Optional[Sampler] = None,
        augmentation: tuple[Augmentation, ...] = (), drop_last: bool = True, seed: int = 0,
    ) -> None:  # fmt: skip
        self.images, self.labels = images, labels  # [N, c, s, s], [N]: on the device
        self.batch_size, self.sampler, self.drop_last = batch_size, sampler, drop_last
        self.augmentation = tuple(augmentation)
        self.generator = torch.Generator().manual_seed(seed)  # the epoch's augmentation draws; the loop reseeds it

    @property
    def device(self) -> torch.device:
        return self.images.device

    def __len__(self) -> int:
        count = len(self.sampler) if self.sampler is not None else len(self.labels)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def draws(self) -> list[tuple[torch.Tensor, ...]]:
        """This epoch's table: for each augmentation step, its parameters for every example (rows by example index)."""
        size, table = len(self.labels), []
        for spec in self.augmentation:
            if isinstance(spec, RandomCropSpec):
                top, left = torch.randint(0, 2 * spec.padding + 1, (2, size), generator=self.generator)
                table.append((top.to(self.device), left.to(self.device)))
            else:
                flips = torch.rand(size, generator=self.generator) < spec.p
                table.append((flips.to(self.device),))
        return table

    def augment(self, images: torch.Tensor, indices: torch.Tensor, table: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        for spec, draws in zip(self.augmentation, table):
            if isinstance(spec, RandomCropSpec):
                images = random_crop(images, draws[0][indices], draws[1][indices], spec)
            else:
                images = torch.where(draws[0][indices, None, None, None], images.flip(-1), images)
        return images

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = list(self.sampler) if self.sampler is not None else range(len(self.labels))
        order = torch.as_tensor(order, dtype=torch.int64).to(self.device)  # [examples this epoch]
        table = self.draws() if self.augmentation else []
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start : start + self.batch_size]  # [b]
            yield self.augment(self.images[indices], indices, table), self.labels[indices]


def device_loader(
    dataset: Dataset, batch_size: int, *, device: torch.device, sampler: Optional[Sampler] = None, train: bool = True,
    seed: int = 0, max_bytes: Optional[int] = None,
) -> DeviceLoader:  # fmt: skip
    """``dataset`` copied to ``device`` as a :class:`DeviceLoader` (``train``: augmented, last partial batch
    dropped, as ``build_loader``). Raises :class:`NotOnDevice` saying why it cannot be, e.g. more than
    ``max_bytes`` of images."""
    images, labels, transform = split_tensors(dataset)
    augmentation = augmentation_of(transform, images.shape[-1]) if train else []
    size = images.element_size() * images.numel()
    if max_bytes is not None and size > max_bytes:
        raise NotOnDevice(f"its {size / 2**20:.0f} MiB of images exceed the {max_bytes / 2**20:.0f} MiB allowed")
    return DeviceLoader(
        images.to(device), labels.to(device), batch_size, sampler=sampler, augmentation=augmentation,
        drop_last=train, seed=seed,
    )  # fmt: skip


def training_loader(loader, sampler: Sampler, dataset: Dataset, setting, device: torch.device,
                    memory: Optional[int] = None):  # fmt: skip
    """The training loader ``trainer.data_on_device`` (``setting``) asks for: ``loader`` (the DataLoader) or the
    same batches from a :class:`DeviceLoader`. ``auto`` moves the split to a CUDA device when its images take at
    most a quarter of ``memory`` (this process's share) and its augmentation has a device version; ``true`` moves
    it to any device or stops, saying why it cannot."""
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return loader
    limit = memory // 4 if setting == "auto" and memory is not None else None
    try:
        moved = device_loader(dataset, loader.batch_size, device=device, sampler=sampler,
                              seed=loader.generator.initial_seed(), max_bytes=limit)  # fmt: skip
    except NotOnDevice as reason:
        if setting is True:
            raise ConfigError(
                f"trainer.data_on_device=true: the training split cannot be batched on {device}: {reason}; "
                "use trainer.data_on_device=false (or auto)"
            ) from None
        log.info("trainer.data_on_device=auto: the training split stays with the DataLoader: %s", reason)
        return loader
    log.info("trainer.data_on_device=%s: %d training images on %s, batched there%s", str(setting).lower(),
             len(moved.labels), device, f" ({len(moved.augmentation)} augmentation step(s))" if moved.augmentation else "")
    return moved
