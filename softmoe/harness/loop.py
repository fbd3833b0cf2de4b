"""The training loop: a composed config in, a trained run directory out. Read :func:`train` top to bottom.

    summary = train(cfg, run_dir)   # what `python -m softmoe.train` runs inside its Hydra job

:func:`train` opens the run (:func:`~.context.open_run`: the run's fixed parts in a :class:`~.context.RunContext`,
its changing part in a :class:`~.state.TrainState`), then repeats :func:`train_step` (the learning algorithm:
forward, backward, clip, update) with the periodic work around it: log every ``trainer.log_every`` steps,
checkpoint every ``trainer.checkpoint_every`` steps and after each epoch's validation, stop cleanly on a
preemption signal or Ctrl-C.

The run directory receives ``metrics.jsonl``, ``last.pt`` (after every evaluation, and every
``trainer.checkpoint_every`` steps), ``best.pt`` (best validation accuracy) and W&B's files.

Model selection reads the validation split alone (``val/*``, held out of the training data). The test
split (``test/*``) is evaluated once, when training ends: for the final model and for ``best.pt``. A run directory
that already holds ``last.pt`` continues from it: same weights, optimizer, schedule, data order, RNG
streams and W&B run, so the resumed run ends exactly where an uninterrupted one would (on CPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from softmoe import capture_routing, moe_layers
from softmoe.sparse import SparseMoE, auxiliary_loss

from .checkpoint import BEST
from .config import check_config
from .context import RunContext, open_run
from .distributed import Distributed
from .errors import CheckpointError, one_line
from .faults import Preempted
from .losses import classification_loss
from .precision import autocast, warn_if_slow
from .rules import plain
from .state import SUMMARY_KEYS, Summary, TrainState, no_validation_reason
from .telemetry import METRICS_FILE, RankZeroTelemetry, dispatch_maps, routing_metrics, json_lines

log = logging.getLogger(__name__)


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
    """The dispatch maps of every MoE block for one image (see :func:`telemetry.dispatch_maps`); None for a model
    with no MoE block."""
    was_training = model.training
    model.eval()
    with capture_routing(model) as records:
        model(image[None].to(device))
    model.train(was_training)
    return dispatch_maps(image, records, model) if records else None


def every(step: int, interval: Optional[int]) -> bool:
    """Whether work done every ``interval`` steps falls due at ``step`` (1-based); never for a null interval."""
    return bool(interval) and step % interval == 0


@dataclass
class StepOutput:
    """What a training step leaves for the logging: its learning rate, gradient norm, auxiliary loss, routing."""

    lr: float
    grad_norm: torch.Tensor
    aux_loss: torch.Tensor
    routing: dict[str, Any]  # the forward pass's routing records (logging steps only)


@dataclass(frozen=True)
class StepSettings:
    """The settings :func:`train_step` reads: how the loss is computed and the gradient clipped."""

    precision: str  # trainer.precision: fp32, or bf16/fp16 autocast
    loss: str  # trainer.loss: softmax or sigmoid cross-entropy (losses.py)
    label_smoothing: float
    grad_clip_norm: Optional[float]  # null: no clipping
    aux_loss_weight: float  # moe.aux_loss_weight: Tokens Choice's load-balancing losses

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "StepSettings":
        trainer = config["trainer"]
        return cls(
            precision=trainer["precision"],
            loss=trainer.get("loss", "softmax"),  # a checkpoint's config from before the key
            label_smoothing=trainer["label_smoothing"],
            grad_clip_norm=trainer["grad_clip_norm"],
            aux_loss_weight=config["moe"]["aux_loss_weight"],
        )


def train_step(
    state: TrainState,
    forward: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: StepSettings,
    distributed: Distributed,
    *,
    record_routing: bool,
    started: float,
) -> StepOutput:
    """One optimizer step on a batch: forward, loss, backward, clip; the update unless a number is not finite."""
    model, scaler = state.model, state.scaler
    # Routing is recorded on logging steps only, from this same forward pass.
    with autocast(distributed.device, settings.precision), (
        capture_routing(model) if record_routing else contextlib.nullcontext({})
    ) as routing:
        logits = forward(images).float()
        loss = classification_loss(logits, labels, settings.loss, settings.label_smoothing)
        aux_loss = auxiliary_loss(model)  # Tokens Choice's load-balancing losses; 0 for other routers
    state.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss + settings.aux_loss_weight * aux_loss).backward()
    distributed.average_expert_grads(model)  # over the data-parallel copies of this rank's experts (2-D mesh)
    scaler.unscale_(state.optimizer)
    grad_norm = distributed.clip_grad_norm_(model, settings.grad_clip_norm or math.inf)  # over every rank's experts
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
    # A skipped first step (a NaN loss) never called optimizer.step(); the schedule still moves on, as for any skipped
    # step, and torch's warning about it (given at a scheduler's first step only) is dropped. Only then: a
    # catch_warnings() resets the registry that shows every other warning once, and around every step it made
    # torch's FSDP2 warnings come at every step on every rank. (The two attributes torch itself reads.)
    if getattr(state.scheduler, "_step_count", 0) == 1 and not getattr(state.optimizer, "_opt_called", False):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler.step\(\)` before", UserWarning)
            state.scheduler.step()
    else:
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
    logged = telemetry.log(state.step, epoch + 1, {**scalars, **routing_scalars}, distributions)
    # the console's figures are the logged ones: averaged over the ranks (throughput summed), not rank 0's own
    return {**{key: logged[key] for key in scalars}, "step": state.step} if "train/loss" in scalars else None


def evaluate_split(run: RunContext, loader) -> dict[str, float]:
    """:func:`evaluate` on every rank's share of a split, reduced to the metrics of the whole split."""
    metrics = evaluate(run.forward, loader, run.distributed.device, run.precision, run.loaders.eval_batches)
    return run.distributed.reduce_eval(metrics, loader)


