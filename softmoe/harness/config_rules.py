"""What each key of a run config may hold: one :mod:`.rules` rule per key, a table per config group.

:mod:`.config` checks a composed config against these tables (and checks the keys that depend on each other);
the ``data`` group has its own (:mod:`.data.config`).
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from softmoe.layer import COMBINE_CHOICES, DISPATCH_CHOICES

from .losses import LOSSES
from .model import PLACEMENTS, ROUTERS, VIT_ARGUMENTS
from .resume import existing_checkpoint, resumable_checkpoint
from .rules import (
    Rule,
    auto_or_boolean,
    boolean,
    counted,
    is_int,
    is_number,
    non_negative_int,
    non_negative_number,
    number_in,
    one_of,
    optional,
    positive_int,
    positive_number,
    share,
    text,
    texts,
)
from .vit_arguments import vit_argument_rules


def block_list(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    ok = isinstance(value, list) and all(is_int(v) for v in value)
    return None if ok else "must be a list of 0-indexed block numbers, e.g. [8,9,10,11]"


def device_spelling(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """A device name, whether or not this machine has that device (``python -m softmoe.plan`` plans for another)."""
    kind, _, index = value.partition(":") if isinstance(value, str) else ("", "", "")
    ok = value in ("auto", "cpu", "mps") or (kind == "cuda" and (not index or index.isdigit()))
    return None if ok else "must be auto, cpu, cuda, cuda:<index> or mps"


def device_name(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """A device name this machine has."""
    problem = device_spelling(value, cfg)
    if problem is not None or value in ("auto", "cpu"):
        return problem
    if value == "mps":
        return None if torch.backends.mps.is_available() else "MPS is not available on this machine; use auto or cpu"
    _, _, index = value.partition(":")
    if not torch.cuda.is_available():
        return "CUDA is not available on this machine; use auto or cpu"
    if index and int(index) >= torch.cuda.device_count():
        return f"this machine has {counted(torch.cuda.device_count(), 'CUDA device')}"
    return None


def betas(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(is_number(b) and 0 <= b < 1 for b in value)
    if ok:
        return None
    # the value echoed before this reads [0.9,0.99] for a string item too (an interpolation's result): name it
    text = [b for b in value if isinstance(b, str)] if isinstance(value, (list, tuple)) else []
    text_note = f" ({text[0]!r} is a string)" if text else ""
    return f"must be two numbers in [0, 1), e.g. [0.9,0.999]{text_note}"


def jobs_at_once(value: Any, cfg: Mapping[str, Any]) -> Optional[str]:
    """joblib's ``n_jobs``: a count of jobs, or negative for every core but ``-1 - n_jobs`` (0 means nothing)."""
    return None if is_int(value) and value != 0 else "must be an integer other than 0 (-1: every core)"


