"""A NaN or inf step never reaches the weights: checked on the host every step, or, with an optimizer that can
skip a step itself (``optimizer.fused=true``), on the device with no host read until the next log step.

Every run here is in-process, on 64 synthetic 8x8 images, one of which is NaN.
"""

import contextlib
import logging
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import train_killed_after
from softmoe.harness.checkpoint import load_checkpoint
from softmoe.harness.data import build_datasets
from softmoe.harness.distributed import Distributed
from softmoe.harness.faults import NonFiniteError, NonFiniteGuard
from softmoe.harness.loop import StepSettings, train, train_step
from softmoe.harness.state import build_state
from softmoe.harness.runs import read_events
from softmoe.harness.sampler import ResumableSampler

# 64 synthetic 8x8 images in batches of 8: one epoch is 8 steps and sees every image once.
SYNTHETIC = [
    "data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=64", "data.test_size=16",
    "model.depth=2", "trainer.batch_size=8", "trainer.max_steps=8", "trainer.log_every=1",
    "trainer.checkpoint_every=1", "logger=none", "trainer.progress_bar=false",
]
NAN_EXAMPLE = 37
FUSED = "optimizer.fused=true"  # the optimizer skips a flagged step itself: the check stays on the device


def step_holding(example, size=64, batch=8, seed=0):
    """The 1-based training step whose batch holds ``example`` (epoch 0's order)."""
    sampler = ResumableSampler(size, seed)
    sampler.set_epoch(0)
    return list(sampler).index(example) // batch + 1


# ----------------------------------------------------------------------------- whole runs, either check


@pytest.mark.parametrize("optimizer", ["optimizer.fused=false", FUSED])
def test_a_nan_batch_is_skipped_counted_and_never_saved(compose_run, tmp_path, caplog, optimizer):
    bad_step = step_holding(NAN_EXAMPLE)
    with caplog.at_level(logging.WARNING):
        summary = train(compose_run(*SYNTHETIC, optimizer, f"data.nan_examples=[{NAN_EXAMPLE}]"), tmp_path)
    assert summary.steps == 8 and summary.skipped_steps == 1
    events = [e for e in read_events(tmp_path) if "train/lr" in e]
    assert [e["step"] for e in events] == list(range(1, 9))
    assert [e.get("train/skipped_steps", 0) for e in events] == [int(e["step"] >= bad_step) for e in events]
    assert "train/loss" not in events[bad_step - 1]  # the skipped step trained nothing
    assert all(torch.isfinite(torch.tensor(e["train/loss"])) for e in events if "train/loss" in e)
    for name, tensor in load_checkpoint(tmp_path / "last.pt")["model"].items():
        assert torch.isfinite(tensor).all(), name
    assert load_checkpoint(tmp_path / "last.pt")["nonfinite"] == {"skipped": 1, "consecutive": 0}
    warnings = [r.getMessage() for r in caplog.records if "(trainer.nonfinite=skip)" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith(f"step {bad_step}: loss=nan (")
    checked = "checked on the device at step" in warnings[0]
    assert checked == (optimizer == FUSED)


def test_a_run_resumed_after_a_skipped_step_still_counts_it(compose_run, tmp_path, monkeypatch, resumed_from):
    # the bad batch is step 7's, so the 7th AdamW step is step 8's: the first attempt dies there, after last.pt at
    # step 7 (the skip), and the rerun resumes from it; the skip count must be the uninterrupted run's
    bad_step = step_holding(NAN_EXAMPLE)
    assert bad_step == 7  # the setup holds
    run = compose_run(*SYNTHETIC, "optimizer.fused=false", f"data.nan_examples=[{NAN_EXAMPLE}]")
    whole = train(run, tmp_path / "whole")
    train_killed_after(bad_step - 1, run, tmp_path / "resumed", monkeypatch)
    resumed = train(run, tmp_path / "resumed")
    assert resumed_from() == [(tmp_path / "resumed" / "last.pt", bad_step)]
    assert whole.skipped_steps == resumed.skipped_steps == 1
    skips = [[(e["step"], e.get("train/skipped_steps", 0)) for e in read_events(tmp_path / name) if "train/lr" in e]
             for name in ("whole", "resumed")]
    assert skips[0] == skips[1] == [(step, int(step >= bad_step)) for step in range(1, 9)]


def test_on_the_device_a_skip_is_reported_at_the_next_log_step(compose_run, tmp_path):
    bad_step = step_holding(NAN_EXAMPLE)
    log_every = 4
    summary = train(
        compose_run(*SYNTHETIC, FUSED, f"data.nan_examples=[{NAN_EXAMPLE}]", f"trainer.log_every={log_every}",
                    "trainer.checkpoint_every=null"), tmp_path,
    )
    assert summary.skipped_steps == 1
    events = [e for e in read_events(tmp_path) if "train/lr" in e]
    reported = math.ceil(bad_step / log_every) * log_every
    assert [(e["step"], e.get("train/skipped_steps", 0)) for e in events] == [
        (step, int(step >= reported)) for step in range(log_every, 9, log_every)
    ]


def test_nonfinite_stop_names_the_step_and_the_first_layer(compose_run, tmp_path):
    bad_step = step_holding(NAN_EXAMPLE)
    with pytest.raises(NonFiniteError) as raised:
        train(compose_run(*SYNTHETIC, f"data.nan_examples=[{NAN_EXAMPLE}]", "trainer.nonfinite=stop"), tmp_path)
    assert str(raised.value) == (
        f"step {bad_step}: loss=nan (first non-finite gradient in pos_embed); trainer.nonfinite=stop"
    )
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == bad_step - 1
    assert all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


def test_on_the_device_a_stop_comes_at_the_next_check_and_saves_nothing_after_it(compose_run, tmp_path):
    bad_step = step_holding(NAN_EXAMPLE)
    overrides = [FUSED, f"data.nan_examples=[{NAN_EXAMPLE}]", "trainer.nonfinite=stop", "trainer.log_every=4",
                 "trainer.checkpoint_every=2"]
    with pytest.raises(NonFiniteError) as raised:
        train(compose_run(*SYNTHETIC, *overrides), tmp_path)
    checked = min(math.ceil(bad_step / 2) * 2, math.ceil(bad_step / 4) * 4)  # the first checkpoint or log step
    assert str(raised.value) == (
        f"step {bad_step}: loss=nan (checked on the device at step {checked}); trainer.nonfinite=stop"
    )
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] < bad_step and all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


