"""The training loop: a composed config in, a trained run directory out. Read :func:`train` top to bottom.

    summary = train(cfg, run_dir)   # what `python -m softmoe.train` runs inside its Hydra job

:func:`train` sets the run up, then repeats :func:`train_step` (the learning algorithm: forward, backward,
clip, update) with the periodic work around it: log every ``trainer.log_every`` steps, checkpoint every
``trainer.checkpoint_every`` steps and after each epoch's validation, stop cleanly on a preemption signal or
Ctrl-C. :class:`TrainState` is everything a checkpoint restores; :class:`Checkpoints` writes it.

The run directory receives ``metrics.jsonl``, ``last.pt`` (after every evaluation, and every
``trainer.checkpoint_every`` steps), ``best.pt`` (best validation accuracy) and W&B's files.

Model selection reads the validation split alone (``val/*``, held out of the training data). The test
split (``test/*``) is evaluated once, when training ends: for the final model and for ``best.pt``. A run directory
that already holds ``last.pt`` continues from it: same weights, optimizer, schedule, data order, RNG
streams and W&B run, so the resumed run ends exactly where an uninterrupted one would (on CPU).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from softmoe import block_index, capture_routing, moe_layers
from softmoe.sparse import SparseMoE, auxiliary_loss

from .checkpoint import (
    BEST,
    FORMAT_VERSION,
    LAST,
    check_same_model,
    load_checkpoint,
    load_resume_checkpoint,
    resume_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import planned_steps, validate_config
from .console import describe_upcycling
from .data import build_datasets
from .distributed import Distributed, Loaders, RankZeroTelemetry
from .errors import ConfigError, NonFiniteError
from .faults import NonFiniteGuard, Preempted, PreemptionGuard, first_nonfinite
from .model import build_model
from .plausibility import warn_small_splits
from .optim import build_optimizer, build_scheduler, keeping_kernel_choice
from .precision import autocast, warn_if_slow
from .telemetry import Telemetry, dispatch_maps, routing_metrics

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What a finished run reports (and ``python -m softmoe.train`` prints)."""

    test_acc: float  # the final model's top-1 accuracy on the test split
    test_loss: float
    val_acc: float  # the final model's accuracy on the validation split (NaN without one)
    best_val_acc: float  # the best validation accuracy over the epochs (NaN without a validation split), and when
    best_val_epoch: int
    test_acc_at_best_val: float  # the test accuracy of that best-on-validation checkpoint, best.pt (NaN without one)
    steps: int
    run_dir: str
    wandb_run_path: Optional[str]
    skipped_steps: int = 0  # steps dropped for a NaN/inf loss or gradient (trainer.nonfinite=skip)
    skipped_examples: int = 0  # bad examples dropped by data.on_bad_file=skip

    def describe(self) -> str:
        """The result in one line: test accuracy of the final model and of the best-on-validation checkpoint."""
        final = f"test accuracy {100 * self.test_acc:.2f}% (final model)"
        if math.isnan(self.best_val_acc):
            return f"{final}; no validation split (data.val_size=0), so no checkpoint was selected"
        return (
            f"{final}, {100 * self.test_acc_at_best_val:.2f}% (best.pt: best validation accuracy "
            f"{100 * self.best_val_acc:.2f}% at epoch {self.best_val_epoch})"
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device


class TrainWindow:
    """Training loss, accuracy and throughput over the steps since the last log event.

    Sums and counts stay on the device, so a step that does not log never waits for the accelerator.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=self.device, dtype=torch.int64)
        self.examples = torch.zeros((), device=self.device, dtype=torch.int64)
        self.seconds = 0.0

    def add(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, seconds: float,
        applied: Optional[torch.Tensor] = None,
    ) -> None:  # fmt: skip
        """Count a step's batch; ``applied`` (a boolean on the device, when the optimizer decides there whether to
        take the step) leaves out a skipped step without waiting for the device."""
        loss_sum, correct = loss.detach() * len(labels), (logits.detach().argmax(dim=-1) == labels).sum()
        examples = len(labels)
        if applied is not None:
            loss_sum, correct, examples = torch.where(applied, loss_sum, 0.0), correct * applied, examples * applied
        self.loss_sum += loss_sum
        self.correct += correct
        self.examples += examples
        self.seconds += seconds

    @property
    def seen(self) -> int:
        """Examples counted since the last log event (a host read)."""
        return int(self.examples.item())

    def pop(self) -> dict[str, float]:
        """The window's metrics (``train/loss`` is the label-smoothed loss the optimizer sees); starts a new window."""
        loss_sum, correct, seen = self.loss_sum.item(), self.correct.item(), self.seen
        metrics = {
            "train/loss": loss_sum / seen,
            "train/acc": correct / seen,
            "train/throughput": seen / max(self.seconds, 1e-9),
        }
        self.reset()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum.item(), "correct": self.correct.item(), "seen": self.seen, "seconds": self.seconds
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.fill_(state["loss_sum"])
        self.correct.fill_(state["correct"])
        self.examples.fill_(state["seen"])
        self.seconds = state["seconds"]


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, device: torch.device, precision: str = "fp32", max_batches: Optional[int] = None
) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy (no label smoothing) over ``loader`` (its first ``max_batches``)."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for index, (images, labels) in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with autocast(device, precision):
            logits = model(images).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=-1) == labels).sum().item()
        seen += len(labels)
    model.train(was_training)
    return {"loss": loss_sum / seen, "acc": correct / seen}