def stop_if_signalled(run: RunContext, state: TrainState, *, saved: bool) -> None:
    """The end of a step, on every rank alike: if any rank received a preemption signal or Ctrl-C, make sure
    ``last.pt`` holds this step (``saved``: it already does) and raise :class:`Preempted`. After the run's last
    step a signal changes nothing: the run ends."""
    preemption = run.preemption
    preemption.check_stop_requested()
    run.distributed.share_signal(preemption)  # a signal to any rank stops every rank at this step
    if preemption.requested is None or state.step == run.total_steps:
        return
    if not saved:
        run.save_last(state)
    raise Preempted(preemption.requested, state.step, preemption.handover(), preemption.checkpoint)


def close_epoch(run: RunContext, state: TrainState, epoch: int) -> None:
    """The end of an epoch (or of a run that stops mid-epoch): validate, keep the best (``best.pt``), log, write
    ``last.pt``."""
    panel = None if run.panel_image is None else dispatch_panel(state.model, run.panel_image, run.distributed.device)
    images = {} if panel is None else {"val/dispatch_maps": panel}
    if run.loaders.val is not None:
        state.last_eval = evaluate_split(run, run.loaders.val)
        metrics = {"val/loss": state.last_eval["loss"], "val/acc": state.last_eval["acc"]}
        run.telemetry.log(state.step, epoch + 1, metrics, images=images)
        if state.last_eval["acc"] > state.best["acc"]:
            state.best = {"acc": state.last_eval["acc"], "epoch": epoch + 1, "step": state.step}
            run.save(state, BEST)
    elif images:
        run.telemetry.log(state.step, epoch + 1, {}, images=images)
    run.save_last(state)