@pytest.mark.filterwarnings("error::UserWarning")  # a skipped first step draws no warning from PyTorch's scheduler
@pytest.mark.parametrize("optimizer", ["optimizer.fused=false", FUSED])
def test_skipping_stops_after_too_many_nonfinite_steps_in_a_row(compose_run, tmp_path, optimizer):
    every = ",".join(map(str, range(64)))
    too_many = {
        "optimizer.fused=false": r"^step 4: loss=nan .* in 4 steps in a row, more than trainer.max_nonfinite_skips=3$",
        FUSED: r"^step 4: a non-finite loss or gradient norm in 4 steps in a row \(steps 1-4\), more than "
        r"trainer.max_nonfinite_skips=3 \(checked on the device at step 4\)$",
    }[optimizer]
    overrides = [optimizer, f"data.nan_examples=[{every}]", "trainer.max_nonfinite_skips=3", "trainer.log_every=2"]
    with pytest.raises(NonFiniteError, match=too_many):
        train(compose_run(*SYNTHETIC, *overrides), tmp_path)


def test_a_nonfinite_weight_never_reaches_a_checkpoint(compose_run, tmp_path, monkeypatch):
    real_step, steps = torch.optim.AdamW.step, []

    def step_that_breaks_a_weight(self, *args, **kwargs):  # an optimizer bug: finite gradients, an inf weight
        result = real_step(self, *args, **kwargs)
        steps.append(1)
        if len(steps) == 3:
            self.param_groups[0]["params"][0].data.view(-1)[0] = math.inf
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_that_breaks_a_weight)
    with pytest.raises(NonFiniteError) as raised:
        train(compose_run(*SYNTHETIC), tmp_path)
    assert str(raised.value) == (
        "step 3: patch_embed.proj.weight is not finite; last.pt not written, the previous one is kept"
    )
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 2 and all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


# ----------------------------------------------------------------------------- the two checks, step by step


class HostReads(TorchDispatchMode):
    """Counts the reads of a tensor's value by the host (``.item()``, ``bool()``, ``float()``): on an accelerator
    each is a sync that waits for every queued kernel."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def syncs_raise(device):
    """On a GPU, any call that waits for the device raises (a CPU never waits)."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def steps_of(compose_run, *overrides, on_device=None, steps=8, prepare=None):
    """Run ``steps`` training steps through :func:`train_step` on the NaN-holding synthetic data; returns the state
    and the host reads of each step (on a GPU the steps run with the sync debug mode set to raise, so only a
    device check gets through). ``on_device`` forces the check's side (None: as ``train`` chooses); ``prepare``
    is called with the state before the first step."""
    cfg = compose_run(*SYNTHETIC, f"data.nan_examples=[{NAN_EXAMPLE}]", *overrides)
    torch.manual_seed(cfg.seed)
    distributed = Distributed.from_config(cfg)
    state, forward = build_state(cfg, distributed, total_steps=steps)
    if on_device is not None:
        state.nonfinite = NonFiniteGuard("skip", 3, distributed.device, on_device=on_device)
    if prepare is not None:
        prepare(state)
    train_split = build_datasets(cfg.data, cfg.paths.data_dir).train
    sampler = ResumableSampler(len(train_split), cfg.seed)
    settings = StepSettings.from_config(cfg)
    sampler.set_epoch(0)
    order = list(sampler)
    reads = []
    for step in range(steps):
        batch = [train_split[index] for index in order[step * 8 : (step + 1) * 8]]
        images, labels = torch.stack([image for image, _ in batch]), torch.tensor([label for _, label in batch])
        images, labels = images.to(distributed.device), labels.to(distributed.device)
        with HostReads() as host, syncs_raise(distributed.device):
            train_step(state, forward, images, labels, settings, distributed, record_routing=False, started=0.0)
        reads.append(host.count)
    state.nonfinite.settle(state.step)
    return state, reads


