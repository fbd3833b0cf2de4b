"""The data layer on real code paths: bundled digits, generated CIFAR pickles and PNG trees, synthetic data."""

from __future__ import annotations

import logging
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from data_fixtures import (
    CIFAR_LAYOUT,
    CONF_DATA,
    cifar_batch,
    data_config,
    truncate,
    write_cifar,
    write_fashion_mnist,
    write_image_tree,
    write_pickle,
    write_png,
)
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, SequentialSampler

from softmoe.harness.data import (
    DATASETS,
    BadDataError,
    MissingDataError,
    build_datasets,
    build_loader,
    dataset_size,
    check_data_config,
)
from softmoe.harness.errors import ConfigError, one_line
from softmoe.harness.data import fashion_mnist
from softmoe.harness.data.cifar import CheckedCIFAR10, CheckedCIFAR100
from softmoe.harness.data.digits import DIGITS_MEAN, DIGITS_STD

# ----------------------------------------------------------------------------- configs


def test_every_dataset_has_a_runnable_config_file():
    files = sorted(CONF_DATA.glob("*.yaml"))
    assert sorted(path.stem for path in files) == sorted(DATASETS)
    for path in files:
        cfg = OmegaConf.load(path)
        assert cfg.name == path.stem
        check_data_config(cfg)
        header = path.read_text().split("\nname:")[0]
        assert "python -m softmoe.train" in header, f"{path.name} must say at its top the command that uses it"


BAD_CONFIGS = [
    (
        "digits",
        {"name": "mnist"},
        "data.name=mnist: must be one of digits, cifar10, cifar100, fashion_mnist, imagefolder, synthetic",
    ),
    ("digits", {"img_size": 16}, "data.img_size=16: must be 8 for data=digits"),
    ("digits", {"test_size": 5}, "data.test_size=5: must be an integer from 10 to 1787"),
    ("digits", {"split_seed": -1}, "data.split_seed=-1: must be an integer in [0, 2**32)"),
    ("digits", {"root": "/data"}, "data.root=/data: not a key of data=digits"),
    ("cifar10", {"num_classes": 100}, "data.num_classes=100: must be 10 for data=cifar10"),
    ("cifar100", {"in_chans": 1}, "data.in_chans=1: must be 3 for data=cifar100"),
    ("cifar10", {"download": "yes"}, "data.download=yes: must be true or false"),
    ("cifar10", {"on_bad_file": "ignore"}, "data.on_bad_file=ignore: must be one of error, skip"),
    ("cifar10", {"img_size": 0}, "data.img_size=0: must be a positive integer"),
    ("imagefolder", {"in_chans": 2}, "data.in_chans=2: must be 1 (grayscale) or 3 (RGB)"),
    ("imagefolder", {"num_classes": -3}, "data.num_classes=-3: must be a positive integer"),
    ("imagefolder", {"mean": [0.5]}, "data.mean=[0.5]: must be a list of 3 numbers, one per channel"),
    ("imagefolder", {"std": [0.2, 0.0, 0.2]}, "data.std=[0.2,0.0,0.2]: must be a list of 3 positive numbers"),
    ("imagefolder", {"crop_pct": 1.5}, "data.crop_pct=1.5: must be a number in (0, 1]"),
    ("imagefolder", {"verify": "maybe"}, "data.verify=maybe: must be one of full, header, none"),
    ("imagefolder", {"auto_augment": "bogus"}, "data.auto_augment=bogus: must be null or a timm auto-augment policy"),
    ("imagefolder", {"root": ""}, "data.root=: must be a directory path, or null"),
    ("synthetic", {"img_size": True}, "data.img_size=true: must be a positive integer"),
    ("synthetic", {"train_size": 0}, "data.train_size=0: must be a positive integer"),
    ("synthetic", {"signal": -1.0}, "data.signal=-1.0: must be a number >= 0"),
]


@pytest.mark.parametrize("name, overrides, message", BAD_CONFIGS, ids=[m.split(":")[0] for _, _, m in BAD_CONFIGS])
def test_bad_config_is_one_line_naming_key_value_and_rule(name, overrides, message):
    with pytest.raises(ValueError) as raised:
        check_data_config(data_config(name, **overrides))
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_missing_key_names_the_config_file():
    cfg = OmegaConf.to_container(data_config("synthetic"))
    del cfg["seed"]
    missing = r"^data\.seed: missing; data=synthetic needs every key of conf/data/synthetic"
    with pytest.raises(ValueError, match=missing):
        check_data_config(cfg)


def test_root_defaults_to_data_dir_and_name_and_resolves_interpolation(tmp_path):
    write_cifar(tmp_path / "cifar10", "cifar10")
    assert len(build_datasets(data_config("cifar10", val_size=0), str(tmp_path)).test) == 3
    # data.root wins over data_dir, and may interpolate the top-level paths.data_dir
    write_cifar(tmp_path / "elsewhere", "cifar10", per_file=2)
    data = data_config("cifar10", root="${paths.data_dir}/elsewhere", val_size=0)
    top = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}, "data": data})
    assert len(build_datasets(top.data, "/nonexistent").test) == 2


