"""Checks for a config that is valid, key by key, but not what its user meant.

- A token count that hangs a CPU: ``data=imagefolder`` (224 px) with the default ``vit_micro`` (patch 2) makes
  12,544 tokens per image; one step did not finish in 12 minutes and took 16 GB. :func:`check_token_count` refuses
  more than ``trainer.max_tokens_per_image`` before any data loads (null lifts the limit, on purpose).
- A ``model.name`` that no ``conf/model/*.yaml`` has: ``model.name=vit_mega`` trained ``vit_micro`` and printed
  ``model: vit_mega``. The model is picked with ``model=<option>``; :func:`check_model_name` refuses the rest, and
  :func:`check_model_choice` (the train command, which knows Hydra's choice) another option's name.
- Slots that hang a CPU the same way: ``moe.slots_per_expert=1000`` (16,000 slots for 16 tokens) ran out of
  memory at the first step; :func:`check_slot_count` holds slots per image to the same limit.
- A split too small to mean anything: ``data.val_size=0.01`` of 80 images is one validation image.
  :func:`warn_small_splits` says so in one line.
- Parallel jobs that take turns on the cores: ``launcher=joblib launcher.n_jobs=8`` on 2 cores (or ``n_jobs=2`` with
  ``trainer.num_threads=2``); :func:`threads_warning` says so once for the sweep, with the value to use.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from .errors import ConfigError
from .model import moe_blocks, num_tokens
from .rules import counted, format_value

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/ (absent from a wheel)
SMALL_SPLIT = 20  # fewer examples and one example moves the accuracy by more than 5 points


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of a config group: the names of ``conf/<group>/*.yaml``."""
    return sorted(path.stem for path in (conf_dir / group).glob("*.yaml"))


def group_setting(group: str, target: Any, conf_dir: Path = CONF_DIR) -> str:
    """How a user sets the ``_target_`` of a config group: ``optimizer=sgd``, the option whose file names it, or
    ``optimizer._target_=<target>`` where no option does (a target set by hand)."""
    for option in group_options(group, conf_dir):
        if yaml.safe_load((conf_dir / group / f"{option}.yaml").read_text()).get("_target_") == target:
            return f"{group}={option}"
    return f"{group}._target_={format_value(target)}"


def check_model_name(model: Mapping[str, Any], conf_dir: Path = CONF_DIR) -> None:
    """``model.name`` must be an option of the ``model`` group: it labels the run, it does not pick the model."""
    options = group_options("model", conf_dir)
    if options and model["name"] not in options:
        raise ConfigError(
            f"model.name={format_value(model['name'])}: not a model; must be one of {', '.join(options)} "
            f"(pick one with model=<name>, e.g. model={options[0]}; model.name only labels it)"
        )


def check_model_choice(name: Any, chosen: Optional[str]) -> None:
    """``model.name`` must be the ``model`` option Hydra composed (``chosen``; None: not known here):
    ``model.name=vit_small`` over the default ``model=vit_micro`` trained vit_micro and labelled it vit_small."""
    if chosen is not None and name is not None and name != chosen:
        raise ConfigError(
            f"model.name={format_value(name)}: labels the run, but model={chosen} builds it; pick the model with "
            f"model={name} (and leave model.name alone)"
        )


def check_token_count(model: Mapping[str, Any], max_tokens: Optional[int]) -> None:
    """Refuse a model whose blocks would see more than ``max_tokens`` tokens per image (None: no limit)."""
    tokens = num_tokens(model)
    if max_tokens is None or tokens <= max_tokens:
        return
    size, patch = model["img_size"], model["patch_size"]
    suggested_patch = next((p for p in (16, 8, 4) if size % p == 0 and num_tokens({**model, "patch_size": p})
                            <= max_tokens), None)
    instead = [f"model.patch_size={suggested_patch}"] if suggested_patch else []
    if size % 16 == 0:  # vit_small's patches (16 px) tile the image
        instead.append("model=vit_small")
    raise ConfigError(
        f"model.patch_size={patch}: data.img_size={size} makes ({size}/{patch})² + {tokens - (size // patch) ** 2} = "
        f"{tokens:,} tokens per image, more than trainer.max_tokens_per_image={max_tokens} (one step would take "
        f"minutes and gigabytes on a CPU); use {', '.join([*instead, 'a smaller data.img_size'])}, or lift the "
        f"limit with trainer.max_tokens_per_image=null"
    )


def check_slot_count(model: Mapping[str, Any], moe: Mapping[str, Any], max_tokens: Optional[int]) -> None:
    """Refuse a Soft MoE layer with more slots per image than ``max_tokens``: each slot is a vector the experts
    process, as a token is a vector a block processes (``moe.slots_per_expert=1000`` ran out of memory at the first
    step with no message)."""
    slots = moe["num_experts"] * moe["slots_per_expert"]
    if max_tokens is None or slots <= max_tokens or moe["router"] != "soft" or not moe_blocks(moe, model["depth"]):
        return
    key = "slots_per_expert" if moe["slots_per_expert"] > 1 else "num_experts"
    raise ConfigError(
        f"moe.{key}={moe[key]}: moe.num_experts x moe.slots_per_expert = {moe['num_experts']} x "
        f"{moe['slots_per_expert']} = {slots:,} slots per image for its {num_tokens(model):,} tokens, more than "
        f"trainer.max_tokens_per_image={max_tokens} (each slot is a vector every expert layer processes, as a "
        f"token is); use fewer, or lift the limit with trainer.max_tokens_per_image=null"
    )


def threads_warning(n_jobs: int, num_threads: Optional[int], jobs: Optional[int], cores: int) -> Optional[str]:
    """Why a joblib sweep's jobs would take turns on the cores, in one line, or None: ``n_jobs`` jobs at once (no more
    than the sweep's ``jobs``, when known; -1: one per core), each computing on ``trainer.num_threads`` threads. Null
    leaves torch's default, which in a joblib worker is cores // n_jobs, at least 1 (joblib sets OMP_NUM_THREADS
    there, unless this process has it set)."""
    at_once = n_jobs if n_jobs > 0 else max(cores + 1 + n_jobs, 1)
    at_once = min(at_once, jobs) if jobs else at_once
    threads = num_threads or int(os.environ.get("OMP_NUM_THREADS") or 0) or max(cores // at_once, 1)
    if at_once * threads <= cores:
        return None
    fix = (f"trainer.num_threads={cores // at_once} (cores / n_jobs, as conf/launcher/joblib.yaml advises)"
           if cores >= at_once else f"launcher.n_jobs={max(cores // threads, 1)}")
    return (f"launcher.n_jobs={n_jobs}{f' ({at_once} at once)' if at_once != n_jobs else ''} x trainer.num_threads="
            f"{format_value(num_threads)}{'' if num_threads else f' ({threads} each)'} = {at_once * threads} threads "
            f"at once on {cores} cores: "
            f"the jobs take turns on the cores, each slower than alone; use {fix}")


def warn_small_splits(data) -> None:
    """One warning per split too small for its accuracy to mean anything (``data``: a ``DataBundle``)."""
    for split, dataset in (("validation", data.val), ("test", data.test)):
        if dataset is not None and len(dataset) < SMALL_SPLIT:
            step = 100 / len(dataset)
            key = "data.val_size" if split == "validation" else "the test data"
            log.warning(
                "the %s split holds %s: its accuracy moves in steps of %.0f points, too coarse to mean "
                "anything; give it more (%s)", split, counted(len(dataset), "image"), step, key,
            )