@torch.no_grad()
def dispatch_panel(model: nn.Module, image: torch.Tensor, device: torch.device) -> Optional[np.ndarray]:
    """The dispatch maps of every MoE block for one image (see :func:`telemetry.dispatch_maps`); None when no
    block records its routing (sparse layers with a ``capacity_factor``)."""
    was_training = model.training
    model.eval()
    with capture_routing(model) as records:
        model(image[None].to(device))
    model.train(was_training)
    return dispatch_maps(image, records, model) if records else None


def every(step: int, interval: Optional[int]) -> bool:
    """Whether work done every ``interval`` steps falls due at ``step`` (1-based); never for a null interval."""
    return bool(interval) and step % interval == 0


NO_BEST = {"acc": -1.0, "epoch": 0, "step": -1}  # before the first validation


@dataclass
class TrainState:
    """Everything a checkpoint restores: the learning state and the loop's counters.

    ``model`` is the plain module (under expert parallelism, this rank's experts); the optimizer, schedule and
    grad scaler act on it. ``window`` holds the training metrics not yet logged, ``nonfinite`` the skip counts.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    window: TrainWindow
    nonfinite: NonFiniteGuard
    step: int = 0  # optimizer steps taken
    best: dict[str, Any] = field(default_factory=lambda: dict(NO_BEST))  # best validation so far: best.pt's
    last_eval: dict[str, float] = field(default_factory=lambda: {"loss": math.nan, "acc": math.nan})

    def state_dict(self, distributed: Distributed) -> Optional[dict[str, Any]]:
        """The single-process state (a checkpoint's fields), on rank 0; None on the other ranks. Collective."""
        model_state, optimizer_state = distributed.gather_state(self.model, self.optimizer)
        if not distributed.is_main:
            return None
        return {
            "step": self.step,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "window": self.window.state_dict(),
            "best": self.best,
            "last_eval": self.last_eval,
            "nonfinite": self.nonfinite.state_dict(),
        }

    def load_state_dict(self, checkpoint: dict[str, Any], distributed: Distributed) -> None:
        """Continue from ``checkpoint`` (the RNG states are restored separately, last: see :func:`train`)."""
        with keeping_kernel_choice(self.optimizer):  # optimizer.fused is this run's, whatever the checkpoint's
            distributed.load_state(self.model, checkpoint["model"], self.optimizer, checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        self.window.load_state_dict(checkpoint["window"])
        self.step, self.best, self.last_eval = checkpoint["step"], checkpoint["best"], checkpoint["last_eval"]
        self.nonfinite.load_state_dict(checkpoint.get("nonfinite", self.nonfinite.state_dict()))


@dataclass(frozen=True)
class Checkpoints:
    """Writes a :class:`TrainState` to the run directory: ``last.pt`` and ``best.pt`` (rank 0 alone)."""

    run_dir: Path
    config: dict[str, Any]  # the resolved run config, saved inside every checkpoint
    distributed: Distributed
    telemetry: RankZeroTelemetry

    def save(self, state: TrainState, name: str) -> None:
        state.nonfinite.settle(state.step)  # the skip counts the checkpoint keeps (and a stop they call for)
        bad = first_nonfinite(state.model.state_dict().items())  # a NaN weight never reaches a checkpoint
        if bad is not None:
            raise NonFiniteError(
                f"step {state.step}: {bad} is not finite; {name} not written, the previous one is kept"
            )
        fields = state.state_dict(self.distributed)  # collective: every rank sends its experts
        if fields is None:
            return
        checkpoint = {
            "format": FORMAT_VERSION,
            **fields,
            "rng": rng_state(),
            "config": json.dumps(self.config),
            "wandb_run_id": self.telemetry.run_id,
        }
        save_checkpoint(self.run_dir / name, checkpoint, keep_previous=name == LAST)

    def checkpoint_last(self, state: TrainState) -> None:
        """Write ``last.pt``, then send W&B the events it covers (a run resumed from it never sends them twice)."""
        self.save(state, LAST)
        self.telemetry.commit()


@dataclass
class StepOutput:
    """What a training step leaves for the logging: its learning rate, gradient norm, auxiliary loss, routing."""

    lr: float
    grad_norm: torch.Tensor
    aux_loss: torch.Tensor
    routing: dict[str, Any]  # the forward pass's routing records (logging steps only)


def train_step(
    state: TrainState,
    forward: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: DictConfig,
    distributed: Distributed,
    *,
    record_routing: bool,
    started: float,
) -> StepOutput:
    """One optimizer step on a batch: forward, loss, backward, clip; the update unless a number is not finite."""
    trainer, model, scaler = cfg.trainer, state.model, state.scaler
    # Routing is recorded on logging steps only, from this same forward pass.
    with autocast(distributed.device, trainer.precision), (
        capture_routing(model) if record_routing else contextlib.nullcontext({})
    ) as routing:
        logits = forward(images).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=trainer.label_smoothing)
        aux_loss = auxiliary_loss(model)  # Tokens Choice's load-balancing losses; 0 for other routers
    state.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss + cfg.moe.aux_loss_weight * aux_loss).backward()
    distributed.average_expert_grads(model)  # over the data-parallel copies of this rank's experts (2-D mesh)
    scaler.unscale_(state.optimizer)
    grad_norm = distributed.clip_grad_norm_(model, trainer.grad_clip_norm or math.inf)  # over every rank's experts
    guard = state.nonfinite
    if guard.on_device:  # a fused optimizer skips a flagged step itself: no waiting for the device (faults.py)
        state.optimizer.found_inf = guard.flag(state.step + 1, loss, grad_norm)
        state.optimizer.step()
        applied = state.optimizer.found_inf == 0
        state.window.add(loss, logits, labels, seconds=time.perf_counter() - started, applied=applied)
    # fp16: the GradScaler skips inf gradients itself (and lowers its scale); only the loss is ours to check
    elif guard.step_is_finite(state.step + 1, loss, 0.0 if scaler.is_enabled() else grad_norm, model):
        scaler.step(state.optimizer)
        state.window.add(loss, logits, labels, seconds=time.perf_counter() - started)
    scaler.update()
    lr = state.scheduler.get_last_lr()[0]  # the rate this step used
    with warnings.catch_warnings():
        # a skipped first step never called optimizer.step(); the schedule still moves on, as for any skipped step
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
        state.scheduler.step()
    state.step += 1
    return StepOutput(lr=lr, grad_norm=grad_norm, aux_loss=aux_loss, routing=routing)