def test_dataset_size_is_known_without_loading_where_possible():
    # 'train' is what the model trains on: the training examples less the validation split held out of them
    assert [dataset_size(data_config("digits"), split) for split in ("train", "val", "test")] == [1257, 180, 360]
    assert dataset_size(data_config("digits", val_size=0), "train") == 1437
    assert dataset_size(data_config("digits", test_size=100), "test") == 100
    assert dataset_size(data_config("cifar100"), "train") == 45_000
    assert dataset_size(data_config("cifar100", val_size=0.1), "val") == 5_000
    assert dataset_size(data_config("fashion_mnist"), "train") == 55_000
    assert dataset_size(data_config("synthetic", test_size=7), "test") == 7
    assert dataset_size(data_config("imagefolder"), "train") is None
    with pytest.raises(ValueError, match="split='minival'"):
        dataset_size(data_config("digits"), "minival")


# ----------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits():
    return build_datasets(data_config("digits"), "/nonexistent")


def test_digits_split_sizes_shapes_and_normalization(digits):
    assert (len(digits.train), len(digits.val), len(digits.test)) == (1257, 180, 360)
    assert (digits.num_classes, digits.in_chans, digits.img_size, digits.skipped) == (10, 1, 8, 0)
    image, label = digits.train[0]
    assert image.shape == (1, 8, 8) and image.dtype == torch.float32 and isinstance(label, int)
    pixels = digits.train.dataset.images  # the 1,437 non-test images: train and validation
    assert abs(pixels.mean().item()) < 0.05 and abs(pixels.std().item() - 1) < 0.05
    # raw pixel values are the integers 0..16, so normalisation must be invertible onto them
    raw = digits.test.images * DIGITS_STD + DIGITS_MEAN
    assert torch.allclose(raw * 16, (raw * 16).round(), atol=1e-3) and raw.min() >= -1e-4 and raw.max() <= 1 + 1e-4


def test_digits_split_is_stratified_and_independent_of_the_run_seed(digits):
    test_counts = Counter(digits.test.labels.tolist())
    val_labels = [label for _, label in digits.val]
    train_labels = [label for _, label in digits.train]
    total_counts = Counter(digits.test.labels.tolist() + train_labels + val_labels)
    for digit, total in total_counts.items():
        assert abs(test_counts[digit] - 360 * total / 1797) <= 1
        assert abs(Counter(val_labels)[digit] - 180 * total / 1797) <= 1.5
    torch.manual_seed(1234)
    again = build_datasets(data_config("digits"), "/nonexistent")
    assert torch.equal(again.test.images, digits.test.images) and torch.equal(again.test.labels, digits.test.labels)
    assert again.val.indices == digits.val.indices and again.train.indices == digits.train.indices
    other = build_datasets(data_config("digits", split_seed=1), "/nonexistent")
    assert not torch.equal(other.test.labels, digits.test.labels) and other.val.indices != digits.val.indices


def test_digits_augmentation_translates_by_at_most_one_pixel(digits):
    augmented = build_datasets(data_config("digits", augment=True), "/nonexistent")
    blank = -DIGITS_MEAN / DIGITS_STD
    shifts = set()
    for index in range(40):
        original, label = digits.train[index]
        moved, moved_label = augmented.train[index]
        assert moved_label == label and moved.shape == (1, 8, 8)
        padded = torch.nn.functional.pad(original, (1, 1, 1, 1), value=blank)
        offsets = [(dy, dx) for dy in range(3) for dx in range(3)]
        matches = [(dy, dx) for dy, dx in offsets if torch.equal(padded[:, dy : dy + 8, dx : dx + 8], moved)]
        assert matches, f"augmented image {index} is not a 1-pixel translation of the original"
        shifts.update(matches)
    assert len(shifts) > 1
    assert augmented.test.transform is None


# ----------------------------------------------------------------------------- loaders


def _order(loader):
    return torch.cat([batch for batch in loader]).tolist()


def test_loader_order_is_determined_by_the_seed():
    dataset = list(range(50))
    for seed in (0, 1):
        first, again = (_order(build_loader(dataset, 8, train=True, seed=seed)) for _ in range(2))
        assert first == again
    assert _order(build_loader(dataset, 8, train=True, seed=0)) != _order(build_loader(dataset, 8, train=True, seed=1))
    loader = build_loader(dataset, 8, train=True, seed=0)
    first, second = _order(loader), _order(loader)
    assert first != second  # each epoch reshuffles ...
    again = build_loader(dataset, 8, train=True, seed=0)
    assert [_order(again), _order(again)] == [first, second]  # ... and the sequence of epochs repeats


def test_loader_batches_and_sampler_rules():
    dataset = list(range(50))
    train = build_loader(dataset, 8, train=True)
    assert len(train) == 6 and len(_order(train)) == 48  # drop_last: 6 full batches, 2 examples left out
    assert _order(build_loader(dataset, 8, train=False)) == dataset  # evaluation: in order, nothing dropped
    sampled = build_loader(dataset, 8, train=True, sampler=SequentialSampler(dataset), drop_last=False)
    assert _order(sampled) == dataset


