"""A run's context: what every part of the loop shares, built once by :func:`open_run`.

:class:`RunContext` holds the run's fixed parts (its config, run directory, distributed view, telemetry, loaders,
the module forward is called on, the preemption guard and the step plan) and writes checkpoints; the changing
part is the :class:`~.state.TrainState`. The loop's helpers take the context and the state, and read what they use.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import nn

from softmoe import block_index, moe_layers
from softmoe.parallel import ExpertParallel

from . import sharded_checkpoint, sweep_stop
from .checkpoint import (
    BEST,
    FORMAT_VERSION,
    LAST,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
    weights_that_fit,
)
from .config import planned_steps
from .console import describe_upcycling
from .data import DataBundle, build_datasets
from .data.device_loader import put_on_device
from .distributed import Distributed, Loaders
from .errors import CheckpointError, ConfigError, NonFiniteError
from .faults import PreemptionGuard, first_nonfinite
from .gpu_share import cap_cuda_memory, memory_share
from .state import NO_BEST, TrainState, build_state, no_validation_reason
from .plausibility import warn_small_splits
from .resume import past_the_runs_end, resume_checkpoint
from .rules import counted
from .telemetry import METRICS_FILE, RankZeroTelemetry, Telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunContext:
    """The fixed parts of a run. Rank 0 alone writes the run directory; every rank holds a context."""

    config: dict[str, Any]  # the resolved run config (plain), saved inside every checkpoint
    run_dir: Path
    distributed: Distributed
    telemetry: RankZeroTelemetry  # written by rank 0, from metrics averaged over the ranks
    loaders: Loaders  # this rank's share of every split
    forward: nn.Module  # what the loop calls: the state's model, DDP-wrapped when data parallel, maybe compiled
    preemption: PreemptionGuard  # Ctrl-C, SIGTERM, SIGUSR1, SIGUSR2: finish the step, save, stop (faults.py)
    steps_per_epoch: int
    total_steps: int
    panel_image: Optional[torch.Tensor]  # the image whose dispatch maps every evaluation logs; None: no panel
    skipped_examples: int  # bad examples dropped by data.on_bad_file=skip
    evaluated: str = ""  # the images each evaluation reads where trainer.eval_batches limits them (evaluated_subset)

    @property
    def trainer(self) -> dict[str, Any]:
        return self.config["trainer"]

    @property
    def precision(self) -> str:
        return self.trainer["precision"]

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def save(self, state: TrainState, name: str) -> None:
        """Write ``state`` to ``<run_dir>/<name>`` (rank 0; collective under expert parallelism)."""
        state.nonfinite.settle(state.step)  # the skip counts the checkpoint keeps (and a stop they call for)
        bad = first_nonfinite(state.model.state_dict().items())  # a NaN weight never reaches a checkpoint
        if bad is not None:
            raise NonFiniteError(
                f"step {state.step}: {bad} is not finite; {name} not written, the previous one is kept"
            )
        fields = state.state_dict(self.distributed)  # collective: every rank sends its experts
        checkpoint = None if fields is None else {
            "format": FORMAT_VERSION,
            **fields,
            "rng": rng_state(),
            "config": json.dumps(self.config),
            "wandb_run_id": self.telemetry.run_id,
            "wandb_group": self.telemetry.group,  # kept by the run when resumed alone (a sweep job, hydra.mode=RUN)
            "wandb_name": self.telemetry.name,
        }
        if self.distributed.fsdp:  # collective: every rank writes its shards, rank 0 the rest
            model, optimizer, mesh = state.model, state.optimizer, self.distributed.mesh
            sharded_checkpoint.save(self.run_dir, name, model, optimizer, mesh, checkpoint, keep_previous=name == LAST)
        elif checkpoint is not None:
            save_checkpoint(self.run_dir / name, checkpoint, keep_previous=name == LAST)

    def best_model(self) -> Any:
        """``best``'s model state, as :meth:`Distributed.load_state` takes it (a sharded checkpoint: its directory).
        Not necessarily in this strategy's format: a run resumed in its own directory under another strategy keeps
        the best it resumed with until it beats it, so the newer of ``best.pt`` and ``best.dcp`` holds it."""
        path = sharded_checkpoint.latest(self.run_dir, BEST)
        if path is None:
            raise CheckpointError(f"{self.run_dir}: holds neither {BEST} nor its sharded counterpart to test")
        return str(path) if path.is_dir() else load_checkpoint(path)["model"]

    def save_last(self, state: TrainState) -> None:
        """Write ``last.pt``, then send W&B the events it covers (a run resumed from it never sends them twice)."""
        self.save(state, LAST)
        self.telemetry.commit()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device


def whole_model_parameters(model: nn.Module) -> int:
    """The whole model's parameter count on any rank: under expert parallelism a rank holds 1 / E of each expert
    bank (FSDP's DTensors already count as their whole tensors)."""
    total = sum(p.numel() for p in model.parameters())
    for module in model.modules():
        if isinstance(module, ExpertParallel):
            total += (module.world_size - 1) * sum(p.numel() for p in module.local_experts.parameters())
    return total


def evaluated_subset(data: DataBundle, trainer: Mapping[str, Any]) -> str:
    """Which images the validation and test accuracies are of, where ``trainer.eval_batches`` leaves some out ("" for
    every image): the done line said "test accuracy 58.00%" of the first 100 of 360 test images without a word."""
    if trainer["eval_batches"] is None:
        return ""
    limit = trainer["eval_batches"] * trainer["eval_batch_size"]
    splits = [(name, len(split)) for name, split in (("test", data.test), ("validation", data.val))
              if split is not None]
    if all(size <= limit for _, size in splits):
        return ""
    shown = " and ".join(f"{min(size, limit)} of the {size} {name} images" for name, size in splits)
    return (f"the first {shown} (trainer.eval_batches={trainer['eval_batches']} x trainer.eval_batch_size="
            f"{trainer['eval_batch_size']}; null evaluates them all)")


def log_plan(config: dict, data: DataBundle, model: nn.Module, total_steps: int, steps_per_epoch: int,
             distributed: Distributed) -> None:
    blocks = sorted(block_index(name) for name in moe_layers(model))
    log.info(
        "model: %s, %s, %.2fM parameters; data=%s: %d train / %d val / %s; %s, %d per epoch",
        config["model"]["name"], f"MoE (router={config['moe']['router']}) in blocks {blocks}" if blocks else "dense",
        whole_model_parameters(model) / 1e6, data.name, len(data.train),
        len(data.val) if data.val is not None else 0, counted(len(data.test), "test image"),
        counted(total_steps, "step"), steps_per_epoch,
    )
    trainer = config["trainer"]  # what trainer.device=auto chose, and how the steps run on it
    compiled = ", torch.compile" if trainer["compile"] else ""
    log.info("compute: %s, precision %s%s", distributed.device, trainer["precision"], compiled)
    warn_small_splits(data)
    evaluated = evaluated_subset(data, trainer)
    if evaluated:
        log.info("evaluations read %s", evaluated)
    upcycled = describe_upcycling(config["model"], model)
    if upcycled:
        log.info(upcycled)
    log.info("checkpoints: %s", distributed.checkpoint_format(best=data.val is not None))
    if data.val is None:  # said after the checkpoints line, which then names last.pt only
        log.warning("%s: no validation split, so no model selection: best.pt is not written, and only the final "
                    "model is tested", no_validation_reason(config["data"]["val_size"]))


def open_run(
    config: dict, run_dir: Path, distributed: Distributed, cleanup: contextlib.ExitStack, *,
    wandb_group: Optional[str] = None, wandb_name: Optional[str] = None,
    on_claim: Optional[Callable[[Path], None]] = None,
) -> tuple[RunContext, TrainState]:
    """Claim ``run_dir``, load the data, build the model and continue from its ``last.pt`` if there is one: the
    run's context and its state, ready for the first step. ``cleanup`` receives what must be undone however the
    run ends (the directory's lock, W&B, the signal handlers)."""
    trainer, seed = config["trainer"], config["seed"]
    lock = distributed.claim_run_dir(run_dir)  # one process per run directory (rank 0 holds the lock)
    if lock is not None:
        cleanup.callback(lock.release)
    # before on_claim writes .hydra/: a refused config leaves the directory's record of its run as it was
    checkpoint, start_from = resume_checkpoint(run_dir, trainer["resume"], config)
    if lock is not None and on_claim is not None:
        on_claim(run_dir)
    seed_everything(seed)

    # Data. Epoch e's order is drawn from seed + e, so a resumed run skips what it has seen without loading it.
    data = build_datasets(config["data"], config["paths"]["data_dir"])
    loaders = distributed.build_loaders(data, trainer, seed)  # this rank's share of every batch
    cap_cuda_memory(distributed.device, trainer["cuda_memory_fraction"])  # several runs sharing one GPU
    put_on_device(loaders, data.train, trainer["data_on_device"], distributed.device,
                  memory_share(distributed.device, trainer["cuda_memory_fraction"]))  # no DataLoader (data_on_device)
    steps_per_epoch, total_steps = planned_steps(trainer, len(data.train))
    if steps_per_epoch == 0:  # only for datasets whose size was unknown before they were scanned
        raise ConfigError(  # e.g. a small folder of one's own images: say how far to lower it
            f"trainer.batch_size={trainer['batch_size']}: larger than the "
            f"{counted(len(data.train), 'training example')} of data={config['data']['name']} "
            f"(what data.val_size={config['data']['val_size']} leaves for training); "
            f"must be at most {len(data.train)}"
        )

    from_another_run = checkpoint is not None and start_from.parent != run_dir  # trainer.resume's, not its own
    past_its_end = past_the_runs_end(trainer["resume"], checkpoint["step"], total_steps) if from_another_run else None
    if past_its_end:
        raise ConfigError(past_its_end)
    state, forward = build_state(config, distributed, total_steps, resuming=checkpoint is not None)
    log_plan(config, data, state.model, total_steps, steps_per_epoch, distributed)
    if checkpoint is not None:
        with weights_that_fit(start_from):
            state.load_state_dict(checkpoint, distributed)  # expert parallel: this rank's experts
        if from_another_run:  # that run's best.pt stays there; select anew here
            state.best = dict(NO_BEST)
        log.info("resuming from %s at step %d of %d", start_from, state.step, total_steps)
    elif (run_dir / METRICS_FILE).is_file():  # say why a rerun starts over: no attempt here got to a checkpoint
        log.info("%s holds no last.pt: its earlier attempt stopped before its first checkpoint; starting at step 0",
                 run_dir)
    writer = None  # rank 0 writes metrics.jsonl and W&B, from metrics averaged over the ranks
    if distributed.is_main:
        # a new run directory is a new run: trainer.resume's checkpoint seeds its weights, not its W&B run
        run_id = checkpoint["wandb_run_id"] if checkpoint is not None and not from_another_run else None
        if run_id is not None:  # the same W&B run keeps its group and name: a sweep's job resumed alone (the line its
            # stop printed, hydra.mode=RUN) left its sweep's group (older checkpoints: the command line's as before)
            wandb_group = checkpoint.get("wandb_group", wandb_group)
            wandb_name = checkpoint.get("wandb_name", wandb_name)
        writer = Telemetry(run_dir, config["logger"], config, resume_step=state.step, run_id=run_id, group=wandb_group,
                           name=wandb_name)
    telemetry = RankZeroTelemetry(writer, distributed)
    cleanup.callback(telemetry.finish)
    if checkpoint is not None:
        set_rng_state(checkpoint["rng"])  # last: building the model and starting W&B may draw from the RNGs
    # The dispatch-map panel shows this image at every evaluation (a picture of the routing, not a selection).
    panel_image = (data.val if data.val is not None else data.test)[0][0]
    if not (moe_layers(state.model) and telemetry.logs_images):
        panel_image = None
    if data.skipped and checkpoint is None:
        telemetry.log(0, 1, {"data/skipped_examples": data.skipped})
    preemption = PreemptionGuard(checkpoint=distributed.last_checkpoint, stop_requested=sweep_stop.stop_requested)
    preemption.install()
    cleanup.callback(preemption.restore)
    # W&B's finish (seconds, where it uploads) first, under the guard: a Ctrl-C there made a finished run "interrupted
    # before training started". The finish registered above is for a failure before the guard (a no-op after this)
    cleanup.callback(telemetry.finish)
    run = RunContext(
        config=config, run_dir=run_dir, distributed=distributed, telemetry=telemetry, loaders=loaders,
        forward=forward, preemption=preemption, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        panel_image=panel_image, skipped_examples=data.skipped, evaluated=evaluated_subset(data, trainer),
    )
    return run, state
