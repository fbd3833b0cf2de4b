"""The training loop: a composed config in, a trained run directory out. Read it top to bottom.

    summary = train(cfg, run_dir)   # what `python -m softmoe.train` runs inside its Hydra job

The run directory receives ``metrics.jsonl``, ``last.pt`` (after every evaluation, and every
``trainer.checkpoint_every`` steps), ``best.pt`` (best test accuracy) and W&B's files. A run directory
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
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm import tqdm

from softmoe import capture_routing, moe_layers
from softmoe.sparse import SparseMoE, auxiliary_loss

from .checkpoint import (
    BEST,
    FORMAT_VERSION,
    LAST,
    check_same_model,
    load_resume_checkpoint,
    resume_path,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import ConfigError, planned_steps, validate_config
from .data import build_datasets, build_loader
from .distributed import Distributed
from .faults import NonFiniteError, NonFiniteGuard, Preempted, PreemptionGuard, first_nonfinite
from .model import build_model
from .optim import build_optimizer, build_scheduler
from .precision import autocast, warn_if_slow
from .telemetry import Telemetry, dispatch_maps, routing_metrics

log = logging.getLogger(__name__)


@dataclass
class Summary:
    """What a finished run reports (and ``python -m softmoe.train`` prints)."""

    test_acc: float  # the final model's top-1 accuracy on the test split
    test_loss: float
    best_acc: float  # the best test accuracy over the evaluations, and when
    best_epoch: int
    steps: int
    run_dir: str
    wandb_run_path: Optional[str]
    skipped_steps: int = 0  # steps dropped for a NaN/inf loss or gradient (trainer.nonfinite=skip)
    skipped_examples: int = 0  # bad examples dropped by data.on_bad_file=skip


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every device


class TrainWindow:
    """Training loss, accuracy and throughput over the steps since the last log event.

    Sums stay on the device, so a step that does not log never waits for the accelerator.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self.correct = torch.zeros((), device=self.device, dtype=torch.int64)
        self.seen = 0
        self.seconds = 0.0

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, seconds: float) -> None:
        self.loss_sum += loss.detach() * len(labels)
        self.correct += (logits.detach().argmax(dim=-1) == labels).sum()
        self.seen += len(labels)
        self.seconds += seconds

    def pop(self) -> dict[str, float]:
        """The window's metrics (``train/loss`` is the label-smoothed loss the optimizer sees); starts a new window."""
        metrics = {
            "train/loss": self.loss_sum.item() / self.seen,
            "train/acc": self.correct.item() / self.seen,
            "train/throughput": self.seen / max(self.seconds, 1e-9),
        }
        self.reset()
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"loss_sum": self.loss_sum.item(), "correct": self.correct.item(), "seen": self.seen, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loss_sum.fill_(state["loss_sum"])
        self.correct.fill_(state["correct"])
        self.seen, self.seconds = state["seen"], state["seconds"]


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