def test_loader_refuses_a_batch_larger_than_the_split():
    with pytest.raises(ValueError, match=r"^batch_size=64: larger than the 50 examples of this split"):
        build_loader(list(range(50)), 64, train=True)
    assert len(build_loader(list(range(50)), 64, train=False)) == 1


def test_loader_over_real_dataset_yields_model_ready_batches(digits):
    images, labels = next(iter(build_loader(digits.train, 32, train=True, seed=0)))
    assert images.shape == (32, 1, 8, 8) and labels.dtype == torch.int64


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_files_load_with_labels_and_transforms(tmp_path, name):
    written = write_cifar(tmp_path, name)
    bundle = build_datasets(data_config(name, root=str(tmp_path), val_size=0), "/nonexistent")
    classes = CIFAR_LAYOUT[name][-1]
    assert (bundle.num_classes, bundle.in_chans, bundle.img_size, bundle.skipped) == (classes, 3, 32, 0)
    assert len(bundle.train) == len(written["train"][1]) and len(bundle.test) == len(written["test"][1])
    assert bundle.train.targets == written["train"][1].tolist()
    assert bundle.test.classes[:2] == ["class0", "class1"]
    # evaluation transform: the stored pixels (channel-major rows), scaled to [0, 1] and normalised
    images, labels = written["test"]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (bundle.test.mean, bundle.test.std))
    for index in range(len(labels)):
        image, label = bundle.test[index]
        expected = (torch.from_numpy(images[index]).view(3, 32, 32).float() / 255 - mean) / std
        assert label == labels[index] and torch.allclose(image, expected, atol=1e-5)
    # training transform: random crop and flip, same shape
    torch.manual_seed(0)
    views = torch.stack([bundle.train[0][0] for _ in range(8)])
    assert views.shape == (8, 3, 32, 32) and any(not torch.equal(views[0], view) for view in views[1:])


def test_cifar_resizes_to_img_size_and_reads_newer_pickle_protocols(tmp_path):
    write_cifar(tmp_path, "cifar10", protocol=pickle.HIGHEST_PROTOCOL)
    cfg = data_config("cifar10", root=str(tmp_path), img_size=48, augment=False, val_size=0)
    bundle = build_datasets(cfg, "/nonexistent")
    assert bundle.img_size == 48 and bundle.train[0][0].shape == bundle.test[0][0].shape == (3, 48, 48)


def test_cifar_download_uses_torchvision_into_the_root(tmp_path, monkeypatch):
    fetched = []

    def fake_download_and_extract_archive(url, download_root, filename, md5):  # no network here
        fetched.append((url, Path(download_root), filename, md5))
        write_cifar(Path(download_root), "cifar10")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", fake_download_and_extract_archive)
    bundle = build_datasets(data_config("cifar10", download=True, val_size=0), str(tmp_path))
    assert fetched == [(CheckedCIFAR10.url, tmp_path / "cifar10", CheckedCIFAR10.filename, CheckedCIFAR10.tgz_md5)]
    assert len(bundle.train) == 15


def test_cifar_missing_files_say_where_and_how_to_fetch(tmp_path):
    write_cifar(tmp_path, "cifar100")
    (tmp_path / "cifar-100-python" / "test").unlink()
    with pytest.raises(MissingDataError) as raised:
        build_datasets(data_config("cifar100", root=str(tmp_path), val_size=0), "/nonexistent")
    message = str(raised.value)
    assert str(tmp_path / "cifar-100-python") in message and "missing test" in message
    assert "data.download=true" in message and "data.root" in message
    assert isinstance(raised.value, FileNotFoundError)


def _cifar_label_out_of_range(root: Path) -> Path:
    path = root / "cifar-10-batches-py" / "data_batch_2"
    write_pickle(path, cifar_batch("cifar10", np.zeros((3, 3072), np.uint8), [1, 10, 2]))
    return path


def _cifar_grayscale_rows(root: Path) -> Path:
    path = root / "cifar-10-batches-py" / "data_batch_3"
    write_pickle(path, cifar_batch("cifar10", np.zeros((3, 1024), np.uint8), [1, 2, 3]))
    return path


def _cifar_truncated(root: Path) -> Path:
    return truncate(root / "cifar-10-batches-py" / "test_batch")


def _cifar_code_payload(root: Path) -> Path:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'pwned'}",))

    path = root / "cifar-10-batches-py" / "data_batch_1"
    write_pickle(path, {b"data": Payload(), b"labels": []})
    return path


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_cifar_grayscale_rows, "1024 values per image, but CIFAR stores 3 channels x 32 x 32 = 3072"),
        (_cifar_truncated, "not a readable CIFAR python pickle"),
        (_cifar_code_payload, "refusing to load posix.system"),
    ],
)
def test_cifar_damaged_file_is_named(tmp_path, corrupt, message):
    write_cifar(tmp_path, "cifar10")
    path = corrupt(tmp_path)
    for policy in ("error", "skip"):  # a damaged file cannot be skipped example by example
        with pytest.raises(BadDataError) as raised:
            build_datasets(data_config("cifar10", root=str(tmp_path), on_bad_file=policy, val_size=0), "/nonexistent")
        assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)
    assert not (tmp_path / "pwned").exists()