def test_final_and_best(run: RunContext, state: TrainState) -> tuple[dict[str, float], dict[str, float]]:
    """The test split, once: (the final model's metrics, those of ``best.pt``, the best-on-validation checkpoint;
    NaN without a validation split). Logged at the run's last step."""
    loaders = run.loaders
    test = evaluate_split(run, loaders.test)
    at_best = {"loss": math.nan, "acc": math.nan}
    if loaders.val is not None and state.best.get("step") == state.step:
        at_best = test  # the final model is the best one (by step: a run may end mid-epoch)
    elif loaders.val is not None:
        try:
            run.distributed.load_state(state.model, run.best_model())
        except CheckpointError as error:  # damaged or gone since it was written: no rerun could write it again
            log.warning("%s; the final model alone is tested (test/acc_at_best_val: NaN)", one_line(error))
        else:
            at_best = evaluate_split(run, loaders.test)
    metrics = {"test/loss": test["loss"], "test/acc": test["acc"]}
    if loaders.val is not None:
        metrics.update({"test/loss_at_best_val": at_best["loss"], "test/acc_at_best_val": at_best["acc"]})
    run.telemetry.log(state.step, run.epochs, metrics)
    run.telemetry.commit()
    return test, at_best


def logged_test(run: RunContext, state: TrainState) -> Optional[tuple[dict[str, float], dict[str, float]]]:
    """The test results the run logged at ``state.step``, as :func:`test_final_and_best` returns them: a finished
    run's command run again finds them; None when they were never logged (a run stopped while testing)."""
    metrics = run.run_dir / METRICS_FILE
    logged = [event for event in json_lines(metrics) if event.get("step") == state.step and "test/acc" in event] \
        if metrics.is_file() else []
    if not logged:
        return None
    return tuple({"loss": logged[-1].get(f"test/loss{at}", math.nan), "acc": logged[-1].get(f"test/acc{at}", math.nan)}
                 for at in ("", "_at_best_val"))


def show_on_bar(bar: tqdm, latest: Optional[dict]) -> None:
    """The progress bar's figures: the last logged training metrics (none before the first)."""
    if latest:
        bar.set_postfix(loss=f"{latest['train/loss']:.3f}", acc=f"{latest['train/acc']:.1%}",
                        img_s=f"{latest['train/throughput']:.0f}")


def epoch_line(epoch: int, epochs: int, step: int, latest: Optional[dict], last_eval: Optional[dict],
               epoch_start: int = 0, log_every: Optional[int] = None) -> str:
    """The console's line for an epoch that ended at ``step``. The training figures are the last logged ones; when
    that log came before ``epoch_start`` (an epoch shorter than ``trainer.log_every``) the line names its step, so a
    figure repeated from an earlier epoch does not read as this epoch's. With neither training figures nor a
    validation (``data.val_size=0``) it says why, rather than end after the step."""
    parts = [f"epoch {epoch}/{epochs}", f"step {step}"]
    if latest:
        logged = "" if latest["step"] > epoch_start else f", as logged at step {latest['step']}"
        parts.append(f"train loss {latest['train/loss']:.4f} acc {latest['train/acc']:.2%} "
                     f"({latest['train/throughput']:.0f} img/s{logged})")
    if last_eval is not None:
        parts.append(f"val loss {last_eval['loss']:.4f} acc {100 * last_eval['acc']:.2f}%")
    if not latest and last_eval is None:
        every = "" if log_every is None else f" (trainer.log_every={log_every})"
        parts.append(f"no training step logged{every} and no validation split")
    return "  ".join(parts)


def train_epoch(run: RunContext, state: TrainState, epoch: int, latest: Optional[dict]) -> Optional[dict]:
    """Train from ``state.step`` to the end of ``epoch`` (0-based) or of the run, logging and checkpointing as due;
    returns the last logged training metrics (``latest`` when this epoch logged none)."""
    trainer, loaders, device = run.trainer, run.loaders, run.distributed.device
    settings = StepSettings.from_config(run.config)
    loaders.sampler.set_epoch(epoch, skip=(state.step % run.steps_per_epoch) * trainer["batch_size"])
    loaders.train.generator.manual_seed(run.config["seed"] + epoch)  # worker processes' seeds, per epoch
    state.model.train()
    show_progress = trainer["progress_bar"] and sys.stderr.isatty()
    bar = tqdm(loaders.train, desc=f"epoch {epoch + 1}/{run.epochs}", leave=False, disable=not show_progress)
    started = time.perf_counter()
    for images, labels in bar:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        log_now = every(state.step + 1, trainer["log_every"])
        out = train_step(state, run.forward, images, labels, settings, run.distributed, record_routing=log_now,
                         started=started)
        if log_now:
            latest = log_training(run.telemetry, state, out, epoch) or latest
            show_on_bar(bar, latest)
        if state.step % run.steps_per_epoch == 0 or state.step == run.total_steps:
            break  # the epoch's end (or the run's): validated, saved and checked by the caller
        due = every(state.step, trainer["checkpoint_every"])
        if due:
            run.save_last(state)
        stop_if_signalled(run, state, saved=due)
        started = time.perf_counter()
    bar.close()
    return latest