def log_training(telemetry: RankZeroTelemetry, state: TrainState, out: StepOutput, epoch: int) -> Optional[dict]:
    """Log the training metrics since the last event and this step's routing statistics; returns the training
    metrics (None when every step since the last event was skipped)."""
    state.nonfinite.settle(state.step)  # skips flagged on the device are counted (and acted on) here
    window = state.window.pop() if state.window.seen else {}
    scalars = {**window, "train/lr": out.lr, "train/grad_norm": out.grad_norm.item()}
    if state.nonfinite.skipped:
        scalars["train/skipped_steps"] = state.nonfinite.skipped
    if any(isinstance(layer, SparseMoE) for layer in moe_layers(state.model).values()):
        scalars["train/aux_loss"] = out.aux_loss.item()  # this step's, before aux_loss_weight
    routing_scalars, distributions = routing_metrics(state.model, out.routing)
    telemetry.log(state.step, epoch + 1, {**scalars, **routing_scalars}, distributions)
    return scalars if "train/loss" in scalars else None


def evaluate_split(
    forward: nn.Module, loader, distributed: Distributed, precision: str, max_batches: Optional[int]
) -> dict[str, float]:
    """:func:`evaluate` on every rank's share of a split, reduced to the metrics of the whole split."""
    return distributed.reduce_eval(evaluate(forward, loader, distributed.device, precision, max_batches), loader)


