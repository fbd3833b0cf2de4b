"""What a run accumulates and what a checkpoint restores.

:class:`TrainState` is everything ``last.pt`` holds to continue a run exactly: the model, optimizer, schedule,
loss scaling, the training metrics not yet logged (:class:`TrainWindow`), the NaN/inf skip counts and the loop's
counters. :class:`Summary` is what a finished run reports.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .distributed import Distributed
from .faults import NonFiniteGuard
from .meta_init import build_local_shards
from .model import build_model
from .optim import build_optimizer, build_scheduler, keeping_kernel_choice
from .sharded_checkpoint import latest


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
    no_validation: str = "data.val_size=0"  # why there is no validation split (:func:`no_validation_reason`)
    evaluated: str = ""  # the images the accuracies are of, where trainer.eval_batches left some out

    def describe(self) -> str:
        """The result in one line: test accuracy of the final model and of the best-on-validation checkpoint."""
        final = f"test accuracy {100 * self.test_acc:.2f}% (final model)"
        of = f" on {self.evaluated}" if self.evaluated else ""
        if math.isnan(self.best_val_acc):
            return f"{final}{of}; no validation split ({self.no_validation}), so no checkpoint was selected"
        best = latest(Path(self.run_dir), "best.pt") if self.run_dir else None  # best.dcp under FSDP
        name = best.name if best is not None else "best.pt"
        if math.isnan(self.test_acc_at_best_val):  # damaged or gone before the test (the run's warning says which)
            return (f"{final}{of}; {name} could not be tested (best validation accuracy {100 * self.best_val_acc:.2f}% "
                    f"at epoch {self.best_val_epoch})")
        return (
            f"{final}, {100 * self.test_acc_at_best_val:.2f}% ({name}: best validation accuracy "
            f"{100 * self.best_val_acc:.2f}% at epoch {self.best_val_epoch}){of}"
        )

def no_validation_reason(val_size: Any) -> str:
    """Why a run has no validation split, as its ``data.val_size`` says it: 0, or a fraction that rounds to no image."""
    return "data.val_size=0" if val_size == 0 else f"data.val_size={val_size} holds out 0 images"


class TrainWindow:
    """Training loss, accuracy and throughput over the steps since the last log event.

    Sums and counts stay on the device, so a step that does not log never waits for the accelerator.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        # float64, not an integer: a run resumed on another number of ranks gives each an equal share of the count
        self.correct = torch.zeros((), device=self.device, dtype=torch.float64)
        self.examples = torch.zeros((), device=self.device, dtype=torch.int64)
        self.seconds = 0.0

    def add(
        self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, seconds: float,
        applied: Optional[torch.Tensor] = None,
    ) -> None:
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

    def state_dict(self, distributed: Optional[Distributed] = None) -> dict[str, Any]:
        """This rank's window; under data parallelism also every rank's (``ranks``; gathered, so collective): each
        rank holds its own share of the batches since the last log event (rank 0's alone was saved, and every rank
        of the resumed run took it, so the first training metrics logged after a resume were off)."""
        state = {"loss_sum": self.loss_sum.item(), "correct": self.correct.item(), "seen": self.seen,
                 "seconds": self.seconds}
        if distributed is not None and distributed.data_parallel:
            mine = torch.tensor([state[key] for key in WINDOW_FIELDS], dtype=torch.float64, device=self.device)
            every = [torch.empty_like(mine) for _ in range(distributed.world_size)]
            torch.distributed.all_gather(every, mine)
            state["ranks"] = [dict(zip(WINDOW_FIELDS, values.tolist())) for values in every]
        return state

    def load_state_dict(self, state: dict[str, Any], distributed: Optional[Distributed] = None) -> None:
        """Continue the window ``state`` saved: on as many ranks as saved it, each rank its own; on another number,
        each an equal share of their sums (the logged means, over the ranks, are then those of all their batches),
        over the time they took. A checkpoint of one process, or from before ``ranks``, holds one window."""
        ranks = state.get("ranks")
        parallel = distributed is not None and distributed.data_parallel
        world_size, rank = (distributed.world_size, distributed.rank) if parallel else (1, 0)
        if ranks is not None and len(ranks) == world_size:
            state = ranks[rank]
        elif ranks is not None:
            shares = {key: sum(window[key] for window in ranks) / world_size for key in ("loss_sum", "correct", "seen")}
            state = {**shares, "seconds": sum(window["seconds"] for window in ranks) / len(ranks)}
        self.loss_sum.fill_(state["loss_sum"])
        self.correct.fill_(state["correct"])
        self.examples.fill_(round(state["seen"]))  # whole: the ranks divide the batch (a launch check)
        self.seconds = state["seconds"]


WINDOW_FIELDS = ("loss_sum", "correct", "seen", "seconds")


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
        window = self.window.state_dict(distributed)  # collective too: every rank's window
        if not distributed.is_main:
            return None
        return {
            "step": self.step,
            "model": model_state,
            "optimizer": optimizer_state,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "window": window,
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
        self.window.load_state_dict(checkpoint["window"], distributed)
        self.step, self.best, self.last_eval = checkpoint["step"], checkpoint["best"], checkpoint["last_eval"]
        self.nonfinite.load_state_dict(checkpoint.get("nonfinite", self.nonfinite.state_dict()))


def build_state(
    config: Mapping[str, Any], distributed: Distributed, total_steps: int, *, resuming: bool = False
) -> tuple[TrainState, nn.Module]:
    """A fresh :class:`TrainState` and what to call forward on: the model on this rank's device (expert parallel:
    its experts; FSDP: its shards; DDP-wrapped when data parallel), AdamW/SGD with weight decay by parameter name,
    the schedule, loss scaling for fp16, the NaN/inf guard. ``resuming``: a checkpoint is about to replace the
    weights (``trainer.init_device=meta`` then draws none)."""
    trainer, device = config["trainer"], distributed.device
    if trainer["init_device"] == "meta":  # no rank ever holds the whole model (meta_init.py)
        model = build_local_shards(config, distributed, draw=not resuming)
    else:  # every rank builds the whole model, then keeps its part of rank 0's
        model = build_model(config["model"], config["moe"]).to(device)
        model.set_grad_checkpointing(trainer["activation_checkpointing"])  # recompute each block in backward
        model = distributed.shard_model(model)
    forward = distributed.wrap_model(model, trainer["compile"])
    optimizer = build_optimizer(config["optimizer"], model, config["moe"])
    scaler = torch.amp.GradScaler(device.type, enabled=trainer["precision"] == "fp16")
    # fused AdamW/Adam/SGD take a found_inf flag (PyTorch sets this attribute on them for GradScaler); with fp16 the
    # GradScaler passes its own flag, so the loss check stays on the host
    on_device = getattr(optimizer, "_step_supports_amp_scaling", False) and not scaler.is_enabled()
    state = TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(config["scheduler"], optimizer, total_steps),
        scaler=scaler,
        window=TrainWindow(device),
        # NaN/inf steps: skip or stop, checked on the device when the optimizer can skip a step itself
        nonfinite=NonFiniteGuard(trainer["nonfinite"], trainer["max_nonfinite_skips"], device, on_device=on_device),
    )
    return state, forward


# The Summary fields sent to the W&B run summary (as summary/<field>).
SUMMARY_KEYS = (
    "test_acc", "test_loss", "val_acc", "best_val_acc", "best_val_epoch", "test_acc_at_best_val", "skipped_steps",
    "skipped_examples",
)
