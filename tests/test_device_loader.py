"""trainer.data_on_device: the training split batched and augmented on the device gives the DataLoader path's
batches (same order, same examples; without augmentation the same tensors), and a resumed epoch its draws."""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import train_killed_after
from data_fixtures import data_config, write_cifar, write_fashion_mnist
from torch.utils.data import Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from softmoe.harness.checkpoint import load_checkpoint
from softmoe.harness.data import build_datasets, build_loader
from softmoe.harness.data.device_loader import (
    DeviceLoader,
    FlipSpec,
    NotOnDevice,
    RandomCropSpec,
    device_loader,
    put_on_device,
)
from softmoe.harness.distributed import Distributed
from softmoe.harness.errors import ConfigError
from softmoe.harness.loop import train
from softmoe.harness.rules import plain
from softmoe.harness.runs import read_events
from softmoe.harness.sampler import ResumableSampler

CPU = torch.device("cpu")


def fashion(tmp_path, augment: bool):
    write_fashion_mnist(tmp_path, sizes=(("train", 60), ("test", 20)))
    return build_datasets(data_config("fashion_mnist", root=str(tmp_path), val_size=10, augment=augment), "/none")


def both_paths(dataset, batch_size=8, seed=3):
    """(the DataLoader, the DeviceLoader), each with its own sampler of the same seed."""
    loader = build_loader(dataset, batch_size, train=True, seed=seed, sampler=ResumableSampler(len(dataset), seed))
    on_device = device_loader(dataset, batch_size, device=CPU, sampler=ResumableSampler(len(dataset), seed), seed=seed)
    return loader, on_device


def epoch(loader, number: int, skip: int = 0, seed: int = 3) -> list:
    loader.sampler.set_epoch(number, skip=skip)
    loader.generator.manual_seed(seed + number)  # as the training loop does each epoch
    return list(loader)


def candidates(image: torch.Tensor, padding: int, fill: float, then=lambda image: image) -> list[torch.Tensor]:
    """Every image v2.RandomCrop(side, padding, fill) then v2.RandomHorizontalFlip (then ``then``) can make of
    ``image``, computed by torchvision one example at a time."""
    side = image.shape[-1]
    padded = TF.pad(image, [padding], fill=fill)
    offsets = range(2 * padding + 1)
    crops = [TF.crop(padded, top, left, side, side) for top in offsets for left in offsets]
    return [then(crop) for crop in crops + [TF.horizontal_flip(crop) for crop in crops]]


def test_without_augmentation_the_batches_are_the_dataloaders_every_epoch_and_after_a_mid_epoch_resume(tmp_path):
    bundle = fashion(tmp_path, augment=False)
    loader, on_device = both_paths(bundle.train)
    assert len(on_device) == len(loader) == 6  # 50 examples, batch 8, the last partial batch dropped
    for number, skip in ((0, 0), (1, 0), (1, 3 * 8), (4, 5 * 8)):
        expected, got = epoch(loader, number, skip), epoch(on_device, number, skip)
        assert len(got) == len(expected) > 0
        for (images, labels), (device_images, device_labels) in zip(expected, got):
            assert torch.equal(device_images, images) and torch.equal(device_labels, labels)


def test_augmented_batches_hold_the_same_examples_each_a_crop_and_flip_the_dataloader_could_have_drawn(tmp_path):
    bundle = fashion(tmp_path, augment=True)  # v2.RandomCrop(28, padding=2, fill=-mean/std), v2.RandomHorizontalFlip
    loader, on_device = both_paths(bundle.train)
    fill = bundle.train.dataset.transform.transforms[0].fill
    assert on_device.augmentation == (RandomCropSpec(2, fill), FlipSpec(0.5))
    originals = bundle.train_eval  # the same examples, unaugmented
    order = list(itertools.islice(iter(ResumableSampler(len(originals), 3)), 48))
    sampler_epoch = [(images, labels) for images, labels in epoch(on_device, 0)]
    loader_epoch = epoch(loader, 0)
    crop = on_device.augmentation[0]
    for position, index in enumerate(order):
        original, label = originals[index]
        choices = candidates(original, crop.padding, crop.fill)
        for images, labels in (sampler_epoch[position // 8], loader_epoch[position // 8]):
            image = images[position % 8]
            assert int(labels[position % 8]) == label
            assert any(torch.equal(image, choice) for choice in choices), (position, index)
    # the documented difference: the draws are the device table's, not the global RNG's per-example draws
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(sampler_epoch, loader_epoch))


def test_the_crop_and_flip_of_each_example_are_torchvisions_for_its_drawn_offsets_and_flip():
    torch.manual_seed(0)
    images, labels = torch.randn(40, 3, 6, 6), torch.arange(40)
    spec, flip = RandomCropSpec(padding=2, fill=-0.5), FlipSpec(0.5)
    loader = DeviceLoader(images, labels, 40, augmentation=(spec, flip), drop_last=False, seed=7)
    (top, left), (flipped,) = loader.draws()
    loader.generator.manual_seed(7)
    (batch, batch_labels), = list(loader)
    assert torch.equal(batch_labels, labels)
    for index in range(40):
        expected = TF.crop(TF.pad(images[index], [2], fill=-0.5), int(top[index]), int(left[index]), 6, 6)
        expected = TF.horizontal_flip(expected) if flipped[index] else expected
        assert torch.equal(batch[index], expected), index
    # offsets cover 0..2*padding and about half the images flip
    assert set(top.tolist()) == set(left.tolist()) == {0, 1, 2, 3, 4} and 10 <= int(flipped.sum()) <= 30


def test_a_resumed_epoch_draws_the_augmentations_of_the_uninterrupted_one(tmp_path):
    bundle = fashion(tmp_path, augment=True)
    _, on_device = both_paths(bundle.train)
    whole = epoch(on_device, 2)
    torch.manual_seed(123)  # whatever the global RNG holds after a restart
    resumed = epoch(on_device, 2, skip=4 * 8)
    assert len(resumed) == 2
    for (images, labels), (resumed_images, resumed_labels) in zip(whole[4:], resumed):
        assert torch.equal(images, resumed_images) and torch.equal(labels, resumed_labels)
    assert not torch.equal(epoch(on_device, 3)[0][0], whole[0][0])  # a new epoch, new draws


def test_cifar_goes_to_the_device_converted_once_with_its_crop_fill_converted_too(tmp_path):
    write_cifar(tmp_path, "cifar10", per_file=8)  # 40 train images
    plain, augmented = (
        build_datasets(data_config("cifar10", root=str(tmp_path), val_size=8, augment=augment), "/none")
        for augment in (False, True)
    )
    loader, on_device = both_paths(plain.train)
    for (images, labels), (device_images, device_labels) in zip(epoch(loader, 1), epoch(on_device, 1)):
        assert torch.equal(device_images, images) and torch.equal(device_labels, labels)

    _, on_device = both_paths(augmented.train)
    crop = on_device.augmentation[0]
    mean, std = torch.tensor(plain.train.dataset.mean), torch.tensor(plain.train.dataset.std)
    assert crop.padding == 4 and torch.allclose(torch.tensor(crop.fill), -mean / std)  # black, normalised
    to_tensor = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean.tolist(), std.tolist())])
    raw = torch.from_numpy(augmented.train.dataset.data).permute(0, 3, 1, 2)  # [N, 3, 32, 32] uint8
    order = list(ResumableSampler(len(augmented.train), 3))
    for position, (images, labels) in enumerate(epoch(on_device, 0)):
        for row in range(len(labels)):
            index = augmented.train.indices[order[position * 8 + row]]
            choices = candidates(raw[index], 4, 0, then=to_tensor)
            assert any(torch.allclose(images[row], choice, atol=1e-6) for choice in choices), (position, row)