def test_the_device_check_reads_nothing_on_the_host_and_the_host_check_one_boolean_per_step(compose_run):
    bad_step = step_holding(NAN_EXAMPLE)
    _, on_device = steps_of(compose_run, FUSED)  # as train chooses for a fused optimizer
    _, on_host = steps_of(compose_run, FUSED, on_device=False)  # the same optimizer (which reads nothing itself)
    assert on_device == [0] * 8
    assert [reads for step, reads in enumerate(on_host, 1) if step != bad_step] == [1] * 7
    assert on_host[bad_step - 1] > 1  # the bad step reads the loss, the norm and each gradient to name the culprit


@pytest.mark.parametrize("optimizer", [FUSED, "optimizer=sgd optimizer.fused=true"])
def test_the_device_check_trains_bit_for_bit_as_the_host_check(compose_run, optimizer):
    on_device, _ = steps_of(compose_run, *optimizer.split(), on_device=True)
    on_host, _ = steps_of(compose_run, *optimizer.split(), on_device=False)
    assert on_device.nonfinite.state_dict() == on_host.nonfinite.state_dict() == {"skipped": 1, "consecutive": 0}
    for (name, mine), (_, theirs) in zip(on_device.model.state_dict().items(), on_host.model.state_dict().items()):
        assert torch.equal(mine, theirs), name
    for mine, theirs in zip(on_device.optimizer.state.values(), on_host.optimizer.state.values()):
        assert all(torch.equal(mine[key], theirs[key]) for key in mine)  # moments and step counts alike
    device_window, host_window = on_device.window.pop(), on_host.window.pop()  # the skipped batch left out of both
    assert device_window["train/loss"] == host_window["train/loss"] and math.isfinite(host_window["train/loss"])
    assert device_window["train/acc"] == host_window["train/acc"]


def test_counts_of_one_are_singular_in_every_message_that_prints_a_count(caplog):
    # was: "1 data-parallel replicas" (the expert-parallel log line), "in 1 steps in a row", "1 step(s) skipped"
    from softmoe.harness.rules import counted

    assert [counted(n, "data-parallel replica") for n in (0, 1, 2)] == [
        "0 data-parallel replicas", "1 data-parallel replica", "2 data-parallel replicas"]
    assert counted(1, "process", "processes") == "1 process" and counted(3, "process", "processes") == "3 processes"
    model = torch.nn.Linear(2, 2)
    model(torch.ones(1, 2)).sum().backward()
    nan = torch.tensor(float("nan"))
    with pytest.raises(NonFiniteError, match=r" in 1 step in a row, more than trainer.max_nonfinite_skips=0$"):
        NonFiniteGuard("skip", max_skips=0).step_is_finite(1, nan, torch.tensor(1.0), model)
    on_device = NonFiniteGuard("skip", max_skips=0, on_device=True)
    on_device.flag(1, nan, torch.tensor(1.0))
    with pytest.raises(NonFiniteError, match=r" in 1 step in a row \(steps 1-1\), more than "):
        on_device.settle(1)
    on_device = NonFiniteGuard("skip", max_skips=3, on_device=True)
    on_device.flag(1, nan, torch.tensor(1.0))
    with caplog.at_level(logging.WARNING, logger="softmoe.harness.faults"):
        on_device.settle(1)
    assert "; 1 step skipped since the last check (trainer.nonfinite=skip), 1 so far" in caplog.text


@pytest.mark.parametrize("optimizer", ["optimizer.fused=false", FUSED])
def test_an_inf_gradient_behind_a_finite_loss_is_skipped_too(compose_run, optimizer):
    """A finite loss does not make a step finite: a gradient can overflow on its own (every other test here feeds a
    NaN image, whose loss is NaN too)."""
    before = {}

    def overflow_one_gradient(state):
        before.update({name: value.clone() for name, value in state.model.state_dict().items()})
        state.model.patch_embed.proj.weight.register_hook(lambda grad: torch.full_like(grad, math.inf))

    state, _ = steps_of(compose_run, optimizer, steps=1, prepare=overflow_one_gradient)
    assert state.nonfinite.state_dict() == {"skipped": 1, "consecutive": 1}
    assert all(torch.equal(value, before[name]) for name, value in state.model.state_dict().items())


@pytest.mark.parametrize("clip", [1e-3, None])
def test_trainer_grad_clip_norm_clips_the_global_gradient_norm_of_the_step(compose_run, clip):
    state, _ = steps_of(compose_run, f"trainer.grad_clip_norm={'null' if clip is None else clip}", steps=1)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in state.model.parameters()])).item()
    if clip is None:
        assert norm > 0.01  # the raw gradient's norm: far above the clip above, so that clip is tested
    else:
        assert norm == pytest.approx(clip, rel=1e-4)  # the gradients the optimizer stepped with