def checkpoint_or_stop(
    state: TrainState, checkpoints: "Checkpoints", preemption: PreemptionGuard, *, due: bool, saved: bool = False,
    last_step: bool = False,
) -> None:  # fmt: skip
    """The end of a step, on every rank alike: write ``last.pt`` if it is ``due``; then, if any rank received a
    preemption signal or Ctrl-C, make sure ``last.pt`` holds this step and raise :class:`Preempted`. ``saved``: an
    epoch's end, whose validation wrote it. After the run's ``last_step`` a signal changes nothing: the run ends."""
    if due:
        checkpoints.checkpoint_last(state)
    checkpoints.distributed.share_signal(preemption)  # a signal to any rank stops every rank at this step
    if preemption.requested is None or last_step:
        return
    if not (due or saved):
        checkpoints.checkpoint_last(state)
    raise Preempted(preemption.requested, state.step, preemption.handover())


def show_on_bar(bar: tqdm, latest: Optional[dict]) -> None:
    """The progress bar's figures: the last logged training metrics (none before the first)."""
    if latest:
        bar.set_postfix(loss=f"{latest['train/loss']:.3f}", acc=f"{latest['train/acc']:.1%}",
                        img_s=f"{latest['train/throughput']:.0f}")  # fmt: skip


def resume_checkpoint(run_dir: Path, resume: Optional[str], config: dict) -> tuple[Optional[dict], Optional[Path]]:
    """(the checkpoint the run starts from, its path), or (None, None) for a fresh start: this directory's
    ``last.pt`` (or the ``last.prev.pt`` kept beside a damaged one), else ``trainer.resume``. Refuses a checkpoint
    of another model."""
    start_from = resume_path(run_dir, resume)
    if start_from is None:
        return None, None
    checkpoint, start_from = load_resume_checkpoint(start_from)
    check_same_model(checkpoint, config, start_from)
    return checkpoint, start_from


