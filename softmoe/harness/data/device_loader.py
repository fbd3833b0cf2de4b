"""Small datasets on the device: the training split copied to the accelerator once, batches drawn there.

    # trainer.data_on_device: DeviceLoaders of the same batches in place of the DataLoaders (loop.py)
    put_on_device(loaders, data.train, trainer.data_on_device, device, memory)
    for images, labels in loaders.train: ...   # already on the device

A :class:`DeviceLoader` stands in for the training ``DataLoader`` (``build_loader``): it takes the same
resumable ``sampler`` (``set_epoch(epoch, skip=...)``), has a ``generator`` the loop seeds each epoch and
a length, and yields ``(images [b, c, h, w], labels [b])`` without worker processes or host-to-device copies.

What it reproduces of the DataLoader path, and what it does not (``tests/test_device_loader.py``):

* the order: the sampler's, so the same examples form the same batches, and a resumed run skips exactly
  what it had seen; without augmentation the batches are identical to the DataLoader's;
* the augmentation: the dataset's own random crop (constant padding) and horizontal flip, the transforms
  ``v2.RandomCrop`` and ``v2.RandomHorizontalFlip`` that digits, Fashion-MNIST and CIFAR use, with
  the same distribution of offsets and flips. The draws differ: the DataLoader path draws per example from
  the global RNG as examples load; here one table of draws per epoch, one row per example, comes from
  ``loader.generator`` (seeded ``seed + epoch`` by the loop), so a resumed epoch sees the draws of the
  uninterrupted one whatever the RNG state, and every rank of a data-parallel run draws the same table.

Datasets held as tensors (``TensorImages``: digits, Fashion-MNIST, synthetic) go to the device, and so do
stored images whose transform is the crop and flip then only ``ToImage``/``ToDtype``/``Normalize`` (CIFAR at
its own 32 px: the split is converted once, and the crop's fill is converted with it). Others (a resize, timm's
ImageNet pipeline) stay with the DataLoader, for the reason :func:`put_on_device` logs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import torch
from torch.utils.data import Dataset, Sampler, Subset
from torchvision.transforms import v2

from ..errors import ConfigError
from ..rules import counted
from .common import with_transform
from .digits import TensorImages
from .splits import dataset_labels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RandomCropSpec:
    """``v2.RandomCrop(side, padding=padding, fill=...)`` of a square image: an offset in [0, 2 * padding], the
    padding filled with ``fill`` as the network sees it (one value, or one per channel)."""

    padding: int
    fill: Union[float, tuple[float, ...]]


@dataclass(frozen=True)
class FlipSpec:
    """``v2.RandomHorizontalFlip(p)``."""

    p: float


Augmentation = Union[RandomCropSpec, FlipSpec]
# The deterministic steps from a stored image to the network's tensor (CIFAR's), applied once, on the host.
TO_TENSOR_STEPS = (v2.ToImage, v2.ToDtype, v2.Normalize, v2.ToPureTensor)


class NotOnDevice(ValueError):
    """Why a split cannot be batched on the device (its storage or its transform)."""


def _steps(transform) -> list:
    return [] if transform is None else list(transform.transforms) if isinstance(transform, v2.Compose) else [transform]


def _is_random_crop_of_the_whole_image(step) -> bool:
    return (
        isinstance(step, v2.RandomCrop) and step.size[0] == step.size[1] and len(set(step.padding)) == 1
        and step.padding_mode == "constant" and not step.pad_if_needed and isinstance(step.fill, (int, float))
    )


def split_tensors(dataset: Dataset, augmented: bool = True) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """(images [N, c, s, s] as the network sees them, labels [N], the device's augmentation) of ``dataset``:
    ``TensorImages`` (digits, Fashion-MNIST, synthetic), or stored images whose transform is random crop / flip
    followed by ``TO_TENSOR_STEPS`` (CIFAR at 32 px), possibly behind ``Subset``s. ``augmented=False``: none."""
    if isinstance(dataset, Subset):
        images, labels, augmentation = split_tensors(dataset.dataset, augmented)
        indices = torch.as_tensor(dataset.indices, dtype=torch.int64)
        return images[indices], labels[indices], augmentation
    steps = _steps(getattr(dataset, "transform", None))
    random = list(itertools.takewhile(lambda step: isinstance(step, (v2.RandomCrop, v2.RandomHorizontalFlip)), steps))
    rest = steps[len(random):]
    if isinstance(dataset, TensorImages):
        images, labels, to_tensor = dataset.images, dataset.labels, None
    elif hasattr(dataset, "transform") and rest and all(isinstance(step, TO_TENSOR_STEPS) for step in rest):
        to_tensor = v2.Compose(rest)
        stored = with_transform(dataset, to_tensor)
        images = torch.stack([stored[index][0] for index in range(len(stored))])  # [N, c, s, s]
        labels = torch.as_tensor(dataset_labels(dataset), dtype=torch.int64)
        rest = []
    else:
        raise NotOnDevice(f"its examples are a {type(dataset).__name__}, neither tensors in memory nor images whose "
                          "transform ends in ToImage / ToDtype / Normalize")
    if rest:
        raise NotOnDevice(f"its transform {rest[0]!r} has no device version (random crop with constant padding "
                          "of the full image, horizontal flip)")
    augmentation = []
    for step in random if augmented else []:
        if isinstance(step, v2.RandomHorizontalFlip):
            augmentation.append(FlipSpec(float(step.p)))
        elif _is_random_crop_of_the_whole_image(step) and step.size[0] == images.shape[-1]:
            fill = float(step.fill) if to_tensor is None else tuple(  # the stored fill value, as the network sees it
                to_tensor(torch.full((images.shape[1], 1, 1), step.fill, dtype=torch.uint8)).flatten().tolist()
            )
            augmentation.append(RandomCropSpec(int(step.padding[0]), fill))
        else:
            raise NotOnDevice(f"its transform {step!r} has no device version (random crop with constant padding "
                              "of the full image, horizontal flip)")
    return images, labels, tuple(augmentation)


def random_crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, spec: RandomCropSpec) -> torch.Tensor:
    """Each image [c, s, s] of ``images`` padded by ``spec.padding`` with ``spec.fill``, cropped back to s x s at its
    own (top, left): ``v2.RandomCrop``'s output for those offsets."""
    batch, channels, side, _ = images.shape
    fill = torch.as_tensor(spec.fill, dtype=images.dtype, device=images.device).expand(channels)[:, None, None]
    border = torch.ones(side + 2 * spec.padding, side + 2 * spec.padding, dtype=torch.bool, device=images.device)
    border[spec.padding : spec.padding + side, spec.padding : spec.padding + side] = False
    padded = torch.where(border, fill, torch.nn.functional.pad(images, [spec.padding] * 4))  # [b, c, s + 2p, s + 2p]
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
    ) -> None:
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

    def augment(self, images: torch.Tensor, indices: torch.Tensor,
                table: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
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
) -> DeviceLoader:
    """``dataset`` copied to ``device`` as a :class:`DeviceLoader` (``train``: augmented, last partial batch
    dropped, as ``build_loader``). Raises :class:`NotOnDevice` saying why it cannot be, e.g. more than
    ``max_bytes`` of images."""
    images, labels, augmentation = split_tensors(dataset, augmented=train)
    size = images.element_size() * images.numel()
    if max_bytes is not None and size > max_bytes:
        raise NotOnDevice(f"its {size / 2**20:.0f} MiB of images exceed the {max_bytes / 2**20:.0f} MiB allowed")
    return DeviceLoader(
        images.to(device), labels.to(device), batch_size, sampler=sampler, augmentation=augmentation,
        drop_last=train, seed=seed,
    )