def test_cifar_label_out_of_range_is_named_or_skipped_and_counted(tmp_path):
    write_cifar(tmp_path, "cifar10")
    path = _cifar_label_out_of_range(tmp_path)
    with pytest.raises(BadDataError, match=f"^{path}: image 1 has label 10, outside 0..9"):
        build_datasets(data_config("cifar10", root=str(tmp_path), val_size=0), "/nonexistent")
    bundle = build_datasets(data_config("cifar10", root=str(tmp_path), on_bad_file="skip", val_size=0), "/nonexistent")
    assert bundle.skipped == 1 and bundle.skipped_reasons[0].startswith(f"{path}: image 1")
    assert len(bundle.train) == 14 and bundle.train.targets[3:5] == [1, 2]


def test_cifar100_reads_fine_labels(tmp_path):
    written = write_cifar(tmp_path, "cifar100", per_file=20)
    bundle = build_datasets(data_config("cifar100", root=str(tmp_path), val_size=0), "/nonexistent")
    assert isinstance(bundle.train, CheckedCIFAR100)
    assert bundle.train.targets == written["train"][1].tolist() and max(bundle.train.targets) >= 10
    assert CheckedCIFAR100.base_folder == "cifar-100-python" and CheckedCIFAR10.base_folder == "cifar-10-batches-py"


# ----------------------------------------------------------------------------- ImageFolder


def _imagefolder(root: Path, **overrides):
    overrides = {"img_size": 16, "num_classes": 3, "verify": "full", **overrides}
    return build_datasets(data_config("imagefolder", root=str(root), **overrides), "/nonexistent")


def test_imagefolder_tree_loads_with_vit_transforms(tmp_path):
    write_image_tree(tmp_path, train={"cat": 3, "dog": 2, "emu": 2}, val={"cat": 1, "emu": 2})
    bundle = _imagefolder(tmp_path)
    assert (len(bundle.train), len(bundle.test), bundle.num_classes, bundle.skipped) == (7, 3, 3, 0)
    assert bundle.train.classes == ["cat", "dog", "emu"]
    # val has no dog: emu keeps the training split's index 2
    assert bundle.test.targets == [0, 2, 2] and bundle.test.class_to_idx == bundle.train.class_to_idx
    image, label = bundle.test[1]
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and label == 2
    assert torch.equal(bundle.test[1][0], image)  # evaluation is deterministic
    images, labels = next(iter(build_loader(bundle.train, 4, train=True)))
    assert images.shape == (4, 3, 16, 16)


def test_an_image_that_breaks_in_a_dataloader_worker_is_still_named_in_one_line(tmp_path):
    write_image_tree(tmp_path, train={"a": 2, "b": 2}, val={"a": 1, "b": 1})
    bundle = _imagefolder(tmp_path, num_classes=2)
    (tmp_path / "train" / "a" / "0.png").write_bytes(b"not a PNG any more")  # after the dataset was checked
    with pytest.raises(BadDataError) as raised:
        next(iter(build_loader(bundle.train, 4, train=True, num_workers=1)))
    assert "Original Traceback" in str(raised.value)  # PyTorch's message: the worker's traceback
    assert one_line(raised.value).startswith(f"{tmp_path / 'train' / 'a' / '0.png'}: unreadable image (")
    assert "\n" not in one_line(raised.value) and one_line(ValueError("x")) == "x"


def test_imagefolder_grayscale(tmp_path):
    write_image_tree(tmp_path, train={"a": 2, "b": 2}, val={"a": 1, "b": 1}, mode="RGB")
    bundle = _imagefolder(tmp_path, in_chans=1, mean=[0.5], std=[0.5], num_classes=2)
    assert bundle.train[0][0].shape == bundle.test[0][0].shape == (1, 16, 16)


