"""Reliability: runs survive kills, preemption, damaged checkpoints, NaNs, bad configs, bad data and W&B failures.

Every promise of the README's "Reliability" section is a test here that fails if the promise breaks. A run
that must die for real is a forked process running ``python -m softmoe.train``'s own ``main`` (the test
process has already imported torch, so a fork starts in milliseconds where a fresh interpreter takes
seconds). The child runs the ``softmoe.train`` module as ``__main__``, exactly as ``python -m`` does.
"""

import errno
import hashlib
import json
import logging
import math
import os
import random
import runpy
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR
from data_fixtures import write_image_tree, write_png
from softmoe.harness import checkpoint as checkpoint_module
from softmoe.harness.checkpoint import PREVIOUS, CheckpointError, CheckpointWriteError, load_checkpoint
from softmoe.harness.config import ConfigError, validate_config
from softmoe.harness.faults import NONFINITE_EXIT_CODE, NonFiniteError, PreemptionGuard, preempted_exit_code
from softmoe.harness.loop import train
from softmoe.harness.sampler import ResumableSampler

ROOT = Path(CONF_DIR).parent
# 24 steps of batch 32 inside digits' first epoch (44 steps), `last` every 4 steps, an event every step.
RUN = [
    "model.depth=2", "trainer.batch_size=32", "trainer.max_steps=24", "trainer.checkpoint_every=4",
    "trainer.log_every=1", "trainer.eval_batches=1", "logger=none", "trainer.progress_bar=false",
]  # fmt: skip
CHECKPOINT_EVERY, TOTAL_STEPS = 4, 24
HYDRA_FILES = {".hydra", "train.log"}  # what Hydra itself writes into a run directory


# ----------------------------------------------------------------------------- helpers


def read_events(run_dir):
    """The complete lines of ``metrics.jsonl`` (a line torn by a kill is left out)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]


def without_timing(events):
    return [{key: value for key, value in event.items() if key != "train/throughput"} for event in events]


def assert_every_step_once(events, total=TOTAL_STEPS):
    """Train events at steps 1..total exactly once, in order; validation events strictly increasing."""
    train_steps = [e["step"] for e in events if "train/lr" in e]
    val_steps = [e["step"] for e in events if "val/acc" in e]
    assert train_steps == list(range(1, total + 1))
    assert val_steps == sorted(set(val_steps))


def final_weights(run_dir):
    return load_checkpoint(Path(run_dir) / "last.pt")["model"]


def assert_same_weights(expected, actual):
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, actual[name]), name


def start_cli(run_dir, *overrides):
    """Fork a process running ``python -m softmoe.train <overrides> hydra.run.dir=<run_dir>``; its output goes
    to ``<run_dir>.out``. Returns the pid."""
    run_dir = Path(run_dir)
    output = open(run_dir.parent / f"{run_dir.name}.out", "ab")
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.dup2(output.fileno(), 1)
            os.dup2(output.fileno(), 2)
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # not pytest's capture objects
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            sys.argv = ["softmoe.train", *overrides, f"hydra.run.dir={run_dir}"]
            runpy.run_module("softmoe.train", run_name="__main__", alter_sys=True)  # as `python -m` runs it
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    output.close()
    return pid


def wait(pid, timeout=300):
    """The exit status of ``pid`` (``-signal`` when a signal killed it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"process {pid} still running after {timeout} s")


def run_cli(run_dir, *overrides):
    return wait(start_cli(run_dir, *overrides))


def signal_at_step(pid, run_dir, step, signum, timeout=300):
    """Send ``signum`` to ``pid`` once ``metrics.jsonl`` shows training step ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = [e["step"] for e in read_events(run_dir) if "train/lr" in e]
        if logged and logged[-1] >= step:
            os.kill(pid, signum)
            return
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"the run ended (status {status}) before step {step}; see {run_dir}.out"
        time.sleep(0.002)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def output_of(run_dir):
    return Path(f"{run_dir}.out").read_text()


def fingerprint(run_dir):
    """{file: sha256} of everything in a run directory but Hydra's own files."""
    run_dir = Path(run_dir)
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.relative_to(run_dir).parts[0] not in HYDRA_FILES
    }