def test_data_on_device_false_and_auto_on_a_cpu_keep_the_dataloaders_true_moves_every_split_or_says_why_not(
    compose_run, tmp_path
):
    bundle = fashion(tmp_path, augment=True)
    trainer = plain(compose_run("trainer.batch_size=8", "trainer.eval_batch_size=4").trainer)
    for setting in (False, "auto"):  # auto: CUDA devices only
        loaders = Distributed().build_loaders(bundle, trainer, seed=0)
        before = (loaders.train, loaders.val, loaders.test)
        put_on_device(loaders, bundle.train, setting, CPU)
        assert (loaders.train, loaders.val, loaders.test) == before
    put_on_device(loaders, bundle.train, True, CPU)
    assert isinstance(loaders.train, DeviceLoader) and loaders.train.sampler is loaders.sampler
    assert loaders.train.batch_size == 8 and len(loaders.train.augmentation) == 2
    for name, expected in (("val", before[1]), ("test", before[2])):  # in order, unaugmented, the last batch kept
        moved = getattr(loaders, name)
        assert isinstance(moved, DeviceLoader) and not moved.augmentation and len(moved) == len(expected)
        for (images, labels), (device_images, device_labels) in zip(expected, moved):
            assert torch.equal(device_images, images) and torch.equal(device_labels, labels)

    rotated = Subset(bundle.train.dataset.__class__(torch.zeros(4, 1, 28, 28), torch.zeros(4, dtype=torch.long),
                                                     transform=v2.RandomRotation(10)), [0, 1, 2])
    with pytest.raises(ConfigError, match=r"trainer.data_on_device=true: .* RandomRotation.* has no device version"):
        put_on_device(Distributed().build_loaders(bundle, trainer, seed=0), rotated, True, CPU)
    with pytest.raises(NotOnDevice, match="MiB of images exceed"):
        device_loader(bundle.train, 8, device=CPU, max_bytes=1000)


@pytest.mark.slow
def test_a_run_with_data_on_device_trains_exactly_as_with_the_dataloader_and_resumes_exactly(
    compose_run, tmp_path, monkeypatch, resumed_from
):
    run = ["trainer.max_steps=12", "trainer.batch_size=128", "trainer.checkpoint_every=4", "trainer.log_every=2",
           "model.depth=2", "logger=none", "trainer.progress_bar=false"]
    summaries = [train(compose_run(*run, f"trainer.data_on_device={on}"), tmp_path / name)
                 for on, name in ((False, "dataloader"), (True, "device"))]
    assert summaries[0].test_acc == summaries[1].test_acc and summaries[0].best_val_acc == summaries[1].best_val_acc
    weights = [load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("dataloader", "device")]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])

    # with augmentation on the device: killed after step 6, resumed from step 4, it ends where the whole run does
    augmented = [*run, "trainer.data_on_device=true", "data.augment=true"]
    train(compose_run(*augmented), tmp_path / "whole")
    train_killed_after(6, compose_run(*augmented), tmp_path / "resumed", monkeypatch)
    train(compose_run(*augmented), tmp_path / "resumed")
    assert resumed_from() == [(tmp_path / "resumed" / "last.pt", 4)]
    whole, resumed = (load_checkpoint(tmp_path / name / "last.pt")["model"] for name in ("whole", "resumed"))
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    losses = [[e["train/loss"] for e in read_events(tmp_path / name) if "train/loss" in e]
              for name in ("whole", "resumed")]
    assert losses[0] == losses[1] and len(losses[0]) == 6