def test_imagefolder_missing_tree_explains_the_layout(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(MissingDataError) as raised:
        _imagefolder(tmp_path)
    message = str(raised.value)
    assert f"no folder {tmp_path / 'val'}" in message and f"{tmp_path}/train/<class>/<image>" in message
    assert "data.root" in message
    (tmp_path / "val").mkdir()
    with pytest.raises(MissingDataError, match=f"no class folders in {tmp_path / 'train'}"):
        _imagefolder(tmp_path)
    write_image_tree(tmp_path, train={"cat": 0}, val={"cat": 0})
    (tmp_path / "train" / "cat").mkdir()
    with pytest.raises(MissingDataError, match=f"no readable images .* under {tmp_path / 'train'}"):
        _imagefolder(tmp_path)


def test_imagefolder_more_classes_than_num_classes(tmp_path):
    write_image_tree(tmp_path, train={"a": 1, "b": 1, "c": 1, "d": 1}, val={"a": 1})
    with pytest.raises(ConfigError, match=r"^data\.num_classes=3: .* has 4 class folders; set data\.num_classes=4"):
        _imagefolder(tmp_path)


def test_imagefolder_fewer_classes_than_num_classes_trains_and_is_warned_about(tmp_path, caplog):
    """The config's default is ImageNet's 1000: a folder of 2 classes left at it trains a head of 998 dead outputs."""
    write_image_tree(tmp_path, train={"a": 1, "b": 1}, val={"a": 1})
    with caplog.at_level(logging.WARNING):
        assert _imagefolder(tmp_path, num_classes=1000).num_classes == 1000
    warned = f"data.num_classes=1000: {tmp_path / 'train'} has 2 class folders, so the model's head has 998 outputs"
    assert warned in caplog.text
    caplog.clear()
    _imagefolder(tmp_path, num_classes=2)
    assert "data.num_classes" not in caplog.text


def _garbage(root: Path) -> Path:
    path = root / "train" / "cat" / "notes.png"
    path.write_bytes(b"this is not an image")
    return path


def _truncated(root: Path) -> Path:
    return truncate(write_png(root / "train" / "dog" / "cut.png", size=32, seed=7))


def _grayscale(root: Path) -> Path:
    return write_png(root / "val" / "cat" / "gray.png", mode="L")


def _unknown_class(root: Path) -> Path:
    return write_png(root / "val" / "zebra" / "0.png")


BAD_IMAGES = [
    (_garbage, {}, "unreadable image (UnidentifiedImageError"),
    (_truncated, {}, "unreadable image"),
    (_grayscale, {"strict_channels": True}, "1 channel (PIL mode L), but data.in_chans=3"),
    (_unknown_class, {}, "its folder 'zebra' is not a class of the training split, so its label is out of range"),
]


@pytest.mark.parametrize("corrupt, overrides, message", BAD_IMAGES, ids=lambda v: getattr(v, "__name__", ""))
def test_imagefolder_bad_image_is_named_or_skipped_and_counted(tmp_path, corrupt, overrides, message):
    write_image_tree(tmp_path, train={"cat": 2, "dog": 2}, val={"cat": 1, "dog": 1})
    path = corrupt(tmp_path)
    with pytest.raises(BadDataError) as raised:
        _imagefolder(tmp_path, num_classes=2, **overrides)
    assert str(raised.value).startswith(f"{path}: ") and message in str(raised.value)
    assert "data.on_bad_file=skip" in str(raised.value)

    bundle = _imagefolder(tmp_path, num_classes=2, on_bad_file="skip", **overrides)
    assert bundle.skipped == 1 and bundle.skipped_reasons[0].startswith(f"{path}: ")
    assert (len(bundle.train), len(bundle.test)) == (4, 2)
    assert all(sample_path != str(path) for sample_path, _ in bundle.train.samples + bundle.test.samples)


def test_imagefolder_converts_channels_unless_strict(tmp_path):
    write_image_tree(tmp_path, train={"cat": 2, "dog": 2}, val={"cat": 1, "dog": 1})
    _grayscale(tmp_path)
    bundle = _imagefolder(tmp_path, num_classes=2)
    assert bundle.skipped == 0 and all(image.shape == (3, 16, 16) for image, _ in bundle.test)


def test_imagefolder_damage_found_after_build_names_the_file_even_from_a_worker(tmp_path):
    write_image_tree(tmp_path, train={"cat": 2, "dog": 2}, val={"cat": 1, "dog": 1})
    path = _truncated(tmp_path)
    bundle = _imagefolder(tmp_path, num_classes=2, verify="header")  # header check: the truncation is not seen yet
    index = [sample_path for sample_path, _ in bundle.train.samples].index(str(path))
    with pytest.raises(BadDataError, match=f"^{path}: unreadable image .*data.verify=full"):
        bundle.train[index]
    assert str(path) in _error_from_worker(DataLoader(bundle.train, batch_size=len(bundle.train), num_workers=1))


def _error_from_worker(loader: DataLoader) -> str:
    batches = iter(loader)
    try:
        next(batches)
    except BadDataError as error:
        return str(error)
    finally:
        # The error's traceback holds the iterator in a reference cycle; stopping the worker from the
        # garbage collector instead would wait out DataLoader's 5 s status-check timeout.
        batches._shutdown_workers()
    raise AssertionError("the worker loaded a damaged image without error")


# ----------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_sized_by_config():
    cfg = data_config("synthetic", img_size=6, in_chans=2, num_classes=3, train_size=20, test_size=5, seed=0)
    bundle, again = build_datasets(cfg, "/nonexistent"), build_datasets(cfg, "/nonexistent")
    assert (len(bundle.train), len(bundle.test)) == (20, 5)
    assert (bundle.in_chans, bundle.img_size, bundle.num_classes) == (2, 6, 3)
    image, label = bundle.train[7]
    assert image.shape == (2, 6, 6) and 0 <= label < 3
    assert torch.equal(again.train[7][0], image) and torch.equal(bundle.train[7][0], image)
    assert not torch.equal(bundle.test[0][0], bundle.train[0][0])
    other = build_datasets(data_config("synthetic", seed=1), "/nonexistent")
    assert not torch.equal(other.train[0][0], build_datasets(data_config("synthetic"), "/nonexistent").train[0][0])


def test_synthetic_class_signal_is_learnable():
    bundle = build_datasets(data_config("synthetic", img_size=8, train_size=300, test_size=200), "/nonexistent")

    def stack(dataset):
        images, labels = zip(*(dataset[i] for i in range(len(dataset))))
        return torch.stack(images).flatten(1), torch.tensor(labels)

    train_x, train_y = stack(bundle.train)
    test_x, test_y = stack(bundle.test)
    centroids = torch.stack([train_x[train_y == c].mean(0) for c in range(bundle.num_classes)])
    accuracy = (torch.cdist(test_x, centroids).argmin(1) == test_y).float().mean().item()
    assert accuracy > 0.9  # nearest class mean; chance is 0.1


# ----------------------------------------------------------------------------- the validation split


def test_validation_is_held_out_of_train_disjoint_and_fixed_by_split_seed_alone(digits):
    train, val = set(digits.train.indices), set(digits.val.indices)
    assert not train & val and len(train | val) == 1437  # together: every non-test image, each once
    torch.manual_seed(99)  # the run's seed plays no part
    assert build_datasets(data_config("digits"), "/nonexistent").val.indices == digits.val.indices


def test_the_cifar_validation_images_are_drawn_by_split_seed_from_the_same_training_files(tmp_path):
    """CIFAR's test split is its own file, so only data.split_seed can change which training images validate: the
    same seed draws the same ones, another seed others, from the same 20 training images."""
    write_cifar(tmp_path, "cifar10", per_file=4)  # 20 training images

    def held_out(split_seed):
        cfg = data_config("cifar10", root=str(tmp_path), val_size=5, split_seed=split_seed)
        bundle = build_datasets(cfg, "/nonexistent")
        assert sorted(bundle.train.indices + bundle.val.indices) == list(range(20))
        return bundle.val.indices

    assert held_out(0) == held_out(0) and held_out(1) == held_out(1) and held_out(0) != held_out(1)


def test_validation_images_are_never_augmented():
    augmented = build_datasets(data_config("digits", augment=True), "/nonexistent")
    plain_images = augmented.train.dataset.images
    for position in range(10):
        image, _ = augmented.val[position]
        assert torch.equal(image, plain_images[augmented.val.indices[position]])
    assert augmented.train.dataset.transform is not None and augmented.val.dataset.transform is None


def test_val_size_zero_means_no_validation_split_and_a_fraction_means_a_share():
    none = build_datasets(data_config("digits", val_size=0), "/nonexistent")
    assert none.val is None and len(none.train) == 1437
    share = build_datasets(data_config("digits", val_size=0.25), "/nonexistent")
    assert (len(share.train), len(share.val)) == (1078, 359)
    tenth = build_datasets(data_config("digits", val_size=0.1), "/nonexistent")
    assert (len(tenth.train), len(tenth.val)) == (1293, 144)  # 143.7 rounds to 144


def test_cifar_validation_comes_from_the_training_files_with_the_evaluation_transform(tmp_path):
    written = write_cifar(tmp_path, "cifar10", per_file=4)  # 20 training images
    bundle = build_datasets(data_config("cifar10", root=str(tmp_path), val_size=5), "/nonexistent")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 5, len(written["test"][1]))
    assert not set(bundle.train.indices) & set(bundle.val.indices)
    images, labels = written["train"]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (CheckedCIFAR10.mean, CheckedCIFAR10.std))
    for position, index in enumerate(bundle.val.indices):  # the stored pixels, not augmented (augment=true)
        image, label = bundle.val[position]
        expected = (torch.from_numpy(images[index]).view(3, 32, 32).float() / 255 - mean) / std
        assert label == labels[index] and torch.allclose(image, expected, atol=1e-5)