MODEL_RULES: dict[str, Rule] = {
    "name": text,
    "img_size": positive_int,
    "in_chans": positive_int,
    "num_classes": positive_int,
    "patch_size": positive_int,
    "embed_dim": positive_int,
    "depth": positive_int,
    "num_heads": positive_int,
    "mlp_ratio": positive_number,
    "class_token": boolean,
    "global_pool": one_of("avg", "token", "max", "avgmax", "map"),
    "qk_norm": boolean,
    "drop_path_rate": number_in(0, 1, high_open=True),
    "upcycle_from": optional(existing_checkpoint),
    "upcycle_noise_std": non_negative_number,
}
MOE_RULES: dict[str, Rule] = {
    "placement": one_of(*PLACEMENTS),
    "layers": optional(block_list),
    "num_experts": positive_int,
    "slots_per_expert": positive_int,
    "normalize": boolean,
    "scale_init": positive_number,
    "router_lr_mult": positive_number,
    "router_weight_decay": optional(non_negative_number),
    "phi_weight_decay": optional(non_negative_number),
    "router": one_of(*ROUTERS),
    "dispatch": one_of(*DISPATCH_CHOICES),
    "combine": one_of(*COMBINE_CHOICES),
    "k": positive_int,
    "capacity_factor": optional(positive_number),
    "batch_priority": boolean,
    "noise_std": non_negative_number,
    "aux_loss_weight": non_negative_number,
    "expert_parallel": boolean,
}
TRAINER_RULES: dict[str, Rule] = {
    "max_epochs": positive_int,
    "max_steps": optional(positive_int),
    "batch_size": positive_int,
    "eval_batch_size": positive_int,
    "eval_batches": optional(positive_int),
    "label_smoothing": number_in(0, 1, high_open=True),
    "loss": one_of(*LOSSES),
    "grad_clip_norm": optional(positive_number),
    "precision": one_of("fp32", "bf16", "fp16"),
    "compile": boolean,
    "device": device_name,
    "num_threads": optional(positive_int),
    "num_workers": non_negative_int,
    "data_on_device": auto_or_boolean,
    "cuda_memory_fraction": optional(share),
    "log_every": positive_int,
    "checkpoint_every": optional(positive_int),
    "progress_bar": boolean,
    "resume": resumable_checkpoint,  # says null itself, as its own sentence
    "strategy": one_of("auto", "single", "ddp", "fsdp"),
    "reshard_after_forward": boolean,
    "activation_checkpointing": boolean,
    "init_device": one_of("cpu", "meta"),
    "expert_parallel_size": optional(positive_int),
    "nonfinite": one_of("skip", "stop"),
    "max_nonfinite_skips": positive_int,
    "max_tokens_per_image": optional(positive_int),
}
# Only the keys present are checked: each optimizer and schedule takes its own (the rest are its arguments).
OPTIMIZER_RULES: dict[str, Rule] = {
    "lr": positive_number,
    "weight_decay": non_negative_number,
    "head_weight_decay": optional(non_negative_number),
    "betas": betas,
    "momentum": number_in(0, 1, high_open=True),
    "nesterov": boolean,
    "fused": optional(boolean),
    "eps": positive_number,
    "state_dtype": one_of("float32", "bfloat16"),
    "rounding": one_of("stochastic", "nearest"),
    "compile": boolean,
    "write_expert_copies": boolean,
}
SCHEDULER_RULES: dict[str, Rule] = {
    "warmup_steps": non_negative_int,
    "cooldown_steps": non_negative_int,
    "timescale": optional(positive_int),
    "min_lr_ratio": number_in(0, 1),
}
LOGGER_RULES: dict[str, Rule] = {
    "backend": one_of("wandb", "none"),
    "mode": one_of("auto", "online", "offline", "disabled"),
    "project": text,
    "entity": optional(text),
    "group": optional(text),
    "name": optional(text),
    "tags": texts,
    "log_images": boolean,
}
PATHS_RULES: dict[str, Rule] = {"data_dir": text, "output_dir": text}
VIT_ARGUMENT_RULES = vit_argument_rules(VIT_ARGUMENTS, MODEL_RULES)
# Only the keys present: each launcher (conf/launcher/*.yaml) takes its own, which Hydra's launcher reads.
LAUNCHER_RULES: dict[str, Rule] = {
    "name": one_of("basic", "joblib", "submitit_local", "slurm"),
    "n_jobs": jobs_at_once,
    "partition": optional(text),
    "account": optional(text),
    "qos": optional(text),
    "time_min": positive_int,
    "nodes": positive_int,
    "gpus_per_node": positive_int,
    "cpus_per_task": positive_int,
    "mem_gb": positive_int,
    "max_requeues": non_negative_int,
}
# python -m softmoe.evaluate's own arguments (conf/evaluate.yaml), top-level keys
EVALUATE_RULES: dict[str, Rule] = {
    "checkpoint": one_of("best", "last"),
    "device": device_name,
    "batch_size": optional(positive_int),
    "images": one_of("run", "all"),
    "data_dir": optional(text),
    "data_root": optional(text),
    "save_routing": boolean,
    "routing_examples": positive_int,
}