def train(
    cfg: DictConfig, run_dir: Path, *, wandb_group: Optional[str] = None, wandb_name: Optional[str] = None
) -> Summary:
    """Train the run ``cfg`` describes in ``run_dir``, resuming from its ``last.pt`` if there is one."""
    validate_config(cfg)  # every key, before any data loads or any model is built
    config = OmegaConf.to_container(cfg, resolve=True)
    trainer = cfg.trainer
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    # torchrun: data parallel (and expert parallel) on this rank's device; else this one process
    distributed = Distributed.from_config(cfg)
    distributed.check_same_run_dir(run_dir)
    device = distributed.device
    warn_if_slow(device, trainer.precision)  # bf16 on a CPU without native bf16

    # Where the run starts: this directory's last.pt, else trainer.resume, else from scratch.
    start_from = resume_path(run_dir, trainer.resume)
    # A damaged last.pt falls back to the last.prev.pt kept beside it (load_resume_checkpoint says so).
    checkpoint, start_from = load_resume_checkpoint(start_from) if start_from else (None, None)
    if checkpoint is not None:
        check_same_model(checkpoint, config, start_from)
    seed_everything(cfg.seed)

    # Data. Epoch e's order is drawn from seed + e, so a resumed run skips what it has seen without loading it.
    data = build_datasets(cfg.data, cfg.paths.data_dir)
    sampler = distributed.train_sampler(len(data.train), cfg.seed, trainer.batch_size)  # this rank's share of each batch
    pin = device.type == "cuda"
    train_loader = build_loader(
        data.train, distributed.local_batch_size(trainer.batch_size), train=True, num_workers=trainer.num_workers, seed=cfg.seed, sampler=sampler, pin_memory=pin
    )
    test_loader, eval_batches = distributed.test_loader(
        data.test, trainer.eval_batch_size, trainer.eval_batches, num_workers=trainer.num_workers, pin_memory=pin
    )
    steps_per_epoch, total_steps = planned_steps(config["trainer"], len(data.train))
    if steps_per_epoch == 0:  # only for datasets whose size was unknown before they were scanned
        raise ConfigError(f"trainer.batch_size={trainer.batch_size}: larger than the {len(data.train)} training examples")
    epochs = math.ceil(total_steps / steps_per_epoch)

    # Model, optimizer (weight decay by parameter name), learning-rate schedule, loss scaling for fp16.
    model = distributed.prepare(build_model(config["model"], config["moe"]).to(device))  # expert parallel: local experts
    optimizer = build_optimizer(cfg.optimizer, model)
    scheduler = build_scheduler(cfg.scheduler, optimizer, total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=trainer.precision == "fp16")
    forward = distributed.wrap(model)  # DDP when data parallel; `model` stays the plain module
    forward = torch.compile(forward) if trainer.compile else forward
    clip_norm = trainer.grad_clip_norm or math.inf
    nonfinite = NonFiniteGuard(trainer.nonfinite, trainer.max_nonfinite_skips)  # NaN/inf steps: skip or stop
    moe_blocks = [int(name.split(".")[1]) for name in moe_layers(model)]
    sparse_router = any(isinstance(layer, SparseMoE) for layer in moe_layers(model).values())
    log.info(
        "model: %s, %s, %.2fM parameters; data=%s: %d train / %d test images; %d steps, %d per epoch",
        cfg.model.name,
        f"MoE (router={cfg.moe.router}) in blocks {moe_blocks}" if moe_blocks else "dense",
        sum(p.numel() for p in model.parameters()) / 1e6,
        data.name,
        len(data.train),
        len(data.test),
        total_steps,
        steps_per_epoch,
    )

    step, window, latest = 0, TrainWindow(device), {}  # latest: the last logged training metrics
    best = {"acc": -1.0, "epoch": 0}
    last_eval = {"loss": math.nan, "acc": math.nan}
    if checkpoint is not None:
        distributed.load_model_state_dict(model, checkpoint["model"])  # expert parallel: this rank's experts
        distributed.load_optimizer_state_dict(optimizer, model, checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        scaler.load_state_dict(checkpoint["scaler"])
        window.load_state_dict(checkpoint["window"])
        step, best, last_eval = checkpoint["step"], checkpoint["best"], checkpoint["last_eval"]
        nonfinite.load_state_dict(checkpoint.get("nonfinite", nonfinite.state_dict()))
        log.info("resuming from %s at step %d of %d", start_from, step, total_steps)

    telemetry = distributed.telemetry(  # written by rank 0, from metrics averaged over the ranks
        Telemetry,
        run_dir,
        config["logger"],
        config,
        resume_step=step,
        run_id=checkpoint["wandb_run_id"] if checkpoint is not None else None,
        group=wandb_group,
        name=wandb_name,
    )
    if checkpoint is not None:
        set_rng_state(checkpoint["rng"])  # last: building the model and starting W&B may draw from the RNGs
    panel_image = data.test[0][0]  # the dispatch-map panel shows this test image at every evaluation

    def save(name: str) -> None:
        bad = first_nonfinite(model.state_dict().items())  # a NaN weight never reaches a checkpoint
        if bad is not None:
            raise NonFiniteError(f"step {step}: {bad} is not finite; {name} not written, the previous one is kept")
        # The single-process state dicts: under expert parallelism every rank sends its experts to rank 0.
        model_state = distributed.model_state_dict(model)
        optimizer_state = distributed.optimizer_state_dict(optimizer, model)
        if not distributed.is_main:  # rank 0 alone writes the run directory
            return
        save_checkpoint(
            run_dir / name,
            {
                "format": FORMAT_VERSION,
                "step": step,
                "model": model_state,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_state(),
                "window": window.state_dict(),
                "best": best,
                "last_eval": last_eval,
                "config": json.dumps(config),
                "wandb_run_id": telemetry.run_id,
                "nonfinite": nonfinite.state_dict(),
            },
            keep_previous=name == LAST,
        )

    show_progress = trainer.progress_bar and sys.stderr.isatty()
    if data.skipped and checkpoint is None:
        telemetry.log(0, 1, {"data/skipped_examples": data.skipped})
    # SIGTERM/SIGUSR1/SIGUSR2 end the current step, save last.pt and raise Preempted (softmoe/harness/faults.py).
    preemption = PreemptionGuard().install()
    try:
        while step < total_steps:
            epoch = step // steps_per_epoch  # 0-based; logs and messages count from 1
            sampler.set_epoch(epoch, skip=(step % steps_per_epoch) * trainer.batch_size)
            train_loader.generator.manual_seed(cfg.seed + epoch)  # worker processes' seeds, per epoch
            model.train()
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not show_progress)
            tick = time.perf_counter()
            for images, labels in bar:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                log_now = (step + 1) % trainer.log_every == 0
                # Routing is recorded on logging steps only, from this same forward pass.
                with autocast(device, trainer.precision), (
                    capture_routing(model) if log_now else contextlib.nullcontext({})
                ) as routing:
                    logits = forward(images).float()
                    loss = F.cross_entropy(logits, labels, label_smoothing=trainer.label_smoothing)
                    aux_loss = auxiliary_loss(model)  # Tokens Choice's load-balancing losses; 0 for other routers
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss + cfg.moe.aux_loss_weight * aux_loss).backward()
                scaler.unscale_(optimizer)
                grad_norm = distributed.clip_grad_norm_(model, clip_norm)  # over every rank's experts
                # fp16: the GradScaler skips inf gradients itself (and lowers its scale); only the loss is ours to check
                if nonfinite.step_is_finite(step + 1, loss, 0.0 if scaler.is_enabled() else grad_norm, model):
                    scaler.step(optimizer)
                    window.add(loss, logits, labels, seconds=time.perf_counter() - tick)
                scaler.update()
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                scheduler.step()
                step += 1

                if log_now:
                    scalars = {**(window.pop() if window.seen else {}), "train/lr": lr, "train/grad_norm": grad_norm.item()}
                    if "train/loss" in scalars:  # else every step since the last event was skipped
                        latest = scalars
                    if nonfinite.skipped:
                        scalars["train/skipped_steps"] = nonfinite.skipped
                    if sparse_router:
                        scalars["train/aux_loss"] = aux_loss.item()  # this step's, before aux_loss_weight
                    routing_scalars, distributions = routing_metrics(model, routing)
                    telemetry.log(step, epoch + 1, {**scalars, **routing_scalars}, distributions)
                    if latest:
                        bar.set_postfix(
                            loss=f"{latest['train/loss']:.3f}",
                            acc=f"{latest['train/acc']:.1%}",
                            img_s=f"{latest['train/throughput']:.0f}",
                        )
                mid_epoch = step % steps_per_epoch != 0 and step < total_steps
                distributed.share_signal(preemption)  # a signal to any rank stops every rank at this step
                if trainer.checkpoint_every and step % trainer.checkpoint_every == 0 and mid_epoch:
                    save(LAST)
                    telemetry.commit()
                if preemption.requested and mid_epoch:  # at an epoch's end, after its evaluation below
                    save(LAST)
                    telemetry.commit()
                    raise Preempted(preemption.requested, step, preemption.handover())
                if step == total_steps:
                    break
                tick = time.perf_counter()
            bar.close()

            # Evaluate at the end of every epoch (and of a run that stops mid-epoch), then checkpoint.
            last_eval = distributed.reduce_eval(evaluate(forward, test_loader, device, trainer.precision, eval_batches), test_loader)
            images = {}
            panel = dispatch_panel(model, panel_image, device) if moe_blocks and telemetry.logs_images else None
            if panel is not None:
                images["val/dispatch_maps"] = panel
            telemetry.log(step, epoch + 1, {"val/loss": last_eval["loss"], "val/acc": last_eval["acc"]}, images=images)
            if last_eval["acc"] > best["acc"]:
                best = {"acc": last_eval["acc"], "epoch": epoch + 1}
                save(BEST)
            save(LAST)
            telemetry.commit()
            distributed.share_signal(preemption)
            if preemption.requested and step < total_steps:
                raise Preempted(preemption.requested, step, preemption.handover())
            trained = (
                f"train loss {latest['train/loss']:.4f} acc {latest['train/acc']:.2%} "
                f"({latest['train/throughput']:.0f} img/s)  "
                if latest
                else ""
            )
            log.info(
                "epoch %d/%d  step %d  %stest loss %.4f acc %.2f%%",
                epoch + 1,
                epochs,
                step,
                trained,
                last_eval["loss"],
                100 * last_eval["acc"],
            )

        summary = Summary(
            test_acc=last_eval["acc"],
            test_loss=last_eval["loss"],
            best_acc=best["acc"],
            best_epoch=best["epoch"],
            steps=step,
            run_dir=str(run_dir),
            wandb_run_path=telemetry.run_path,
            skipped_steps=nonfinite.skipped,
            skipped_examples=data.skipped,
        )
        telemetry.summary({f"summary/{key}": value for key, value in asdict(summary).items() if key.endswith(("acc", "loss", "epoch", "skipped_steps", "skipped_examples"))})
    finally:
        preemption.restore()
        telemetry.finish()
    return summary