def test_imagefolder_tests_on_val_and_validates_on_a_share_of_train(tmp_path):
    write_image_tree(tmp_path, train={"a": 5, "b": 5, "c": 5}, val={"a": 1, "b": 1, "c": 1})
    bundle = _imagefolder(tmp_path, val_size=0.2)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (12, 3, 3)
    assert str(tmp_path / "val") in bundle.test.root and str(tmp_path / "train") in bundle.val.dataset.root
    assert sorted(bundle.val.dataset.targets[i] for i in bundle.val.indices) == [0, 1, 2]  # stratified


def test_synthetic_generates_its_validation_split():
    cfg = data_config("synthetic", img_size=4, train_size=16, val_size=8, test_size=4)
    bundle = build_datasets(cfg, "/nonexistent")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (16, 8, 4)
    assert not torch.equal(bundle.val[0][0], bundle.train[0][0])
    assert not any(torch.equal(bundle.val[i][0], bundle.test[i][0]) for i in range(4))  # never the test images
    # each split draws its own labels too: one shared sequence would give image i the same class in every split
    labels = {split: [getattr(bundle, split)[i][1] for i in range(4)] for split in ("train", "val", "test")}
    assert len({tuple(sequence) for sequence in labels.values()}) == 3, labels
    assert build_datasets(data_config("synthetic", val_size=0), "/nonexistent").val is None


