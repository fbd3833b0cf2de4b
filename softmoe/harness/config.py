"""Checks on a composed run config, done before any data loads or any model is built.

Every problem is one line, ``<key>=<value>: <what is allowed>``, raised as :class:`ConfigError`;
``python -m softmoe.train`` prints it and exits with status 2. The ``data`` group checks itself
(``softmoe.harness.data.check_data_config``); this module checks the rest, the keys that
depend on each other (placement within the depth, batch size within the dataset, schedule within
the run) and, in :func:`check_launch`, the config against how the processes were started (torchrun).
Every check is written in the vocabulary of :mod:`.rules`; what each single key may hold is in :mod:`.config_rules`.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import torch
from omegaconf import DictConfig

from softmoe._checks import is_number
from softmoe.upcycle import UnreadableCheckpointError, check_upcycle, load_state_dict

from . import sharded_checkpoint
from .capacity import check_blocks_fit, check_cpu_counts, check_parameters_fit, run_capacity
from .config_rules import (
    EVALUATE_RULES,
    LAUNCHER_RULES,
    LOGGER_RULES,
    MODEL_RULES,
    MOE_RULES,
    OPTIMIZER_RULES,
    PATHS_RULES,
    SCHEDULER_RULES,
    TRAINER_RULES,
    VIT_ARGUMENT_RULES,
    device_spelling,
)
from .data import check_data_config, dataset_size
from .errors import ConfigError
from .optim import optimizer_arguments
from .plausibility import check_model_name, check_slot_count, check_token_count
from .model import CODE_ONLY_VIT_ARGUMENTS, VIT_ARGUMENTS, build_model, moe_blocks, num_tokens
from .rules import check_known, check_section, counted, format_value, import_target, plain, seed_value


def check_evaluate(arguments: Mapping[str, Any]) -> None:
    """Raise :class:`ConfigError` for the first bad argument of ``python -m softmoe.evaluate`` (those of
    :data:`EVALUATE_RULES`), before anything loads: ``batch_size=0: must be a positive integer, or null``."""
    for key, rule in EVALUATE_RULES.items():
        problem = rule(arguments[key], arguments)
        if problem is not None:
            raise ConfigError(f"{key}={format_value(arguments[key])}: {problem}")


def _check_target(section: str, values: Mapping[str, Any]) -> Callable:
    target = values.get("_target_")
    factory = import_target(target)
    if factory is None:
        raise ConfigError(f"{section}._target_={format_value(target)}: must name an importable class or function")
    parameters = inspect.signature(factory).parameters
    check_known(section, values, set(parameters), f"not an argument of {target}")
    check_like_the_defaults(section, values, parameters, target)
    return factory


def check_like_the_defaults(section: str, values: Mapping[str, Any], parameters: Mapping[str, inspect.Parameter],
                            target: str) -> None:
    """An argument the section's rules do not know (``+optimizer.amsgrad=abc``), checked against the kind of its
    default in ``target``'s signature: a flag takes true or false (a string trained with AMSGrad on, being truthy),
    a number a number. ``_partial_`` must stay true: the harness calls the partial with the model's parameters."""
    for key, value in values.items():
        if key == "_partial_" and value is not True:
            builds = {"optimizer": "the model's parameter groups", "scheduler": "the optimizer and the run's steps"}
            raise ConfigError(f"{section}._partial_={format_value(value)}: must stay true (the trainer calls {target} "
                              f"with {builds.get(section, 'what it builds')})")
        default = parameters[key].default if key in parameters else inspect.Parameter.empty
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{section}.{key}={format_value(value)}: must be true or false ({target}'s {key})")
        if is_number(default) and not is_number(value):  # (is_number: not a bool)
            raise ConfigError(f"{section}.{key}={format_value(value)}: must be a number ({target}'s {key})")


def _check_upcycle_source(model: Mapping[str, Any], moe: Mapping[str, Any]) -> None:
    """``model.upcycle_from`` is a readable state dict whose every tensor fits the model (built on the meta device:
    shapes only, no memory and no weights)."""
    shown = f"model.upcycle_from={format_value(model['upcycle_from'])}"
    part = sharded_checkpoint.train_state_not_a_checkpoint(Path(model["upcycle_from"]).expanduser())
    if part:  # a file inside last.dcp/: was "truncated or damaged"
        raise ConfigError(f"{shown}: {part}")
    try:
        dense_state = load_state_dict(Path(model["upcycle_from"]).expanduser(), mapped=True)  # the build reads it
    except UnreadableCheckpointError as error:
        raise ConfigError(f"{shown}: not a readable checkpoint ({error.reason})") from None
    except Exception as error:  # a sharded checkpoint's reader refusing the directory
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ConfigError(f"{shown}: not a readable checkpoint ({first_line})") from None
    with torch.device("meta"):  # shapes only
        network = build_model(model, moe, upcycle_weights=False)
    try:
        check_upcycle(dense_state, network)
    except ValueError as error:
        raise ConfigError(f"{shown}: {error}{_width_hint(dense_state, model)}") from None


def _width_hint(dense_state: Mapping[str, Any], model: Mapping[str, Any]) -> str:
    """The keys that set the widths an upcycled model shares with its dense checkpoint, where the checkpoint's differ
    (the shape mismatch names tensors, not what to change): its ``model.embed_dim`` and MLP width."""
    fc1 = next((v for k, v in dense_state.items() if k.endswith("mlp.fc1.weight") and getattr(v, "ndim", 0) == 2),
               None)
    if fc1 is None:
        return ""
    hidden, width = fc1.shape
    if width != model["embed_dim"]:
        return f"; the dense model is {width} wide: give model.embed_dim={width} (here {model['embed_dim']})"
    if hidden != int(width * model["mlp_ratio"]):
        return (f"; the dense model's MLPs are {hidden} wide: give model.mlp_ratio={hidden / width:g} "
                f"(here {model['mlp_ratio']})")
    return ""


def resolve_device(name: str) -> torch.device:
    """``trainer.device`` as a device: ``auto`` is CUDA when present, else Apple's GPU (MPS), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    return torch.device(name)


def planned_steps(trainer: Mapping[str, Any], train_size: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) of a run over ``train_size`` examples (last partial batch dropped)."""
    steps_per_epoch = train_size // trainer["batch_size"]
    total = trainer["max_steps"] or trainer["max_epochs"] * steps_per_epoch
    return steps_per_epoch, total


def check_config(cfg: DictConfig, *, on_this_machine: bool = True) -> None:
    """Raise :class:`ConfigError` for the first bad key of ``cfg``; reads no data (the model is built, if at all,
    on the meta device: see :func:`_check_upcycle_source`). ``on_this_machine=False``: the run is planned for GPUs
    elsewhere (``python -m softmoe.plan``), so ``trainer.device`` is not looked for here, and ``auto`` is a GPU."""
    config = plain(cfg)
    for section in ("model", "moe", "data", "optimizer", "scheduler", "trainer", "logger", "paths"):
        if not isinstance(config.get(section), dict):
            raise ConfigError(f"{section}: missing; compose the run from conf/train.yaml")
    problem = seed_value(config.get("seed"), config)
    if problem:
        raise ConfigError(f"seed={format_value(config.get('seed'))}: {problem}")
    check_data_config(config["data"])
    _check_model(config["model"], config["data"])
    if isinstance(config.get("launcher"), dict):  # checked here too: a sweep checks every job before it launches
        check_section("launcher", config["launcher"], LAUNCHER_RULES, required=None)
        check_known("launcher", config["launcher"], set(LAUNCHER_RULES), "not a key of any launcher")
    _check_trainer(config["trainer"], config["data"], on_this_machine)
    capacity = run_capacity(config, on_this_machine)  # the launcher's keys and the trainer's, checked above
    check_cpu_counts(config["trainer"], capacity)
    check_blocks_fit(config["model"], capacity)  # before the MoE blocks are listed
    blocks = _check_moe(config["moe"], config["model"])
    check_parameters_fit(config, len(blocks), capacity)
    if config["model"]["upcycle_from"] is not None:
        _check_upcycle_source(config["model"], config["moe"])
    elif config["model"].get("upcycle_noise_std"):  # was accepted, and did nothing
        raise ConfigError(f"model.upcycle_noise_std={format_value(config['model']['upcycle_noise_std'])}: the noise "
                          "added to experts upcycled from a dense ViT, so it needs model.upcycle_from=<its "
                          "checkpoint>; leave it at 0 to train from scratch")
    check_model_name(config["model"])  # valid keys, but not what the user meant (plausibility.py)
    check_token_count(config["model"], config["trainer"]["max_tokens_per_image"])
    check_slot_count(config["model"], config["moe"], config["trainer"]["max_tokens_per_image"])
    _check_optimization(config["optimizer"], config["scheduler"])
    logger = config["logger"]
    check_section("logger", logger, {"backend": LOGGER_RULES["backend"]})
    if logger["backend"] == "wandb":
        check_section("logger", logger, LOGGER_RULES)
        check_known("logger", logger, set(LOGGER_RULES), "not a key of the logger group")  # +logger.x: read by none
    check_section("paths", config["paths"], PATHS_RULES)
    check_known("paths", config["paths"], set(PATHS_RULES), "not a key of the paths group")


SLURM_COMMANDS = ("sbatch", "srun")  # submitit submits a sweep with sbatch; each of its tasks runs under srun


def check_launcher_here(launcher: Optional[str]) -> None:
    """A sweep's launcher against this machine, before Hydra launches it: ``launcher=slurm`` submits through
    SLURM's commands (without them, submitit's "Could not detect srun" traceback, after the sweep dir is made)."""
    missing = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if launcher == "slurm" and missing:
        raise ConfigError(f"launcher=slurm: {' and '.join(missing)} not found on this machine (no SLURM here); "
                          "run the sweep on a SLURM login node, or use launcher=submitit_local (or joblib) to run "
                          "its jobs on this machine")


def _check_model(model: dict[str, Any], data: dict[str, Any]) -> None:
    check_section("model", model, MODEL_RULES)
    code_only = sorted(set(model) & CODE_ONLY_VIT_ARGUMENTS)  # timm's arguments, but not a config's to give
    if code_only:
        key = code_only[0]
        raise ConfigError(f"model.{key}={format_value(model[key])}: a VisionTransformer argument that takes a class "
                          "or a device, which a config cannot give; set it in code (SoftMoEVisionTransformer("
                          f"{key}=...)), or leave it out")
    check_known("model", model, set(MODEL_RULES) | VIT_ARGUMENTS, "not a key of timm's VisionTransformer")
    check_section("model", model, VIT_ARGUMENT_RULES, required=None)  # those added with +model.<argument>
    for key in ("img_size", "in_chans", "num_classes"):
        if model[key] != data[key]:
            raise ConfigError(
                f"model.{key}={format_value(model[key])}: must equal data.{key}={format_value(data[key])} "
                f"(set data.{key}; the model follows it)"
            )
    if model["img_size"] % model["patch_size"]:
        raise ConfigError(
            f"model.patch_size={model['patch_size']}: must divide the image size data.img_size={model['img_size']}"
        )
    if model["embed_dim"] % model["num_heads"]:
        raise ConfigError(f"model.num_heads={model['num_heads']}: must divide model.embed_dim={model['embed_dim']}")
    if int(model["embed_dim"] * model["mlp_ratio"]) < 1:  # timm would silently use embed_dim instead
        raise ConfigError(f"model.mlp_ratio={model['mlp_ratio']}: model.embed_dim={model['embed_dim']} x mlp_ratio "
                          "must be at least 1 (the MLP's hidden features)")
    if model["global_pool"] == "token" and not model["class_token"]:
        raise ConfigError("model.global_pool=token: pools the class token, so needs model.class_token=true "
                          "(or pool with avg, max, avgmax or map)")


def _check_moe(moe: dict[str, Any], model: dict[str, Any]) -> list[int]:
    """The moe section against the model; returns its MoE blocks."""
    check_section("moe", moe, MOE_RULES)
    check_known("moe", moe, set(MOE_RULES), "not a key of the moe group")
    try:
        blocks = moe_blocks(moe, model["depth"])
    except ValueError as error:
        raise ConfigError(str(error)) from None
    if moe["router"] != "soft":
        for key in ("dispatch", "combine"):
            if moe[key] != "soft":
                raise ConfigError(
                    f"moe.{key}={moe[key]}: only moe.router=soft has {key} modes; moe.router={moe['router']} needs "
                    f"moe.{key}=soft (or use routing={moe['router']})"
                )
    if moe["router"] == "tokens_choice" and moe["k"] > moe["num_experts"]:
        raise ConfigError(
            f"moe.k={moe['k']}: experts per token must be at most moe.num_experts={moe['num_experts']}"
        )
    slots = moe["num_experts"] * moe["slots_per_expert"]
    tokens = num_tokens(model)
    if blocks and "identity" in (moe["dispatch"], moe["combine"]) and slots != tokens:
        raise ConfigError(
            f"moe.num_experts={moe['num_experts']}: identity routing needs num_experts * slots_per_expert = the "
            f"{tokens} tokens of each image, got {moe['num_experts']} * {moe['slots_per_expert']} = {slots}"
        )
    if blocks and "identity" in (moe["dispatch"], moe["combine"]) and model.get("patch_drop_rate"):
        raise ConfigError(
            f"model.patch_drop_rate={model['patch_drop_rate']}: drops tokens in training, and identity routing (moe."
            "dispatch or moe.combine=identity) needs every token, one per slot; leave patch dropout out, or route "
            "with moe.dispatch=soft and moe.combine=soft"
        )
    return blocks


def _check_trainer(trainer: dict[str, Any], data: dict[str, Any], on_this_machine: bool = True) -> None:
    rules = TRAINER_RULES if on_this_machine else {**TRAINER_RULES, "device": device_spelling}
    check_section("trainer", trainer, rules)
    check_known("trainer", trainer, set(TRAINER_RULES), "not a key of the trainer group")
    device = trainer["device"]
    device_type = resolve_device(device).type if on_this_machine else device.partition(":")[0].replace("auto", "cuda")
    if trainer["precision"] == "fp16" and device_type != "cuda":
        raise ConfigError(f"trainer.precision=fp16: needs a CUDA device (trainer.device={trainer['device']}); use bf16")
    if trainer["precision"] != "fp32" and device_type == "mps":
        raise ConfigError(
            f"trainer.precision={trainer['precision']}: on Apple's GPU (trainer.device={trainer['device']} is MPS) "
            "the trainer runs in float32; use trainer.precision=fp32"
        )
    train_size = dataset_size(data, "train")
    if train_size is not None and trainer["batch_size"] > train_size:
        raise ConfigError(
            f"trainer.batch_size={trainer['batch_size']}: larger than the {train_size} training examples of "
            f"data={data['name']}; must be at most {train_size}"
        )


def _check_optimization(optimizer: dict[str, Any], scheduler: dict[str, Any]) -> None:
    # Only the keys present are checked: each optimizer and schedule takes its own.
    check_section("optimizer", optimizer, OPTIMIZER_RULES, required=None)
    _check_target("optimizer", optimizer_arguments(optimizer))
    if "lr" not in optimizer:
        raise ConfigError("optimizer.lr: missing; the schedule scales it")
    if optimizer.get("nesterov") and not optimizer.get("momentum"):
        raise ConfigError(f"optimizer.momentum={format_value(optimizer.get('momentum'))}: optimizer.nesterov=true "
                          "needs a momentum > 0; set a momentum, or optimizer.nesterov=false")
    check_section("scheduler", scheduler, SCHEDULER_RULES, required=None)
    _check_target("scheduler", scheduler)
    if "timescale" in scheduler and scheduler["timescale"] is None and not scheduler.get("warmup_steps"):
        raise ConfigError("scheduler.timescale=null: means warmup_steps, which is 0; set scheduler.timescale")


def expert_group_size(config: Mapping[str, Any], world_size: int) -> Optional[int]:
    """The ranks each expert group spans: ``trainer.expert_parallel_size``, else every rank under
    ``moe.expert_parallel``; None without expert parallelism."""
    size = config["trainer"].get("expert_parallel_size")
    if size is None and not config["moe"]["expert_parallel"]:
        return None
    return size or world_size


def check_launch(config: Mapping[str, Any], *, torchrun: bool, world_size: int) -> None:
    """The config against how this process was started (``torchrun`` set RANK and WORLD_SIZE, ``world_size``
    processes): ``trainer.strategy``, expert parallelism and what they need. The same error on every rank."""
    trainer = config["trainer"]
    strategy = trainer["strategy"]
    if strategy in ("ddp", "fsdp") and not torchrun:
        raise ConfigError(
            f"trainer.strategy={strategy}: needs a torchrun launch (RANK and WORLD_SIZE are not set): "
            "torchrun --nproc_per_node=N -m softmoe.train ..."
        )
    if strategy == "single" and torchrun and world_size > 1:
        raise ConfigError(
            f"trainer.strategy=single: trains in one process, but {world_size} are launched (WORLD_SIZE={world_size}, "
            "torchrun); use trainer.strategy=auto or ddp, or one process: python -m softmoe.train"
        )
    if strategy == "fsdp" and trainer["precision"] == "fp16":
        raise ConfigError("trainer.precision=fp16: trainer.strategy=fsdp trains in fp32 or bf16 (no GradScaler)")
    data_parallel = torchrun and strategy != "single"
    if expert_group_size(config, world_size) is not None:
        _check_expert_parallel(config, data_parallel, world_size)
    if data_parallel and trainer["batch_size"] % world_size:
        raise ConfigError(
            f"trainer.batch_size={trainer['batch_size']}: the global batch must be divisible by the {world_size} "
            f"processes (WORLD_SIZE={world_size})"
        )


def _check_expert_parallel(config: Mapping[str, Any], data_parallel: bool, world_size: int) -> None:
    moe, size = config["moe"], config["trainer"].get("expert_parallel_size")
    # the key that asked for expert parallelism, as the user typed it
    asked = "moe.expert_parallel=true" if size is None else f"trainer.expert_parallel_size={size}"
    if not data_parallel:
        raise ConfigError(f"{asked}: needs a distributed launch: torchrun --nproc_per_node=N -m softmoe.train {asked}")
    if moe["placement"] == "none" and not moe["layers"]:
        raise ConfigError(f"{asked}: needs MoE layers to split; moe.placement=none builds a dense ViT")
    if size is not None and world_size % size:
        raise ConfigError(
            f"{asked}: must divide the {counted(world_size, 'process', 'processes')} (WORLD_SIZE={world_size}) into "
            "expert groups"
        )
    group = expert_group_size(config, world_size)
    if moe["num_experts"] % group:
        where = "processes" if group == world_size else f"ranks of an expert group ({asked})"
        raise ConfigError(
            f"moe.num_experts={moe['num_experts']}: expert parallelism needs it divisible by the {group} {where}"
        )
    if config["trainer"]["precision"] == "fp16":
        raise ConfigError(
            "trainer.precision=fp16: a loss-scaled step may skip on some ranks only under expert parallelism; use bf16"
        )