def build_state(
    cfg: DictConfig, config: dict, distributed: Distributed, total_steps: int
) -> tuple[TrainState, nn.Module]:
    """A fresh :class:`TrainState` and what to call forward on: the model on this rank's device (expert parallel:
    its experts; DDP-wrapped when data parallel), AdamW/SGD with weight decay by parameter name, the schedule,
    loss scaling for fp16, the NaN/inf guard."""
    trainer, device = cfg.trainer, distributed.device
    model, forward = distributed.setup_model(build_model(config["model"], config["moe"]).to(device), trainer.compile)
    optimizer = build_optimizer(cfg.optimizer, model, cfg.moe)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "fp16")
    # fused AdamW/Adam/SGD take a found_inf flag (PyTorch sets this attribute on them for GradScaler); with fp16 the
    # GradScaler passes its own flag, so the loss check stays on the host
    on_device = getattr(optimizer, "_step_supports_amp_scaling", False) and not scaler.is_enabled()
    state = TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(cfg.scheduler, optimizer, total_steps),
        scaler=scaler,
        window=TrainWindow(device),
        # NaN/inf steps: skip or stop, checked on the device when the optimizer can skip a step itself
        nonfinite=NonFiniteGuard(trainer.nonfinite, trainer.max_nonfinite_skips, device, on_device=on_device),
    )
    return state, forward


def log_plan(cfg: DictConfig, data, model: nn.Module, total_steps: int, steps_per_epoch: int) -> None:
    blocks = sorted(block_index(name) for name in moe_layers(model))
    log.info(
        "model: %s, %s, %.2fM parameters; data=%s: %d train / %d val / %d test images; %d steps, %d per epoch",
        cfg.model.name, f"MoE (router={cfg.moe.router}) in blocks {blocks}" if blocks else "dense",
        sum(p.numel() for p in model.parameters()) / 1e6, data.name, len(data.train),
        len(data.val) if data.val is not None else 0, len(data.test), total_steps, steps_per_epoch,
    )  # fmt: skip
    warn_small_splits(data)
    upcycled = describe_upcycling(cfg.model, model)
    if upcycled:
        log.info(upcycled)
    if data.val is None:
        log.warning("data.val_size=0: no validation split, so no model selection: best.pt is not written, "
                    "and only the final model is tested")  # fmt: skip


def validate(
    state: TrainState, forward: nn.Module, loaders: Loaders, cfg: DictConfig, checkpoints: "Checkpoints",
    epoch: int, images: dict,
) -> None:  # fmt: skip
    """The end of an epoch: validate, keep the best (``best.pt``), log, write ``last.pt``."""
    telemetry, distributed = checkpoints.telemetry, checkpoints.distributed
    if loaders.val is not None:
        state.last_eval = evaluate_split(forward, loaders.val, distributed, cfg.trainer.precision, loaders.eval_batches)
        metrics = {"val/loss": state.last_eval["loss"], "val/acc": state.last_eval["acc"]}
        telemetry.log(state.step, epoch + 1, metrics, images=images)
        if state.last_eval["acc"] > state.best["acc"]:
            state.best = {"acc": state.last_eval["acc"], "epoch": epoch + 1, "step": state.step}
            checkpoints.save(state, BEST)
    elif images:
        telemetry.log(state.step, epoch + 1, {}, images=images)
    checkpoints.checkpoint_last(state)


def test_final_and_best(
    state: TrainState, forward: nn.Module, loaders: Loaders, cfg: DictConfig, checkpoints: "Checkpoints", epochs: int
) -> tuple[dict[str, float], dict[str, float]]:
    """The test split, once: (the final model's metrics, those of ``best.pt``, the best-on-validation checkpoint;
    NaN without a validation split). Logged at the run's last step."""
    distributed, precision = checkpoints.distributed, cfg.trainer.precision
    test = evaluate_split(forward, loaders.test, distributed, precision, loaders.eval_batches)
    at_best = {"loss": math.nan, "acc": math.nan}
    if loaders.val is not None and state.best.get("step") == state.step:
        at_best = test  # the final model is the best one (by step: a run may end mid-epoch)
    elif loaders.val is not None:
        distributed.load_state(state.model, load_checkpoint(checkpoints.run_dir / BEST)["model"])
        at_best = evaluate_split(forward, loaders.test, distributed, precision, loaders.eval_batches)
    metrics = {"test/loss": test["loss"], "test/acc": test["acc"]}
    if loaders.val is not None:
        metrics.update({"test/loss_at_best_val": at_best["loss"], "test/acc_at_best_val": at_best["acc"]})
    checkpoints.telemetry.log(state.step, epochs, metrics)
    checkpoints.telemetry.commit()
    return test, at_best


