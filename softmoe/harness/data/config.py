"""The rules of the ``data`` config group: which keys each dataset takes and which values they allow.

Default values live in one place, ``conf/data/<name>.yaml``; this module only checks them, so a
typo'd override stops with one line naming the key before anything is loaded.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from ..errors import ConfigError
from ..rules import (
    Rule,
    boolean,
    check_known,
    check_section,
    format_value,
    is_int,
    is_number,
    non_negative_int,
    non_negative_number,
    one_of,
    plain,
    positive_int,
    seed_value,
)

DATASETS = ("digits", "cifar10", "cifar100", "fashion_mnist", "imagefolder", "synthetic")

DIGITS_EXAMPLES = 1797  # sklearn.datasets.load_digits
CIFAR_EXAMPLES = {"train": 50_000, "test": 10_000}  # the same for CIFAR-10 and CIFAR-100
OFFICIAL_SIZES = {
    "cifar10": CIFAR_EXAMPLES,
    "cifar100": CIFAR_EXAMPLES,
    "fashion_mnist": {"train": 60_000, "test": 10_000},
}
SPLITS = ("train", "val", "test")

def optional_path(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    if value is None or (isinstance(value, str) and value):
        return None
    return "must be a directory path, or null for <paths.data_dir>/<data.name>"


def exactly(expected: int, why: str) -> Rule:
    def rule(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
        return None if is_int(value) and value == expected else f"must be {expected} for data={cfg['name']} ({why})"

    return rule


def digits_test_size(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    low, high = 10, DIGITS_EXAMPLES - 10  # a stratified split needs every class in both splits
    return None if is_int(value) and low <= value <= high else f"must be an integer from {low} to {high}"


def validation_size(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """``data.val_size``: a count of training examples to hold out, or a fraction of them; 0 turns validation off."""
    allowed = (
        "must be a count of training examples to hold out (an integer >= 0; 0: no validation split) "
        "or a fraction in (0, 1)"
    )
    if isinstance(value, float):
        return None if math.isfinite(value) and 0 < value < 1 else allowed
    if not is_int(value) or value < 0:
        return allowed
    train = _train_examples(cfg)
    if train is not None and value >= train:
        return f"must leave training examples: data={cfg['name']} has {train} to hold them out of"
    return None


def fashion_train_subset(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    full = OFFICIAL_SIZES["fashion_mnist"]["train"]
    ok = value is None or (is_int(value) and 0 < value <= full)
    return None if ok else f"must be null (all {full:,} training images) or a count from 1 to {full}"


def crop_fraction(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_number(value) and 0 < value <= 1 else "must be a number in (0, 1]"


def per_channel(positive: bool) -> Rule:
    def rule(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
        if (
            isinstance(value, (list, tuple))
            and len(value) == cfg["in_chans"]
            and all(is_number(v) and (v > 0 or not positive) for v in value)
        ):
            return None
        kind = "positive numbers" if positive else "numbers"
        return f"must be a list of {cfg['in_chans']} {kind}, one per channel (data.in_chans={cfg['in_chans']})"

    return rule


def example_indices(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    ok = isinstance(value, (list, tuple)) and all(is_int(v) and v >= 0 for v in value)
    return None if ok else "must be a list of example indices (integers >= 0), e.g. [] or [3,17]"


def image_channels(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    return None if is_int(value) and value in (1, 3) else "must be 1 (grayscale) or 3 (RGB)"


def auto_augment_policy(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    if value is None:
        return None
    from timm.data import create_transform

    try:  # timm parses the policy string when it builds the transform; nothing is loaded
        create_transform(16, is_training=True, auto_augment=value)
    except Exception:
        return "must be null or a timm auto-augment policy, e.g. rand-m9-mstd0.5-inc1, augmix, original"
    return None


def _cifar_rules(num_classes: int) -> dict[str, Rule]:
    return {
        "root": optional_path,
        "download": boolean,
        "img_size": positive_int,
        "in_chans": exactly(3, "CIFAR images are RGB"),
        "num_classes": exactly(num_classes, f"CIFAR-{num_classes} has {num_classes} classes"),
        "augment": boolean,
        "val_size": validation_size,
        "split_seed": seed_value,
        "on_bad_file": one_of("error", "skip"),
    }


# Every key of conf/data/<name>.yaml besides `name`, in checking order (in_chans before the per-channel lists).
RULES: dict[str, dict[str, Rule]] = {
    "digits": {
        "img_size": exactly(8, "the digits are 8x8 pixels"),
        "in_chans": exactly(1, "the digits are grayscale"),
        "num_classes": exactly(10, "the digits are 0-9"),
        "test_size": digits_test_size,
        "val_size": validation_size,
        "split_seed": seed_value,
        "augment": boolean,
    },
    "cifar10": _cifar_rules(10),
    "cifar100": _cifar_rules(100),
    "fashion_mnist": {
        "root": optional_path,
        "download": boolean,
        "train_subset": fashion_train_subset,  # before val_size, which checks against it
        "img_size": exactly(28, "Fashion-MNIST images are 28x28 pixels"),
        "in_chans": exactly(1, "Fashion-MNIST images are grayscale"),
        "num_classes": exactly(10, "Fashion-MNIST has 10 classes"),
        "augment": boolean,
        "val_size": validation_size,
        "split_seed": seed_value,
        "on_bad_file": one_of("error", "skip"),
    },
    "imagefolder": {
        "root": optional_path,
        "img_size": positive_int,
        "in_chans": image_channels,
        "num_classes": positive_int,
        "augment": boolean,
        "auto_augment": auto_augment_policy,
        "crop_pct": crop_fraction,
        "mean": per_channel(positive=False),
        "std": per_channel(positive=True),
        "val_size": validation_size,
        "split_seed": seed_value,
        "verify": one_of("full", "header", "none"),
        "strict_channels": boolean,
        "on_bad_file": one_of("error", "skip"),
    },
    "synthetic": {
        "img_size": positive_int,
        "in_chans": positive_int,
        "num_classes": positive_int,
        "train_size": positive_int,
        "test_size": positive_int,
        "val_size": non_negative_int,
        "seed": non_negative_int,
        "signal": non_negative_number,
        "nan_examples": example_indices,
    },
}
assert tuple(RULES) == DATASETS


def checked_config(data_cfg: Any) -> dict[str, Any]:
    """``data_cfg`` as a plain dict, after every check of :func:`check_data_config`."""
    cfg = plain(data_cfg, "data")
    name = cfg.get("name")
    if name not in DATASETS:
        raise ConfigError(f"data.name={format_value(name)}: must be one of {', '.join(DATASETS)} (conf/data/*.yaml)")
    rules = RULES[name]
    check_known("data", cfg, {"name", *rules}, f"not a key of data={name}; its keys are {', '.join(rules)}")
    check_section("data", cfg, rules, required=f"data={name} needs every key of conf/data/{name}.yaml")
    return cfg


def check_data_config(data_cfg: Any) -> None:
    """Raise ``ConfigError('data.<key>=<value>: <what is allowed>')`` for a bad key or value; loads nothing."""
    checked_config(data_cfg)


def _train_examples(cfg: Mapping[str, Any]) -> Optional[int]:
    """The training examples before the validation split is held out, when known without loading."""
    name = cfg["name"]
    if name == "digits":
        return DIGITS_EXAMPLES - cfg["test_size"] if is_int(cfg.get("test_size")) else None
    if name in OFFICIAL_SIZES:
        return cfg.get("train_subset") or OFFICIAL_SIZES[name]["train"]
    return None


def dataset_size(data_cfg: Any, split: str) -> Optional[int]:
    """Number of examples in ``split`` ('train', 'val' or 'test') when known without loading, else None.

    'train' counts what the model trains on, after the validation split is held out. CIFAR and
    Fashion-MNIST have official sizes; ImageFolder trees are only counted by scanning.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: must be one of {', '.join(SPLITS)}")
    cfg = checked_config(data_cfg)
    name = cfg["name"]
    if name == "synthetic":
        return cfg[f"{split}_size"]
    if name == "digits":
        test = cfg["test_size"]
    elif name in OFFICIAL_SIZES:
        test = OFFICIAL_SIZES[name]["test"]
    else:
        return None
    if split == "test":
        return test
    from .splits import validation_count

    val = validation_count(cfg["val_size"], _train_examples(cfg))
    return val if split == "val" else _train_examples(cfg) - val
