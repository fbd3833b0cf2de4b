"""Parameter groups, optimizers and learning-rate schedules from the ``optimizer`` and ``scheduler`` groups."""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any, Callable, Iterator, Optional

import torch
from hydra.utils import instantiate
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from softmoe import router_parameters

log = logging.getLogger(__name__)

# Parameters by name, not by shape: the experts' biases and norms are stacked 2-d tensors [n, h].
NO_DECAY_TOKENS = {"pos_embed", "cls_token", "reg_token", "dist_token", "mask_token"}


def decays(name: str) -> bool:
    """Whether weight decay applies to parameter ``name``: not to biases, norms, LayerScale, position embedding
    or tokens. The router's Φ (``phi``) and ``scale`` are decayed too, unless ``moe.router_weight_decay`` (both) or
    ``moe.phi_weight_decay`` (Φ alone) gives them their own (see :func:`param_groups`)."""
    parts = name.split(".")
    leaf = parts[-1]
    if leaf.endswith("bias") or leaf == "gamma" or leaf in NO_DECAY_TOKENS:
        return False
    return not any("norm" in part for part in parts)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr: float,
    router_lr_mult: float = 1.0,
    router_weight_decay: Optional[float] = None,
    phi_weight_decay: Optional[float] = None,
    head_weight_decay: Optional[float] = None,
) -> list[dict[str, Any]]:
    """``decay`` with ``weight_decay``, ``no_decay`` with none (see :func:`decays`), and, when the model has MoE
    layers, ``router``: their Φ and scale (:func:`softmoe.router_parameters`) at ``router_lr_mult * lr`` with
    ``router_weight_decay`` (None: ``weight_decay``). A ``phi_weight_decay`` other than that moves Φ to a group of
    its own, ``router_phi``: vmoe's Soft MoE decays the scale but not Φ (its ``mu`` matches none of its decay rules),
    which is ``phi_weight_decay=0``. None keeps Φ with the scale, one group, as every run before the option.
    ``head_weight_decay`` (None: ``weight_decay``) puts the classifier's weight (``head.weight``) in a group ``head``
    of its own: vmoe decays its head's kernel by 3.0 where every other kernel gets 0.03."""
    router_names = router_parameters(model)
    router_weight_decay = weight_decay if router_weight_decay is None else router_weight_decay
    phi_apart = phi_weight_decay is not None and phi_weight_decay != router_weight_decay
    group_of = {id(param): "router_phi" if phi_apart and name.endswith(".phi") else "router"
                for name, param in router_names.items()}
    if head_weight_decay is not None and isinstance(getattr(model, "head", None), nn.Linear):
        group_of[id(model.head.weight)] = "head"
    groups = {"decay": [], "no_decay": [], "router": [], "router_phi": [], "head": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[group_of.get(id(param)) or ("decay" if decays(name) else "no_decay")].append(param)
    result = [
        {"name": "decay", "params": groups["decay"], "weight_decay": weight_decay},
        {"name": "no_decay", "params": groups["no_decay"], "weight_decay": 0.0},
    ]
    for name, group_decay in (("router", router_weight_decay), ("router_phi", phi_weight_decay)):
        if groups[name]:
            result.append({"name": name, "params": groups[name], "lr": router_lr_mult * lr,
                           "weight_decay": group_decay})
    if groups["head"]:
        result.append({"name": "head", "params": groups["head"], "weight_decay": head_weight_decay})
    return result


# Keys of the optimizer group the harness reads itself; the rest are the optimizer's own arguments.
HARNESS_OPTIMIZER_KEYS = ("head_weight_decay",)


def optimizer_arguments(optimizer_cfg: Any) -> dict[str, Any]:
    """The ``optimizer`` group without the keys the harness reads itself: what its ``_target_`` is called with."""
    return {key: value for key, value in optimizer_cfg.items() if key not in HARNESS_OPTIMIZER_KEYS}


# The optimizers with a fused kernel that skips a step on a device-side flag (found_inf)
FUSED_OPTIMIZERS = (torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD)


def fused_by_default(optimizer_class: Any, device: torch.device) -> bool:
    """What ``optimizer.fused=null`` means: fused on a GPU, where one kernel per step is faster and lets the NaN/inf
    check run without a device sync per step (``faults.py``); PyTorch's own choice elsewhere (on a CPU its
    for-loop kernel, so CPU runs stay bit-identical to those measured before the option existed)."""
    return device.type == "cuda" and optimizer_class in FUSED_OPTIMIZERS


def build_optimizer(optimizer_cfg: Any, model: nn.Module, moe_cfg: Optional[Any] = None) -> torch.optim.Optimizer:
    """The ``optimizer`` group's optimizer over :func:`param_groups`, the router's taken from ``moe_cfg``."""
    arguments = optimizer_arguments(optimizer_cfg)
    if arguments.get("betas") is not None:  # [0, 0.999] from YAML holds an int, which torch's Adam refuses
        arguments["betas"] = [float(beta) for beta in arguments["betas"]]
    # a partial: lists become lists, not ListConfigs
    make = instantiate(arguments, _convert_="all")
    moe_cfg = moe_cfg or {}
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    choice = {}  # optimizer.fused=null (the key present, unset): this device's default
    if "fused" in optimizer_cfg and optimizer_cfg["fused"] is None:
        if fused_by_default(getattr(make, "func", None), device):
            choice["fused"] = True
    return make(
        param_groups(
            model,
            optimizer_cfg.get("weight_decay", 0.0),
            optimizer_cfg["lr"],
            router_lr_mult=moe_cfg.get("router_lr_mult", 1.0),
            router_weight_decay=moe_cfg.get("router_weight_decay"),
            phi_weight_decay=moe_cfg.get("phi_weight_decay"),
            head_weight_decay=optimizer_cfg.get("head_weight_decay"),
        ),
        **choice,
    )


# How a step is computed (one fused kernel, a loop over tensors, CUDA-graph safe): this run's choice, not state.
KERNEL_CHOICES = ("fused", "foreach", "capturable")


@contextlib.contextmanager
def keeping_kernel_choice(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Load a checkpoint's optimizer state inside this: ``load_state_dict`` takes every group setting from the
    checkpoint, ``fused`` and ``foreach`` included, so a run resumed with ``optimizer.fused=true`` from a
    checkpoint saved without it would silently step unfused. Puts back this run's choices, with the step counters
    where that kernel wants them (fused and capturable: on the parameters' device, as float32; else on the CPU)."""
    chosen = [{key: group[key] for key in KERNEL_CHOICES if key in group} for group in optimizer.param_groups]
    yield
    for group, choice in zip(optimizer.param_groups, chosen):
        group.update(choice)
        on_device = bool(group.get("fused") or group.get("capturable"))
        for parameter in group["params"]:
            state = optimizer.state.get(parameter, {})
            if torch.is_tensor(state.get("step")):
                device = parameter.device if on_device else torch.device("cpu")
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


def build_scheduler(scheduler_cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    return instantiate(scheduler_cfg, _convert_="all")(optimizer, total_steps=total_steps)


def _fit(key: str, steps: int, available: int) -> int:
    """``scheduler.<key>`` shortened to the ``available`` steps of a short run (a debug run, a quick test), with a
    warning."""
    if steps <= available:
        return steps
    log.warning(
        "scheduler.%s=%d is longer than this run allows (%d of its optimizer steps); using %d",
        key, steps, available, available,
    )
    return available


def _linear_warmup(step: int, warmup_steps: int) -> float:
    """1/warmup, 2/warmup, ..., 1 over the first ``warmup_steps`` steps (``step`` counts from 0)."""
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0


def _schedule(optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float]) -> LambdaLR:
    # A plain function is not saved in LambdaLR.state_dict, so a checkpoint holds only numbers.
    return LambdaLR(optimizer, multiplier)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, min_lr_ratio: float = 0.0
) -> LambdaLR:
    """Linear warmup to the optimizer's lr, then cosine decay to ``min_lr_ratio * lr`` at ``total_steps``."""
    warmup_steps = _fit("warmup_steps", warmup_steps, total_steps - 1)
    decay_steps = total_steps - warmup_steps

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return _linear_warmup(step, warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return _schedule(optimizer, multiplier)


def warmup_rsqrt_cooldown(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    cooldown_steps: int,
    timescale: int | None = None,
) -> LambdaLR:
    """The paper's schedule (vmoe, big_vision ``rsqrt``): linear warmup, ``1 / sqrt(1 + (step - warmup) / timescale)``,
    and a linear cooldown to 0 over the last ``cooldown_steps``."""
    warmup_steps = _fit("warmup_steps", warmup_steps, total_steps // 2)
    cooldown_steps = _fit("cooldown_steps", cooldown_steps, total_steps - warmup_steps)
    timescale = timescale or max(1, warmup_steps)

    def multiplier(step: int) -> float:
        lr = _linear_warmup(step, warmup_steps) / math.sqrt(1 + max(0, step - warmup_steps) / timescale)
        if cooldown_steps:
            lr *= min(1.0, (total_steps - step) / cooldown_steps)
        return lr

    return _schedule(optimizer, multiplier)


def constant(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """The optimizer's lr after an optional linear warmup."""
    warmup_steps = _fit("warmup_steps", warmup_steps, total_steps)
    return _schedule(optimizer, lambda step: _linear_warmup(step, warmup_steps))