@pytest.fixture(scope="module")
def uninterrupted(compose_run, tmp_path_factory):
    """The reference: RUN trained in one go (in this process)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train(compose_run(*RUN), run_dir)
    return {"dir": run_dir, "weights": final_weights(run_dir), "events": without_timing(read_events(run_dir))}


def assert_matches_uninterrupted(run_dir, uninterrupted):
    assert_same_weights(uninterrupted["weights"], final_weights(run_dir))
    events = read_events(run_dir)
    assert without_timing(events) == uninterrupted["events"]  # every step once, with the same values
    assert_every_step_once(events)


# ----------------------------------------------------------------------------- 1. kill and resume


def test_sigkill_at_a_random_step_then_the_same_command_resumes_exactly(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    kill_step = random.randrange(CHECKPOINT_EVERY + 2, TOTAL_STEPS - 2)
    pid = start_cli(run_dir, *RUN)
    signal_at_step(pid, run_dir, kill_step, signal.SIGKILL)
    assert wait(pid) == -signal.SIGKILL, f"kill at step {kill_step}"
    died_at = [e["step"] for e in read_events(run_dir) if "train/lr" in e][-1]
    saved = load_checkpoint(run_dir / "last.pt")["step"]
    assert saved % CHECKPOINT_EVERY == 0 and 0 < saved <= died_at, (kill_step, died_at, saved)

    assert run_cli(run_dir, *RUN) == 0, output_of(run_dir)  # the same command, the same run directory
    assert f"resuming from {run_dir / 'last.pt'} at step {saved}" in output_of(run_dir)
    assert_matches_uninterrupted(run_dir, uninterrupted)


def test_a_line_torn_by_a_kill_is_dropped_on_resume(compose_run, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dir"], run_dir)
    shutil.copy(run_dir / PREVIOUS, run_dir / "last.pt")  # killed after step 20's checkpoint ...
    with open(run_dir / "metrics.jsonl", "a") as file:
        file.write('{"step": 25, "epoch": 1, "train/lo')  # ... while writing a line
    train(compose_run(*RUN), run_dir)
    assert_matches_uninterrupted(run_dir, uninterrupted)


# ----------------------------------------------------------------------------- 2. preemption


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preemption_signal_saves_last_and_exits_with_its_code_then_the_rerun_resumes_exactly(
    uninterrupted, tmp_path, signum
):
    run_dir = tmp_path / "run"
    pid = start_cli(run_dir, *RUN)
    signal_at_step(pid, run_dir, random.randrange(2, TOTAL_STEPS - 4), signum)
    assert wait(pid) == preempted_exit_code(signum) == 128 + signum, output_of(run_dir)
    logged = [e["step"] for e in read_events(run_dir) if "train/lr" in e]
    assert load_checkpoint(run_dir / "last.pt")["step"] == logged[-1]  # the step it was in, finished and saved
    assert f"{signal.Signals(signum).name} received: saved last.pt at step {logged[-1]}" in output_of(run_dir)

    assert run_cli(run_dir, *RUN) == 0, output_of(run_dir)
    assert_matches_uninterrupted(run_dir, uninterrupted)


def test_the_handler_found_before_ours_is_called_after_saving():
    """On SLURM, submitit's requeue handler is installed before the trainer's; the trainer calls it once
    ``last.pt`` is written, so the job is requeued."""
    calls = []
    before = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        guard = PreemptionGuard().install()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert guard.requested == signal.SIGUSR2 and calls == []  # not yet: the step and the save come first
        guard.restore()
        guard.handover()()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, before)


# ----------------------------------------------------------------------------- 3. checkpoint integrity


def truncate_file(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes_inside(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])  # inside the tensor data
    path.write_bytes(bytes(data))


def garbage(path):
    path.write_bytes(os.urandom(4096))


@pytest.mark.parametrize("damage", [truncate_file, flip_bytes_inside, garbage], ids=["truncated", "flipped", "garbage"])
def test_a_damaged_last_is_reported_and_the_previous_checkpoint_is_used(
    compose_run, uninterrupted, tmp_path, caplog, damage
):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dir"], run_dir)  # a finished run: last.pt at step 24, last.prev.pt at 20
    assert load_checkpoint(run_dir / PREVIOUS)["step"] == TOTAL_STEPS - CHECKPOINT_EVERY
    damage(run_dir / "last.pt")
    with pytest.raises(CheckpointError, match=f"{run_dir / 'last.pt'}: (not a readable checkpoint|corrupted)"):
        load_checkpoint(run_dir / "last.pt")

    with caplog.at_level(logging.WARNING):
        train(compose_run(*RUN), run_dir)
    warning = next(r.getMessage() for r in caplog.records if "resuming from the checkpoint before it" in r.getMessage())
    assert str(run_dir / "last.pt") in warning and str(run_dir / PREVIOUS) in warning and "\n" not in warning
    assert_matches_uninterrupted(run_dir, uninterrupted)  # steps 21-24 again, as before


def test_a_full_disk_never_leaves_a_half_written_checkpoint(compose_run, uninterrupted, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    real_save, saves = torch.save, []

    def disk_full_on_the_third_save(state, file):
        saves.append(state["step"])
        if len(saves) == 3:  # step 12's `last`: half of it reaches the disk, then the disk is full
            file.write(b"\x00" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(state, file)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module.torch, "save", disk_full_on_the_third_save)
        with pytest.raises(CheckpointWriteError) as raised:
            train(compose_run(*RUN), run_dir)
    message = str(raised.value)
    assert saves == [4, 8, 12] and "\n" not in message
    assert f"{run_dir / 'last.pt'}: could not be written (the disk is full)" in message
    assert "last.pt still holds the previous checkpoint" in message
    assert load_checkpoint(run_dir / "last.pt")["step"] == 8 and load_checkpoint(run_dir / PREVIOUS)["step"] == 4
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]

    train(compose_run(*RUN), run_dir)  # space freed: the rerun resumes from step 8
    assert_matches_uninterrupted(run_dir, uninterrupted)


def test_a_checkpoint_carrying_code_is_refused_not_run(compose_run, uninterrupted, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dir"], run_dir)
    (run_dir / PREVIOUS).unlink()
    state = load_checkpoint(run_dir / "last.pt")
    torch.save({**state, "optimizer": Payload()}, run_dir / "last.pt")  # a real checkpoint, poisoned
    with pytest.raises(CheckpointError) as raised:
        train(compose_run(*RUN), run_dir)
    assert str(raised.value) == (
        f"{run_dir / 'last.pt'}: not a readable checkpoint (it holds Python objects that loading would have to "
        "execute; refused (weights_only=True))"
    )
    assert not marker.exists()


# ----------------------------------------------------------------------------- 4. numerical faults

# 64 synthetic 8x8 images in batches of 8: one epoch is 8 steps and sees every image once.
SYNTHETIC = [
    "data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=64", "data.test_size=16",
    "model.depth=2", "trainer.batch_size=8", "trainer.max_steps=8", "trainer.log_every=1",
    "trainer.checkpoint_every=1", "logger=none", "trainer.progress_bar=false",
]  # fmt: skip
NAN_EXAMPLE = 37


def step_holding(example, size=64, batch=8, seed=0):
    sampler = ResumableSampler(size, seed)
    sampler.set_epoch(0)
    return list(sampler).index(example) // batch + 1


def test_a_nan_batch_is_skipped_counted_and_never_saved(compose_run, tmp_path, caplog):
    bad_step = step_holding(NAN_EXAMPLE)
    with caplog.at_level(logging.WARNING):
        summary = train(compose_run(*SYNTHETIC, f"data.nan_examples=[{NAN_EXAMPLE}]"), tmp_path)
    assert summary.steps == 8 and summary.skipped_steps == 1
    events = [e for e in read_events(tmp_path) if "train/lr" in e]
    assert [e["step"] for e in events] == list(range(1, 9))
    assert [e.get("train/skipped_steps", 0) for e in events] == [int(e["step"] >= bad_step) for e in events]
    assert "train/loss" not in events[bad_step - 1]  # the skipped step trained nothing
    assert all(torch.isfinite(torch.tensor(e["train/loss"])) for e in events if "train/loss" in e)
    for name, tensor in load_checkpoint(tmp_path / "last.pt")["model"].items():
        assert torch.isfinite(tensor).all(), name
    assert load_checkpoint(tmp_path / "last.pt")["nonfinite"] == {"skipped": 1, "consecutive": 0}
    assert sum("step skipped (trainer.nonfinite=skip)" in r.getMessage() for r in caplog.records) == 1


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


def test_skipping_stops_after_too_many_nonfinite_steps_in_a_row(compose_run, tmp_path):
    every = ",".join(map(str, range(64)))
    with pytest.raises(NonFiniteError, match=r"^step 4: loss=nan .* in 4 steps in a row, more than trainer.max_nonfinite_skips=3$"):
        train(compose_run(*SYNTHETIC, f"data.nan_examples=[{every}]", "trainer.max_nonfinite_skips=3"), tmp_path)


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
    assert str(raised.value) == "step 3: patch_embed.proj.weight is not finite; last.pt not written, the previous one is kept"
    saved = load_checkpoint(tmp_path / "last.pt")
    assert saved["step"] == 2 and all(torch.isfinite(tensor).all() for tensor in saved["model"].values())


def test_the_cli_exits_3_on_a_nonfinite_stop(tmp_path):
    run_dir = tmp_path / "run"
    code = run_cli(run_dir, *SYNTHETIC, f"data.nan_examples=[{NAN_EXAMPLE}]", "trainer.nonfinite=stop")
    assert code == NONFINITE_EXIT_CODE == 3
    assert f"error: step {step_holding(NAN_EXAMPLE)}: loss=nan" in output_of(run_dir)