@pytest.mark.parametrize(
    "name, val_size, message",
    [
        ("digits", -1, "data.val_size=-1: must be a count of training examples to hold out"),
        ("digits", 1.5, "data.val_size=1.5: must be a count of training examples to hold out"),
        ("digits", "all", "data.val_size=all: must be a count"),
        ("digits", 1437, "data.val_size=1437: must leave training examples: data=digits has 1437"),
        ("cifar10", 50_000, "data.val_size=50000: must leave training examples: data=cifar10 has 50000"),
        ("fashion_mnist", 1.0, "data.val_size=1.0: must be a count"),
    ],
)
def test_bad_val_size_is_one_line_naming_it(name, val_size, message):
    with pytest.raises(ValueError) as raised:
        check_data_config(data_config(name, val_size=val_size))
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_a_val_size_the_files_cannot_hold_is_named_when_they_are_counted(tmp_path):
    write_image_tree(tmp_path, train={"a": 2, "b": 2}, val={"a": 1, "b": 1})
    all_held_out = r"^data.val_size=4: holds out 4 of the 4 training examples of data=imagefolder"
    with pytest.raises(BadDataError, match=all_held_out):
        _imagefolder(tmp_path, val_size=4)


# ----------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False], ids=["gzipped", "plain"])
def test_fashion_mnist_reads_idx_files_from_data_root(tmp_path, gz):
    written = write_fashion_mnist(tmp_path, gz=gz)
    bundle = build_datasets(data_config("fashion_mnist", root=str(tmp_path), val_size=10), "/nonexistent")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (30, 10, 20)
    assert (bundle.num_classes, bundle.in_chans, bundle.img_size) == (10, 1, 28)
    images, labels = written["test"]
    for index in (0, 7, 19):
        image, label = bundle.test[index]
        expected = (torch.from_numpy(images[index]).float() / 255 - fashion_mnist.MEAN) / fashion_mnist.STD
        assert label == labels[index] and image.shape == (1, 28, 28) and torch.allclose(image[0], expected)


def test_fashion_mnist_finds_torchvisions_layout_under_the_data_dir_then_debians(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "fashion_mnist" / "FashionMNIST" / "raw", gz=False)
    assert len(build_datasets(data_config("fashion_mnist", val_size=0), str(tmp_path)).train) == 40
    debian = tmp_path / "usr-share-datasets-fashion-mnist"
    write_fashion_mnist(debian, sizes=(("train", 30), ("test", 10)))
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", debian)  # where apt-get install dataset-fashion-mnist puts them
    assert len(build_datasets(data_config("fashion_mnist", val_size=0), str(tmp_path / "empty")).test) == 10
    # an explicit data.root never falls back to Debian's copy, so the error does not advise it, nor to set data.root
    # (was: "Install them with `apt-get install dataset-fashion-mnist`, ..., or set data.root.")
    empty = tmp_path / "empty"
    with pytest.raises(MissingDataError) as raised:
        build_datasets(data_config("fashion_mnist", root=str(empty)), "/nonexistent")
    assert str(raised.value) == (
        f"data=fashion_mnist data.root={empty}: the four IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz) are not in {empty} or "
        f"{empty / 'FashionMNIST' / 'raw'}. Put them there, fetch them with data.download=true, or set data.root to "
        "the folder that holds them.")
    monkeypatch.setattr(fashion_mnist, "DEBIAN_DIR", tmp_path / "no-debian-copy")  # data.root unset: searched
    with pytest.raises(MissingDataError, match="Install them with `apt-get install dataset-fashion-mnist`, fetch "
                                               "them with data.download=true, or set data.root to a folder holding"):
        build_datasets(data_config("fashion_mnist"), str(empty))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _wrong_magic(path: Path) -> None:
    path.write_bytes(b"\x00\x00\x08\x01" + path.read_bytes()[4:])


@pytest.mark.parametrize(
    "damage, file, message",
    [
        (Path.unlink, "t10k-labels-idx1-ubyte", "are not in"),
        (_truncate, "train-images-idx3-ubyte", "truncated: 31260 data bytes, its header [40, 28, 28] says 31360"),
        (_wrong_magic, "t10k-images-idx3-ubyte", "magic number 0x00000801, expected 0x00000803"),
    ],
    ids=["missing", "truncated", "wrong magic"],
)
def test_fashion_mnist_bad_files_are_named_in_one_line(tmp_path, damage, file, message):
    write_fashion_mnist(tmp_path, gz=False)
    damage(tmp_path / file)
    with pytest.raises((BadDataError, MissingDataError)) as raised:
        build_datasets(data_config("fashion_mnist", root=str(tmp_path)), "/nonexistent")
    text = str(raised.value)
    assert message in text and "\n" not in text
    if damage is not Path.unlink:
        assert text.startswith(f"{tmp_path / file}: ")