def put_on_device(loaders, data_train: Dataset, setting, device: torch.device, memory: Optional[int] = None) -> None:
    """Replace ``loaders``' DataLoaders (``distributed.Loaders``: train, val, test) with :class:`DeviceLoader` s of
    the same batches as ``trainer.data_on_device`` (``setting``) asks. ``auto`` moves the training split to a CUDA
    device when its images take at most a quarter of ``memory`` (this process's share) and its augmentation has a
    device version; ``true`` moves it to any device or stops, saying why it cannot. The validation and test splits
    follow it when they can (one process: a data-parallel rank's padded shard stays with its DataLoader)."""
    if setting is False or (setting == "auto" and device.type != "cuda"):
        return
    limit = memory // 4 if setting == "auto" and memory is not None else None
    train = loaders.train
    try:
        loaders.train = device_loader(data_train, train.batch_size, device=device, sampler=loaders.sampler,
                                      seed=train.generator.initial_seed(), max_bytes=limit)
    except NotOnDevice as reason:
        if setting is True:
            raise ConfigError(
                f"trainer.data_on_device=true: the training split cannot be batched on {device}: {reason}; "
                "use trainer.data_on_device=false (or auto)"
            ) from None
        log.info("trainer.data_on_device=auto: the training split stays with the DataLoader: %s", reason)
        return
    moved = ["train"]
    for name in ("val", "test"):
        loader = getattr(loaders, name)
        with contextlib.suppress(NotOnDevice):
            if loader is not None:
                setattr(loaders, name, device_loader(loader.dataset, loader.batch_size, device=device, train=False,
                                                     max_bytes=limit))
                moved.append(name)
    log.info("trainer.data_on_device=%s: %s on %s, batched there (%s, %s)", str(setting).lower(), " / ".join(moved),
             device, counted(len(loaders.train.labels), "training image"),
             counted(len(loaders.train.augmentation), "augmentation step"))