def epoch_line(epoch: int, epochs: int, step: int, latest: Optional[dict], last_eval: Optional[dict]) -> str:
    trained = "" if not latest else (
        f"train loss {latest['train/loss']:.4f} acc {latest['train/acc']:.2%} "
        f"({latest['train/throughput']:.0f} img/s)  "
    )  # fmt: skip
    validated = "" if last_eval is None else f"val loss {last_eval['loss']:.4f} acc {100 * last_eval['acc']:.2f}%"
    return f"epoch {epoch}/{epochs}  step {step}  {trained}{validated}"


def train(
    cfg: DictConfig, run_dir: Path, *, wandb_group: Optional[str] = None, wandb_name: Optional[str] = None,
    on_claim: Optional[Callable[[Path], None]] = None,
) -> Summary:  # fmt: skip
    """Train the run ``cfg`` describes in ``run_dir``, resuming from its ``last.pt`` if there is one.
    ``on_claim(run_dir)`` runs once this process holds the run directory (rank 0), before anything else is written
    there: ``python -m softmoe.train`` writes Hydra's ``.hydra/`` configs then."""
    validate_config(cfg)  # every key, before any data loads or any model is built
    config, trainer, run_dir = OmegaConf.to_container(cfg, resolve=True), cfg.trainer, Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    # torchrun: data parallel (and expert parallel) on this rank's device; else this one process
    distributed = Distributed.from_config(cfg)
    device = distributed.device
    warn_if_slow(device, trainer.precision)  # bf16 on a CPU without native bf16
    cleanup = contextlib.ExitStack()  # closed last, however the run ends: handlers, W&B, the run directory's lock
    try:
        lock = distributed.claim_run_dir(run_dir)  # one process per run directory (rank 0 holds the lock)
        if lock is not None:
            cleanup.callback(lock.release)
            if on_claim is not None:
                on_claim(run_dir)
        checkpoint, start_from = resume_checkpoint(run_dir, trainer.resume, config)
        seed_everything(cfg.seed)

        # Data. Epoch e's order is drawn from seed + e, so a resumed run skips what it has seen without loading it.
        data = build_datasets(cfg.data, cfg.paths.data_dir)
        loaders = distributed.build_loaders(data, trainer, cfg.seed)  # this rank's share of every batch
        steps_per_epoch, total_steps = planned_steps(config["trainer"], len(data.train))
        if steps_per_epoch == 0:  # only for datasets whose size was unknown before they were scanned
            raise ConfigError(
                f"trainer.batch_size={trainer.batch_size}: larger than the {len(data.train)} training examples"
            )
        epochs = math.ceil(total_steps / steps_per_epoch)

        state, forward = build_state(cfg, config, distributed, total_steps)
        model = state.model
        log_plan(cfg, data, model, total_steps, steps_per_epoch)
        if checkpoint is not None:
            state.load_state_dict(checkpoint, distributed)  # expert parallel: this rank's experts
            if start_from.parent != run_dir:  # trainer.resume: that run's best.pt stays there; select anew here
                state.best = dict(NO_BEST)
            log.info("resuming from %s at step %d of %d", start_from, state.step, total_steps)
        telemetry = distributed.telemetry(  # written by rank 0, from metrics averaged over the ranks
            Telemetry, run_dir, config["logger"], config, resume_step=state.step,
            run_id=checkpoint["wandb_run_id"] if checkpoint is not None else None, group=wandb_group, name=wandb_name,
        )  # fmt: skip
        cleanup.callback(telemetry.finish)
        checkpoints = Checkpoints(run_dir, config, distributed, telemetry)
        if checkpoint is not None:
            set_rng_state(checkpoint["rng"])  # last: building the model and starting W&B may draw from the RNGs
        # The dispatch-map panel shows this image at every evaluation (a picture of the routing, not a selection).
        panel_image = (data.val if data.val is not None else data.test)[0][0]
        draw_panel = bool(moe_layers(model)) and telemetry.logs_images
        if data.skipped and checkpoint is None:
            telemetry.log(0, 1, {"data/skipped_examples": data.skipped})
        # Ctrl-C, SIGTERM, SIGUSR1, SIGUSR2: finish the step, save last.pt, raise Preempted (faults.py).
        preemption = PreemptionGuard().install()
        cleanup.callback(preemption.restore)
        show_progress = trainer.progress_bar and sys.stderr.isatty()
        latest = None  # the last logged training metrics

        while state.step < total_steps:
            epoch = state.step // steps_per_epoch  # 0-based; logs and messages count from 1
            loaders.sampler.set_epoch(epoch, skip=(state.step % steps_per_epoch) * trainer.batch_size)
            loaders.train.generator.manual_seed(cfg.seed + epoch)  # worker processes' seeds, per epoch
            model.train()
            bar = tqdm(loaders.train, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not show_progress)
            started = time.perf_counter()
            for images, labels in bar:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                log_now = every(state.step + 1, trainer.log_every)
                out = train_step(state, forward, images, labels, cfg, distributed, record_routing=log_now,
                                 started=started)  # fmt: skip
                if log_now:
                    latest = log_training(telemetry, state, out, epoch) or latest
                    show_on_bar(bar, latest)
                if state.step % steps_per_epoch == 0 or state.step == total_steps:
                    break  # the epoch's end (or the run's): validated, saved and checked below
                checkpoint_or_stop(state, checkpoints, preemption, due=every(state.step, trainer.checkpoint_every))
                started = time.perf_counter()
            bar.close()

            # Validate at the end of every epoch (and of a run that stops mid-epoch), keep the best, write last.pt.
            panel = dispatch_panel(model, panel_image, device) if draw_panel else None
            images = {} if panel is None else {"val/dispatch_maps": panel}
            validate(state, forward, loaders, cfg, checkpoints, epoch, images)
            validated = state.last_eval if loaders.val is not None else None
            log.info(epoch_line(epoch + 1, epochs, state.step, latest, validated))  # before a stop, too
            checkpoint_or_stop(state, checkpoints, preemption, due=False, saved=True,
                               last_step=state.step == total_steps)  # fmt: skip

        test, test_at_best = test_final_and_best(state, forward, loaders, cfg, checkpoints, epochs)
        summary = Summary(
            test_acc=test["acc"],
            test_loss=test["loss"],
            val_acc=state.last_eval["acc"] if loaders.val is not None else math.nan,
            best_val_acc=state.best["acc"] if loaders.val is not None else math.nan,
            best_val_epoch=state.best["epoch"],
            test_acc_at_best_val=test_at_best["acc"],
            steps=state.step,
            run_dir=str(run_dir),
            wandb_run_path=telemetry.run_path,
            skipped_steps=state.nonfinite.skipped,
            skipped_examples=data.skipped,
        )
        telemetry.summary({f"summary/{key}": value for key, value in asdict(summary).items() if key in SUMMARY_KEYS})
        return summary
    finally:
        cleanup.close()


# The Summary fields sent to the W&B run summary (as summary/<field>).
SUMMARY_KEYS = (
    "test_acc", "test_loss", "val_acc", "best_val_acc", "best_val_epoch", "test_acc_at_best_val", "skipped_steps",
    "skipped_examples",
)  # fmt: skip