def summarize(run: RunContext, state: TrainState, test: dict, test_at_best: dict) -> Summary:
    """The finished run's :class:`Summary`, also sent to the W&B run summary."""
    validated = run.loaders.val is not None
    summary = Summary(
        test_acc=test["acc"],
        test_loss=test["loss"],
        val_acc=state.last_eval["acc"] if validated else math.nan,
        best_val_acc=state.best["acc"] if validated else math.nan,
        best_val_epoch=state.best["epoch"],
        test_acc_at_best_val=test_at_best["acc"],
        steps=state.step,
        run_dir=str(run.run_dir),
        wandb_run_path=run.telemetry.run_path,
        skipped_steps=state.nonfinite.skipped,
        skipped_examples=run.skipped_examples,
        no_validation=no_validation_reason(run.config["data"]["val_size"]),  # a fraction may round to no image
        evaluated=run.evaluated,
    )
    run.telemetry.summary({f"summary/{key}": value for key, value in asdict(summary).items() if key in SUMMARY_KEYS})
    return summary


def train(
    cfg: DictConfig, run_dir: Path, *, wandb_group: Optional[str] = None, wandb_name: Optional[str] = None,
    on_claim: Optional[Callable[[Path], None]] = None,
) -> Summary:
    """Train the run ``cfg`` describes in ``run_dir``, resuming from its ``last.pt`` if there is one.
    ``on_claim(run_dir)`` runs once this process holds the run directory (rank 0), before anything else is written
    there: ``python -m softmoe.train`` writes Hydra's ``.hydra/`` configs then."""
    check_config(cfg)  # every key, before any data loads or any model is built
    config, run_dir = plain(cfg), Path(run_dir)  # the run reads the resolved plain config from here on
    run_dir.mkdir(parents=True, exist_ok=True)
    if config["trainer"]["num_threads"]:
        torch.set_num_threads(config["trainer"]["num_threads"])
    # torchrun: data parallel (and expert parallel) on this rank's device; else this one process
    distributed = Distributed.from_config(config)
    warn_if_slow(distributed.device, config["trainer"]["precision"])  # bf16 on a CPU without native bf16
    # closed last, however the run ends: signal handlers, W&B, the run directory's lock
    with contextlib.ExitStack() as cleanup:
        run, state = open_run(config, run_dir, distributed, cleanup, wandb_group=wandb_group, wandb_name=wandb_name,
                              on_claim=on_claim)
        latest = None  # the last logged training metrics
        tested = logged_test(run, state) if state.step >= run.total_steps else None
        if tested:  # the test split is evaluated and logged once per run
            log.info("%s finished already, at step %d: its test results are those it logged then", run_dir, state.step)
        while state.step < run.total_steps:
            epoch = state.step // run.steps_per_epoch  # 0-based; logs and messages count from 1
            latest = train_epoch(run, state, epoch, latest)
            # Validate at the end of every epoch (and of a run that stops mid-epoch), keep the best, write last.pt.
            close_epoch(run, state, epoch)
            validated = state.last_eval if run.loaders.val is not None else None
            log.info(epoch_line(epoch + 1, run.epochs, state.step, latest, validated,  # before a stop, too
                                epoch_start=epoch * run.steps_per_epoch, log_every=run.trainer["log_every"]))
            stop_if_signalled(run, state, saved=True)
        run.preemption.trained = True  # a signal from here on stops nothing: the test ends the run
        test, test_at_best = tested or test_final_and_best(run, state)
        return summarize(run, state, test, test_at_best)