def test_fashion_mnist_label_out_of_range_is_named_or_skipped(tmp_path):
    write_fashion_mnist(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[8 + 3] = 12  # image 3's label
    labels.write_bytes(bytes(data))
    with pytest.raises(BadDataError, match=rf"^{labels}: label 12 of image 3 is outside 0..9"):
        build_datasets(data_config("fashion_mnist", root=str(tmp_path)), "/nonexistent")
    cfg = data_config("fashion_mnist", root=str(tmp_path), on_bad_file="skip", val_size=0)
    bundle = build_datasets(cfg, "/nonexistent")
    assert bundle.skipped == 1 and len(bundle.train) == 39


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_a_download_without_network_fails_in_one_line_and_leaves_no_empty_folder(tmp_path, name):
    root = tmp_path / "data" / name  # torchvision makes its folders before it fails
    with pytest.raises(MissingDataError) as raised:  # torchvision's real download; this machine has no network
        build_datasets(data_config(name, root=str(root), download=True), "/nonexistent")
    text = str(raised.value)
    assert text.startswith(f"data={name}: the download into {root}") and "failed" in text and "\n" not in text
    assert "by hand" in text or "extract it there" in text
    assert "apt-get" not in text  # data.root is set: Debian's copy would not be searched
    assert list(tmp_path.iterdir()) == []  # not even data/<name>/FashionMNIST/raw


def test_the_log_names_the_folder_the_data_was_read_from(tmp_path, caplog):
    folder = tmp_path / "fashion" / "FashionMNIST" / "raw"
    write_fashion_mnist(folder)
    with caplog.at_level(logging.INFO, logger="softmoe.harness.data"):
        build_datasets(data_config("fashion_mnist", root=str(tmp_path / "fashion"), val_size=10), "/nonexistent")
    assert f"data=fashion_mnist: read from {folder}" in caplog.messages


def test_fashion_mnist_train_subset_keeps_the_same_stratified_images_whatever_the_run_seed(tmp_path):
    write_fashion_mnist(tmp_path, gz=False)  # 40 train images, 4 per class
    cfg = data_config("fashion_mnist", root=str(tmp_path), train_subset=20, val_size=10)
    assert dataset_size(cfg, "train") == 10 and dataset_size(cfg, "val") == 10
    first, again = (build_datasets(cfg, "/nonexistent") for _ in range(2))
    assert len(first.train) == 10 and len(first.val) == 10
    kept = first.train_eval.dataset  # the subset's 20 images, which train and val index into
    assert len(kept) == 20 and torch.equal(kept.images, again.train_eval.dataset.images)
    assert torch.bincount(kept.labels).tolist() == [2] * 10  # stratified: 2 of each class
    with pytest.raises(ValueError, match=r"data.train_subset=60001: must be null \(all 60,000 training images\)"):
        check_data_config(data_config("fashion_mnist", train_subset=60001))
    with pytest.raises(ValueError, match="data.val_size=20: must leave training examples"):
        check_data_config(data_config("fashion_mnist", train_subset=20, val_size=20))


def test_a_class_of_one_example_holds_out_by_a_plain_draw_not_stratified():
    """scikit-learn's stratified split refuses a class of one example; the hold-out then draws without strata."""
    from softmoe.harness.data.splits import hold_out

    labels = [0] * 10 + [1] * 9 + [2]  # class 2: one example
    train, val = hold_out(labels, count=5, split_seed=0)
    assert len(val) == 5 and sorted([*train, *val]) == list(range(20))
    again = hold_out(labels, count=5, split_seed=0)
    assert [list(part) for part in again] == [list(train), list(val)]  # the same draw for the same split_seed


LABEL_SETS = {  # each with classes of unequal size, so the rounding of shares (and its tie-break draws) matters
    "digits": None,  # the 1,797 labels, filled in below
    "three classes, tied remainders": np.array([0] * 7 + [1] * 7 + [2] * 7),
    "uneven": np.array([0] * 3 + [1] * 11 + [2] * 5 + [3] * 2 + [4] * 8),
    "unsorted strings": np.array(list("cabbacbbcaabcbbacb")),
}


@pytest.mark.parametrize("name", LABEL_SETS)
def test_the_split_draws_are_scikit_learns_train_test_split_index_for_index(name):
    """Every figure rests on the split scikit-learn's ``train_test_split`` draws; we draw it without importing
    scikit-learn, so compare the two over seeds and sizes, stratified and plain, order included."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    from softmoe.harness.data.split_draws import train_test_indices

    labels = load_digits().target if LABEL_SETS[name] is None else LABEL_SETS[name]
    classes = len(set(labels.tolist()))
    for test_count in sorted({classes, classes + 1, len(labels) // 3, len(labels) // 2, len(labels) - classes}):
        for seed in range(6):
            for stratify in (True, False):
                expected = train_test_split(np.arange(len(labels)), test_size=test_count, random_state=seed,
                                            stratify=labels if stratify else None)
                drawn = train_test_indices(labels, test_count, seed, stratify)
                assert all(np.array_equal(a, b) for a, b in zip(drawn, expected)), (test_count, seed, stratify)


def test_the_digits_are_read_as_load_digits_reads_them_also_from_scikit_learns_own_loader(monkeypatch, tmp_path):
    from sklearn.datasets import load_digits

    from softmoe.harness.data import digits

    expected = load_digits()
    images, labels = digits.load_digits_arrays()
    assert digits.digits_file().is_file()  # read by path, not through scikit-learn's import
    assert np.array_equal(images, expected.images) and np.array_equal(labels, expected.target)
    monkeypatch.setattr(digits, "digits_file", lambda: tmp_path / "moved.csv.gz")  # a scikit-learn that moved it
    images, labels = digits.load_digits_arrays()
    assert np.array_equal(images, expected.images) and np.array_equal(labels, expected.target)
