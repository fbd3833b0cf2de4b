"""The training harness end to end: the default run's telemetry, every experiment, exact resume, sweeps, evaluation."""

import dataclasses
import json
import logging
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import wandb

from conftest import CONF_DIR, train_killed_after, wandb_offline_run
from data_fixtures import write_fashion_mnist
from processes import run_forked
from softmoe.collect import main as collect_main
from softmoe.evaluate import evaluate_run
from softmoe.harness.checkpoint import CheckpointError, load_checkpoint
from softmoe.harness.errors import ConfigError, OtherExperimentError
from softmoe.harness.data import build_loader
from softmoe.harness.loop import evaluate, train
from softmoe.harness.runs import load_run, read_events

pytestmark = pytest.mark.slow  # end-to-end runs, in this process and as commands
ROOT = Path(CONF_DIR).parent
EXPERIMENTS = sorted(path.stem for path in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
QUIET = ["trainer.progress_bar=false"]
ROUTING_SCALARS = [
    "dispatch_entropy", "combine_entropy", "dispatch_max", "combine_max", "effective_experts", "router_scale"
]
DISTRIBUTIONS = ["expert_utilisation", "slot_utilisation"]


def read_metrics(run_dir):
    return read_events(run_dir)


def test_default_run_logs_every_metric_to_metrics_jsonl_and_wandb(compose_run, tmp_path):
    cfg = compose_run("trainer.max_epochs=1", "trainer.log_every=5", "logger.mode=offline", *QUIET)
    summary = train(cfg, tmp_path, wandb_group="sweep-1", wandb_name="trainer.max_epochs=1")

    events = read_metrics(tmp_path)
    train_events = [e for e in events if "train/loss" in e]
    val_events = [e for e in events if "val/acc" in e]
    test_events = [e for e in events if "test/acc" in e]
    # an epoch is 19 steps (the 1,257 training digits left beside the 180 of the validation split, batch 64)
    assert [e["step"] for e in train_events] == [5, 10, 15] and [e["step"] for e in val_events] == [19]
    assert [e["step"] for e in test_events] == [19] and events[-1] is test_events[0]  # the test split, once, at the end
    assert all(e["epoch"] == 1 for e in events)
    expected = ["train/loss", "train/acc", "train/lr", "train/throughput"]
    for block in (2, 3):  # vit_micro's last half
        expected += [f"routing/block{block}/{name}" for name in ROUTING_SCALARS]
        expected += [f"routing/block{block}/{name}_{s}" for name in DISTRIBUTIONS for s in ("min", "max", "entropy")]
    for event in train_events:
        assert set(expected) <= set(event)
        assert 1 <= event["routing/block2/effective_experts"] <= 16
        assert 0 < event["routing/block3/dispatch_entropy"] <= 1
    assert set(val_events[0]) == {"step", "epoch", "val/loss", "val/acc"}
    tested = {"test/loss", "test/acc", "test/loss_at_best_val", "test/acc_at_best_val"}
    assert set(test_events[0]) == {"step", "epoch", *tested}
    assert summary.val_acc == summary.best_val_acc == val_events[0]["val/acc"] and summary.best_val_epoch == 1
    assert summary.test_acc == summary.test_acc_at_best_val == test_events[0]["test/acc"]

    run, history = wandb_offline_run(tmp_path)
    run_id = summary.wandb_run_path.split("/")[-1]
    assert (run.run_group, run.display_name, run.run_id) == ("sweep-1", "trainer.max_epochs=1", run_id)
    assert {item.key for item in run.config.update} >= {"model", "moe", "data", "optimizer", "trainer", "seed"}
    for key in ["train/loss", "train/acc", "train/lr", "train/throughput", "val/loss", "val/acc", *tested]:
        assert key in history
    assert history["test/acc"] == [json.dumps(summary.test_acc)]
    logged = [json.dumps(e["routing/block2/dispatch_entropy"]) for e in train_events]
    assert history["routing/block2/dispatch_entropy"] == logged
    for block in (2, 3):
        for name in ROUTING_SCALARS:
            assert len(history[f"routing/block{block}/{name}"]) == 3
        for name in DISTRIBUTIONS:
            assert history[f"routing/block{block}/{name}/_type"] == ['"histogram"'] * 3
    assert history["val/dispatch_maps/_type"] == ['"image-file"']
    assert json.loads(history["_step"][-1]) == 19

    state = load_checkpoint(tmp_path / "last.pt")  # weights_only=True
    assert state["step"] == 19 and state["wandb_run_id"] == run.run_id
    assert (tmp_path / "best.pt").is_file()


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_two_steps(compose_run, tmp_path, experiment):
    cfg = compose_run(f"experiment={experiment}")
    overrides = [f"experiment={experiment}", "trainer.max_steps=2", "trainer.eval_batches=1", "logger=none", *QUIET]
    if cfg.model.upcycle_from is not None:
        overrides += ["model.upcycle_from=null"]  # a study's later stage: its source is an earlier stage's output
    if cfg.data.name == "fashion_mnist":  # the real reader on generated IDX files
        write_fashion_mnist(tmp_path / "fashion", sizes=(("train", 60), ("test", 20)))
        overrides += [f"data.root={tmp_path / 'fashion'}", "data.val_size=12", "data.train_subset=null"]
        overrides += ["trainer.batch_size=8", "trainer.device=cpu", "trainer.compile=false", "trainer.num_workers=0"]
    elif cfg.data.name != "digits" or cfg.model.embed_dim > 128:  # no CIFAR/ImageNet here; GPU sizes shrunk
        overrides += ["data=synthetic", f"data.img_size={cfg.data.img_size}", "data.train_size=32", "data.test_size=8"]
        overrides += ["model.embed_dim=32", "model.num_heads=2", "model.depth=2", "moe.num_experts=4"]
        overrides += ["trainer.batch_size=8"]
        overrides += ["trainer.device=cpu", "trainer.compile=false", "trainer.num_workers=0", "trainer.precision=fp32"]
    summary = train(compose_run(*overrides), tmp_path)
    assert summary.steps == 2 and 0 <= summary.test_acc <= 1


def without_timing(events):
    return [{key: value for key, value in event.items() if key != "train/throughput"} for event in events]


def test_resume_after_interruption_ends_with_the_same_weights_and_metrics(compose_run, tmp_path, monkeypatch,
                                                                          resumed_from):
    # 30 steps: an epoch of 16 (batch 88), then 14; `last` at 7, 14, 16 (epoch end), 21, 28, 30. The first
    # attempt dies after step 24, so it resumes mid-epoch from step 21 and redoes steps 22-24.
    run = [
        "trainer.max_steps=30", "trainer.batch_size=88", "trainer.checkpoint_every=7", "trainer.log_every=3",
        "model.depth=2", "model.drop_path_rate=0.1", "logger=none", *QUIET,
    ]
    train(compose_run(*run), tmp_path / "whole")

    train_killed_after(24, compose_run(*run), tmp_path / "resumed", monkeypatch)
    assert load_checkpoint(tmp_path / "resumed" / "last.pt")["step"] == 21
    assert read_metrics(tmp_path / "resumed")[-1]["step"] == 24  # logged, though no checkpoint covers it

    assert resumed_from() == []
    summary = train(compose_run(*run), tmp_path / "resumed")  # the same command in the same run dir resumes
    assert resumed_from() == [(tmp_path / "resumed" / "last.pt", 21)]
    whole, resumed = (load_checkpoint(tmp_path / name / "last.pt") for name in ("whole", "resumed"))
    assert summary.steps == 30
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    # every step once, with the values of the uninterrupted run (only the measured speed differs)
    assert without_timing(read_metrics(tmp_path / "resumed")) == without_timing(read_metrics(tmp_path / "whole"))


def test_trainer_resume_starts_from_another_runs_checkpoint(compose_run, tmp_path):
    base = ["trainer.batch_size=256", "trainer.log_every=1", "model.depth=2", "logger=none", *QUIET]
    train(compose_run(*base, "trainer.max_steps=4"), tmp_path / "first")
    resume = f"trainer.resume={tmp_path / 'first' / 'last.pt'}"
    summary = train(compose_run(*base, "trainer.max_steps=6", resume), tmp_path / "second")
    assert summary.steps == 6
    # epochs of 4 steps: train events at 5 and 6, then the run's end: validation and test at step 6
    assert [e["step"] for e in read_metrics(tmp_path / "second")] == [5, 6, 6, 6]
    # another run's checkpoint already at this run's last step: nothing to train (was: no best.pt to test)
    with pytest.raises(ConfigError) as raised:
        train(compose_run(*base, "trainer.max_steps=4", resume), tmp_path / "third")
    assert str(raised.value) == (f"{resume}: that checkpoint is at step 4, already this run's 4 steps; raise "
                                 "trainer.max_steps (or trainer.max_epochs) to train on from it")


def test_a_sweep_job_resumed_alone_stays_in_its_sweeps_wandb_group(compose_run, tmp_path, monkeypatch):
    """A joblib sweep's job stopped by Ctrl-C prints a resume line with hydra.mode=RUN, where a run has no group:
    its resumed attempt left the sweep's group, and `collect --wandb-dir --group <sweep>` dropped the job unsaid."""
    from softmoe.harness.sweeps import read_offline_run

    from softmoe.harness import loop
    from softmoe.harness.faults import Preempted

    def stopped_by_sigterm_at_step_2(state, *args, **kwargs):
        out = train_step(state, *args, **kwargs)
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # the job's stop guard saves this step and stops the run
        return out

    train_step = loop.train_step
    base = ["trainer.batch_size=256", "model.depth=2", "trainer.max_steps=4", "logger.mode=offline", *QUIET]
    monkeypatch.setattr(loop, "train_step", stopped_by_sigterm_at_step_2)
    with pytest.raises(Preempted):
        train(compose_run(*base), tmp_path, wandb_group="/sweeps/s", wandb_name="seed=0")
    monkeypatch.undo()
    assert train(compose_run(*base), tmp_path).steps == 4  # resumed alone: no group, the default name
    attempts = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(attempts) == 2
    for attempt in attempts:
        _, run = read_offline_run(attempt)
        assert (run.group, run.name) == ("/sweeps/s", "seed=0"), attempt


def test_a_run_started_from_another_runs_checkpoint_logs_to_a_wandb_run_of_its_own(compose_run, tmp_path):
    """Both directories hold offline W&B files; under one run id, `wandb sync` would merge two runs into one."""
    base = ["trainer.batch_size=256", "model.depth=2", "logger.mode=offline", *QUIET]
    first = train(compose_run(*base, "trainer.max_steps=2"), tmp_path / "first")
    resume = f"trainer.resume={tmp_path / 'first' / 'last.pt'}"
    second = train(compose_run(*base, "trainer.max_steps=3", resume), tmp_path / "second")
    first_id, second_id = (summary.wandb_run_path.split("/")[-1] for summary in (first, second))
    assert first_id and second_id and first_id != second_id
    assert load_checkpoint(tmp_path / "second" / "last.pt")["wandb_run_id"] == second_id
    assert list((tmp_path / "second" / "wandb").glob(f"offline-run-*-{second_id}"))


def test_resuming_a_different_model_is_refused(compose_run, tmp_path):
    base = ["trainer.max_steps=2", "trainer.batch_size=256", "model.depth=2", "logger=none", *QUIET]
    train(compose_run(*base), tmp_path / "run")
    # in its own run directory: another experiment (a sweep's rerun puts its multirun.yaml back on this error)
    with pytest.raises(OtherExperimentError, match="moe.num_experts=8"):
        train(compose_run(*base, "moe.num_experts=8"), tmp_path / "run")
    # another run's checkpoint, in a new run directory: refused as a checkpoint this model cannot take
    with pytest.raises(CheckpointError, match="moe.num_experts=8") as raised:
        train(compose_run(*base, "moe.num_experts=8", f"trainer.resume={tmp_path / 'run' / 'last.pt'}"),
              tmp_path / "new")
    assert not isinstance(raised.value, OtherExperimentError)


def test_a_finished_runs_results_are_not_replaced_once_its_checkpoints_were_deleted(compose_run, tmp_path):
    """Was: with its .pt files deleted (to save space), a new run in the directory started afresh and its
    metrics.jsonl replaced the finished run's, test results and all."""
    run = ["data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=32", "data.test_size=8",
           "model.depth=2", "trainer.batch_size=16", "trainer.max_steps=2", "logger=none", *QUIET]
    train(compose_run(*run), tmp_path)
    for checkpoint in tmp_path.glob("*.pt"):
        checkpoint.unlink()
    results = (tmp_path / "metrics.jsonl").read_bytes()
    refusal = (f"{tmp_path}: holds a finished run's results (metrics.jsonl logged its test accuracy) but no last.pt "
               "to continue it, and a run started here would replace them; give a new run directory "
               "(hydra.run.dir=...)")
    with pytest.raises(OtherExperimentError) as raised:
        train(compose_run(*run, "seed=1"), tmp_path)
    assert str(raised.value) == refusal and (tmp_path / "metrics.jsonl").read_bytes() == results
    from softmoe.harness.sweep_check import single_run_error  # the command line's check, before Hydra starts

    assert single_run_error([*run, "seed=1", f"hydra.run.dir={tmp_path}"], "train") == refusal


def test_an_edited_checkpoint_no_run_can_be_rebuilt_from_is_named_by_evaluate_and_a_resume(compose_run, tmp_path):
    """A checksum recomputed over an edited checkpoint (the config without its model section, the head's weights
    removed). Was: OmegaConf's ConfigAttributeError or a KeyError; torch's load_state_dict error."""
    from softmoe.harness.checkpoint import save_checkpoint

    run = ["data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=32", "data.test_size=8",
           "model.depth=2", "trainer.batch_size=16", "trainer.max_steps=2", "logger=none", *QUIET]
    train(compose_run(*run), tmp_path / "run")
    original = load_checkpoint(tmp_path / "run" / "last.pt")
    config = json.loads(original["config"])
    no_model, headless = tmp_path / "no_model", tmp_path / "headless"
    no_model.mkdir(), headless.mkdir()
    save_checkpoint(no_model / "last.pt", {**original, "config": json.dumps({**config, "model": None})})
    weights = {key: value for key, value in original["model"].items() if not key.startswith("head.")}
    save_checkpoint(headless / "last.pt", {**original, "model": weights})
    for run_dir, problem in [
        (no_model, "no run can be rebuilt from it (its config has no model section)"),
        (headless, 'its weights do not fit the model its config builds (Missing key(s) in state_dict: "head.weight", '
                   '"head.bias")'),
    ]:
        with pytest.raises(CheckpointError) as raised:
            evaluate_run(run_dir, tmp_path / "evaluate", checkpoint="last")
        assert str(raised.value) == f"{run_dir / 'last.pt'}: {problem}"
        with pytest.raises(CheckpointError) as raised:  # the run directory's own last.pt, resumed
            train(compose_run(*run), run_dir)
        assert str(raised.value).startswith(f"{run_dir / 'last.pt'}: ") and problem in str(raised.value)


def test_a_run_directory_resumes_only_the_experiment_it_holds(compose_run, tmp_path, resumed_from, caplog):
    # was: another learning rate in the same directory resumed the finished run, "resuming ... at step 2 of 2",
    # and its old accuracy was reported under the new value
    run = ["data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=32", "data.test_size=8",
           "model.depth=2", "trainer.batch_size=16", "trainer.max_steps=2", "logger=none", *QUIET]
    train(compose_run(*run), tmp_path)
    last, kept = tmp_path / "last.pt", (tmp_path / "last.pt").read_bytes()
    claimed = []  # python -m softmoe.train writes .hydra/ here: a refused config must not
    with pytest.raises(OtherExperimentError) as raised:
        train(compose_run(*run, "optimizer.lr=0.01"), tmp_path, on_claim=claimed.append)
    assert str(raised.value) == (
        f"optimizer.lr=0.01: this run directory's checkpoint {last} was saved with optimizer.lr=0.003, and a run "
        f"directory resumes only the experiment it holds; rerun with optimizer.lr=0.003, or start a new run "
        f"directory from it with trainer.resume={last} (a new hydra.run.dir, or hydra.sweep.dir for a sweep)"
    )
    with pytest.raises(OtherExperimentError) as raised:  # a longer run: another schedule, a second test result
        train(compose_run(*run, "trainer.max_steps=4"), tmp_path, on_claim=claimed.append)
    assert str(raised.value).startswith(f"trainer.max_steps=4: this run directory's checkpoint {last} is of a run "
                                        "of trainer.max_steps=2, which is not lengthened in place")
    assert str(raised.value).endswith(f"or to train on, start a new run directory from it with trainer.resume={last} "
                                      "trainer.max_steps=4")
    # a shorter one: its checkpoint is past the end, so no trainer.resume can start it (was suggested, then refused)
    with pytest.raises(OtherExperimentError) as raised:
        train(compose_run(*run, "trainer.max_steps=1"), tmp_path, on_claim=claimed.append)
    assert str(raised.value) == (
        f"trainer.max_steps=1: this run directory's checkpoint {last} is of a run of trainer.max_steps=2, which is not "
        "shortened in place (its learning-rate schedule would change mid-run and it would report a second test "
        "result); rerun with trainer.max_steps=2, or train a run of trainer.max_steps=1 in a new run directory (a new "
        "hydra.run.dir, or hydra.sweep.dir for a sweep)")
    assert claimed == [] and last.read_bytes() == kept and resumed_from() == []
    # where it runs, what it logs, its kernels: the same experiment, which resumes
    train(compose_run(*run, "trainer.device=cpu", "trainer.log_every=1", "trainer.eval_batch_size=3",
                      "optimizer.fused=false", "logger=none", f"trainer.resume={last}"), tmp_path)
    assert resumed_from() == [(last, 2)]
    other = tmp_path / "other.pt"  # was: silently ignored
    other.write_bytes(last.read_bytes())
    train(compose_run(*run, f"trainer.resume={other}"), tmp_path)
    assert resumed_from() == [(last, 2), (last, 2)]
    assert (f"trainer.resume={other} is ignored: this run directory holds its own last.pt, which it continues; a new "
            "run directory starts from trainer.resume") in caplog.text
    # trainer.max_epochs is unused where trainer.max_steps sets the length (was refused as "shortened in place")
    train(compose_run(*run, "trainer.max_epochs=1"), tmp_path)
    with pytest.raises(OtherExperimentError) as raised:  # was: "... of a run of trainer.max_epochs=30"
        train(compose_run(*run, "trainer.max_steps=null", "trainer.max_epochs=3"), tmp_path)
    assert str(raised.value).startswith(f"trainer.max_epochs=3: this run directory's checkpoint {last} is of a run of "
                                        "trainer.max_steps=2, which is not re-measured in epochs in place")


def test_with_augmentation_what_draws_it_is_part_of_the_experiment(compose_run, tmp_path, resumed_from):
    """The DataLoader workers' seeds (trainer.num_workers) or the device's generator (trainer.data_on_device=true)
    decide which random augmentations each step draws: a run resumed with 2 workers instead of 0 ended at neither
    one's accuracy, accepted. Settings that leave the drawing alone still resume."""
    run = ["trainer.max_steps=2", "trainer.batch_size=256", "model.depth=2", "logger=none", *QUIET, "data.augment=true"]
    train(compose_run(*run), tmp_path / "loader")
    last = tmp_path / "loader" / "last.pt"
    with pytest.raises(OtherExperimentError) as raised:
        train(compose_run(*run, "trainer.num_workers=1"), tmp_path / "loader")
    assert str(raised.value) == (
        f"trainer.num_workers=1: this run directory's checkpoint {last} was saved with trainer.num_workers=0, and with "
        "data augmentation on that decides the random augmentations each step draws (the device's generator, or the "
        "DataLoader workers' seeds): the rest of the run would train on augmentations neither gives; rerun with "
        f"trainer.num_workers=0, or start a new run directory from it with trainer.resume={last}")
    with pytest.raises(OtherExperimentError, match=r"^trainer.data_on_device=true: .* saved with "
                                                   r"trainer.data_on_device=false trainer.num_workers=0, and"):
        train(compose_run(*run, "trainer.data_on_device=true"), tmp_path / "loader")
    if not torch.cuda.is_available():  # auto batches on the device only on CUDA: here the DataLoader draws
        with pytest.raises(OtherExperimentError, match=r"^trainer.num_workers=1: .* saved with trainer.num_workers=0"):
            train(compose_run(*run, "trainer.data_on_device=auto", "trainer.num_workers=1"), tmp_path / "loader")
    train(compose_run(*run, "trainer.data_on_device=auto"), tmp_path / "loader")  # the same draws, or not known
    assert resumed_from() == [(last, 2)]
    train(compose_run(*run, "trainer.data_on_device=true"), tmp_path / "device")  # the device draws: not the workers
    train(compose_run(*run, "trainer.data_on_device=true", "trainer.num_workers=1"), tmp_path / "device")
    train(compose_run("trainer.max_steps=2", "trainer.batch_size=256", "model.depth=2", "logger=none", *QUIET),
          tmp_path / "plain")  # without augmentation the batches are the same: it resumes
    train(compose_run("trainer.max_steps=2", "trainer.batch_size=256", "model.depth=2", "logger=none", *QUIET,
                      "trainer.num_workers=1"), tmp_path / "plain")
    assert resumed_from()[1:] == [(tmp_path / "device" / "last.pt", 2), (tmp_path / "plain" / "last.pt", 2)]


def test_rerunning_a_finished_run_says_so_and_logs_its_test_result_once(compose_run, tmp_path, caplog):
    # was: "resuming ... at step 2 of 2", then the test split evaluated and logged a second time
    caplog.set_level(logging.INFO, logger="softmoe.harness.loop")
    run = ["trainer.max_steps=2", "trainer.batch_size=256", "model.depth=2", "logger=none", *QUIET]
    first = train(compose_run(*run), tmp_path)
    assert train(compose_run(*run), tmp_path) == first
    tested = [event for event in read_metrics(tmp_path) if "test/acc" in event]
    assert len(tested) == 1
    assert f"{tmp_path} finished already, at step 2: its test results are those it logged then" in caplog.text
    # stopped while testing: last.pt at the final step, no test result logged; the rerun tests it, once
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(event) + "\n" for event in read_metrics(tmp_path)
                                                    if "test/acc" not in event))
    caplog.clear()
    assert train(compose_run(*run), tmp_path) == first
    assert [event for event in read_metrics(tmp_path) if "test/acc" in event] == tested
    assert "finished already" not in caplog.text


@pytest.mark.slow
def test_a_failing_wandb_never_stops_training(compose_run, tmp_path, monkeypatch, caplog):
    # the real client, online, against a server that refuses every connection (as with no network), giving up
    # after 2 s instead of its default 90 (the test takes about 5 s)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "2")
    # W&B reads these once per process, at its first run: after an earlier test's run it kept its default timeout
    # and waited 90 s. Tearing its state down makes this run read them, and the next test's run its own again.
    wandb.teardown()
    run = ["trainer.max_steps=3", "trainer.log_every=1", "trainer.batch_size=256", "logger.mode=online", *QUIET]
    try:
        with caplog.at_level(logging.WARNING):
            summary = train(compose_run(*run), tmp_path)
    finally:
        wandb.teardown()
    assert summary.wandb_run_path is None and [e["step"] for e in read_metrics(tmp_path)] == [1, 2, 3, 3, 3]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "softmoe.harness.telemetry"]
    assert warning.startswith("W&B could not start (") and "127.0.0.1:9" in warning, warning  # W&B's reason
    assert warning.endswith(f"training continues, logging to {tmp_path / 'metrics.jsonl'} only")


def test_the_wandb_sync_hint_of_a_resumed_offline_run_uploads_every_part_in_order(compose_run, tmp_path, caplog,
                                                                                   monkeypatch):
    run = ["trainer.batch_size=256", "trainer.log_every=1", "trainer.max_steps=4", "trainer.checkpoint_every=2",
           "model.depth=2", "logger.mode=offline", *QUIET]
    train_killed_after(3, compose_run(*run), tmp_path, monkeypatch)  # last.pt at step 2
    with caplog.at_level(logging.INFO):
        train(compose_run(*run), tmp_path)  # resumes the same W&B run: a second directory
    parts = sorted(tmp_path.glob("wandb/offline-run-*"))
    assert len(parts) == 2 and len({part.name.rsplit("-", 1)[1] for part in parts}) == 1  # one run id
    hints = [r.getMessage() for r in caplog.records if "wandb sync" in r.getMessage()]
    assert len(hints) == 2  # when the attempt starts, and again when it ends
    assert all(hint.endswith(f"wandb sync {parts[0]} {parts[1]}") for hint in hints)


def test_a_validation_fraction_that_rounds_to_no_image_is_named_as_given(compose_run, tmp_path, caplog):
    run = ["data.val_size=0.0001", "trainer.max_steps=1", "trainer.eval_batches=1", "model.depth=2", "logger=none",
           *QUIET]  # 0.0001 of digits' 1,437 training images
    with caplog.at_level(logging.WARNING, logger="softmoe.harness.context"):
        summary = train(compose_run(*run), tmp_path)
    assert "data.val_size=0.0001 holds out 0 images: no validation split, so no model selection" in caplog.text
    # and the done line too (was "data.val_size=0", a value the user never set)
    assert summary.describe().endswith(
        "no validation split (data.val_size=0.0001 holds out 0 images), so no checkpoint was selected")


SWEEP_WARNING = "data.val_size=0: no validation split, so no model selection"


@pytest.fixture(scope="module", params=["joblib", "basic"])  # the jobs as processes, or one after another in one
def two_job_sweep(request, tmp_path_factory):
    """(sweep directory, console lines, stderr) of a 2-job sweep with no validation split: every job warns the same.
    Each joblib job takes every core's threads: 2 at once are more threads than cores, which its parent warns of."""
    sweep_dir = tmp_path_factory.mktemp(f"sweep_{request.param}")
    threads = os.cpu_count() if request.param == "joblib" else 1
    command = [
        sys.executable, "-m", "softmoe.train", "-m", f"launcher={request.param}", "moe.num_experts=4,8",
        "data.val_size=0", "trainer.max_steps=2", "trainer.batch_size=256", "trainer.eval_batches=1", "model.depth=2",
        f"trainer.num_threads={threads}", "logger=none", *QUIET, f"hydra.sweep.dir={sweep_dir}",
    ]
    # OpenMP threads that find no core sleep instead of spinning: the joblib jobs' 4 threads on 2 cores took 4.5 s
    # for their 2 steps spinning against each other, 0.4 s asleep; the threads and the warning are the same
    env = {**os.environ, "OMP_WAIT_POLICY": "passive"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return sweep_dir, (result.stdout + result.stderr).splitlines(), result.stderr


def test_a_joblib_sweep_of_more_threads_than_cores_is_warned_once_before_its_jobs_and_runs_them(two_job_sweep):
    sweep_dir, _, stderr = two_job_sweep  # the fixture checked that both jobs ran
    threads = os.cpu_count()
    warning = f"warning: launcher.n_jobs=2 x trainer.num_threads={threads} = {2 * threads} threads at once on "
    if sweep_dir.name.startswith("sweep_joblib"):
        assert stderr.startswith(warning) and stderr.count(warning) == 1, stderr[:1000]  # the parent's, not each job's
    else:
        assert "threads at once" not in stderr  # one job at a time


def test_sweep_jobs_tag_their_lines_and_the_sweep_ends_with_the_collect_command(two_job_sweep):
    sweep_dir, lines, _ = two_job_sweep
    # Hydra's own launcher lines are dated; the parent's warning of joblib's threads is the test above's
    job_lines = [line for line in lines if not line.startswith(("[20", "warning: launcher.n_jobs="))]
    assert job_lines[-1] == f"sweep done: {sweep_dir}; tabulate it with: python -m softmoe.collect {sweep_dir}"
    for job in (0, 1):
        assert any(line.startswith(f"[job {job}] model: vit_micro") for line in job_lines)
        assert f"[job {job}] compute: cpu, precision fp32" in job_lines  # what trainer.device=auto chose
        assert f"[job {job}] run directory: {sweep_dir / str(job)}" in job_lines
    assert all(line.startswith(("[job 0] ", "[job 1] ")) for line in job_lines[:-1]), job_lines


def test_a_warning_every_sweep_job_repeats_is_shown_once_and_kept_in_each_train_log(two_job_sweep):
    sweep_dir, lines, _ = two_job_sweep
    shown = [line for line in lines if SWEEP_WARNING in line]
    assert len(shown) == 1 and shown[0].startswith(("[job 0] ", "[job 1] ")), shown
    assert shown[0].endswith("(shown once for the sweep; each job's train.log keeps its own)")
    for job in (0, 1):
        assert (sweep_dir / str(job) / "train.log").read_text().count(SWEEP_WARNING) == 1
    results = sweep_dir.parent / f"{sweep_dir.name}_results"
    assert collect_main([str(sweep_dir), "--out", str(results)]) == 0  # the markers are no run
    table = (results / "results.md").read_text().splitlines()
    assert [row.split(" | ")[:2] for row in table[2:]] == [["| 4", "1"], ["| 8", "1"]]


def test_multirun_sweep_runs_each_job_in_its_own_run_dir_and_one_wandb_group(offline_sweep):
    runs = [wandb_offline_run(offline_sweep / str(job))[0] for job in (0, 1)]
    assert {run.run_group for run in runs} == {str(offline_sweep)}
    assert [run.display_name for run in runs] == [
        f"model.depth=2,moe.num_experts={n},trainer.batch_size=256,trainer.log_every=1,trainer.max_steps=3"
        for n in (4, 8)
    ]
    for job, experts in ((0, 4), (1, 8)):
        saved = json.loads(load_checkpoint(offline_sweep / str(job) / "last.pt")["config"])
        assert saved["moe"]["num_experts"] == experts
        assert [e["step"] for e in read_metrics(offline_sweep / str(job))] == [1, 2, 3, 3, 3]


def test_best_pt_is_chosen_on_validation_and_the_test_split_is_read_once_at_the_end(compose_run, tmp_path):
    # lr 1e-12: every epoch validates the same predictions, so the best stays epoch 1 while the final model is
    # epoch 3's;
    # best.pt is then read back and tested, and must give the final model's numbers
    run = ["trainer.max_epochs=3", "trainer.batch_size=256", "optimizer.lr=1e-12", "logger=none", *QUIET]
    summary = train(compose_run(*run), tmp_path)
    events = read_metrics(tmp_path)
    assert [e["epoch"] for e in events if "val/acc" in e] == [1, 2, 3]
    assert [i for i, e in enumerate(events) if any(key.startswith("test/") for key in e)] == [len(events) - 1]
    assert summary.best_val_epoch == 1 and load_checkpoint(tmp_path / "best.pt")["step"] == 4
    assert summary.test_acc_at_best_val == summary.test_acc == events[-1]["test/acc_at_best_val"]
    from_best = evaluate_run(tmp_path, tmp_path / "evaluate", checkpoint="best")
    assert from_best["test/acc"] == summary.test_acc_at_best_val and from_best["val/acc"] == summary.best_val_acc
    assert "test accuracy" in summary.describe() and "best validation accuracy" in summary.describe()


def test_the_test_accuracy_at_best_val_is_best_pts_not_the_final_models(compose_run, tmp_path):
    # lr 0.1 (reached at the end of the warm-up, all 16 steps here) makes AdamW diverge after the first epoch of 4
    # steps: validation falls to chance, so best.pt stays epoch 1's and the final model tests differently from it
    run = ["trainer.max_epochs=4", "trainer.batch_size=256", "optimizer.lr=0.1", "model.depth=2", "logger=none", *QUIET]
    summary = train(compose_run(*run), tmp_path)
    assert summary.best_val_epoch == 1 and summary.test_acc != summary.test_acc_at_best_val  # the setup holds
    from_best = evaluate_run(tmp_path, tmp_path / "evaluate", checkpoint="best")
    from_last = evaluate_run(tmp_path, tmp_path / "evaluate", checkpoint="last")
    assert (from_best["step"], from_last["step"]) == (4, 16)
    assert from_best["test/acc"] == summary.test_acc_at_best_val and from_best["val/acc"] == summary.best_val_acc
    assert from_last["test/acc"] == summary.test_acc and from_last["val/acc"] == summary.val_acc


class OneSecondPerReading:
    """A stand-in for the loop's ``time`` module whose ``perf_counter`` advances one second per reading: the loop
    reads it once before and once after each step, so every step measures exactly 1 s."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        self.now += 1.0
        return self.now


def test_a_run_resumed_at_an_epoch_end_keeps_its_best_epoch_and_its_unlogged_steps(compose_run, tmp_path,
                                                                                  monkeypatch, resumed_from):
    # 10 steps: epochs of 4 (batch 256) end at 4, 8 and the run's end, 10, so the run has 3 epochs. lr 1e-12: every
    # epoch validates alike, so the best stays epoch 1. The first attempt dies after step 6 and resumes from
    # epoch 1's last.pt, at step 4: logged at 3, so step 4 is still to be logged, at step 6, its time included.
    monkeypatch.setattr("softmoe.harness.loop.time", OneSecondPerReading())
    run = ["trainer.max_steps=10", "trainer.batch_size=256", "optimizer.lr=1e-12", "trainer.log_every=3",
           "model.depth=2", "logger=none", *QUIET]
    whole = train(compose_run(*run), tmp_path / "whole")
    train_killed_after(6, compose_run(*run), tmp_path / "resumed", monkeypatch)
    resumed = train(compose_run(*run), tmp_path / "resumed")
    assert resumed_from() == [(tmp_path / "resumed" / "last.pt", 4)]
    assert read_metrics(tmp_path / "resumed") == read_metrics(tmp_path / "whole")  # throughput too, on this clock
    throughputs = [e["train/throughput"] for e in read_metrics(tmp_path / "resumed") if "train/loss" in e]
    assert throughputs == [256.0] * 3  # 256 images a (1 s) step, the window that spans the resume included
    assert dataclasses.replace(resumed, run_dir="") == dataclasses.replace(whole, run_dir="")
    assert whole.best_val_epoch == 1 and load_checkpoint(tmp_path / "resumed" / "best.pt")["step"] == 4
    events = read_metrics(tmp_path / "whole")
    assert [(e["step"], e["epoch"]) for e in events if "val/acc" in e] == [(4, 1), (8, 2), (10, 3)]
    assert [(e["step"], e["epoch"]) for e in events if "test/acc" in e] == [(10, 3)]  # the last, partial epoch


def test_a_log_windows_training_loss_and_accuracy_are_those_of_the_examples_it_trained_on(compose_run, tmp_path):
    # 1,260 training digits (177 held out) in batches of 126: one epoch of 10 steps, logged in two windows of 5.
    # lr 1e-12 leaves the weights as they were, and with no label smoothing or stochastic depth the two windows
    # together are the cross-entropy and accuracy of the final model over the whole training split.
    run = ["data.val_size=177", "trainer.batch_size=126", "trainer.max_steps=10", "trainer.log_every=5",
           "trainer.label_smoothing=0", "model.drop_path_rate=0", "optimizer.lr=1e-12", "logger=none", *QUIET]
    train(compose_run(*run), tmp_path)
    windows = [e for e in read_metrics(tmp_path) if "train/loss" in e]
    assert [e["step"] for e in windows] == [5, 10]
    loaded = load_run(tmp_path, "last", device="cpu")
    assert len(loaded.data.train) == 1260
    whole = evaluate(loaded.model, build_loader(loaded.data.train, 630, train=False), loaded.device)
    assert sum(e["train/loss"] for e in windows) / 2 == pytest.approx(whole["loss"], rel=1e-5)
    assert sum(e["train/acc"] for e in windows) / 2 == pytest.approx(whole["acc"], abs=1e-9)


def test_without_a_validation_split_nothing_is_selected_and_the_run_says_so(compose_run, tmp_path, caplog):
    run = ["data.val_size=0", "trainer.max_steps=5", "trainer.batch_size=256", "logger=none", *QUIET]
    summary = train(compose_run(*run), tmp_path)
    assert not (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()
    assert "data.val_size=0: no validation split, so no model selection" in caplog.text
    untrained = [set(e) - {"step", "epoch"} for e in read_metrics(tmp_path) if "train/loss" not in e]
    assert untrained == [{"test/acc", "test/loss"}]
    assert math.isnan(summary.best_val_acc)  # there is nothing to select on
    assert summary.describe().endswith("no validation split (data.val_size=0), so no checkpoint was selected")


@pytest.mark.slow
def test_an_optuna_sweep_maximises_validation_accuracy_never_test(tmp_path):
    arguments = [
        "-m", "hparams_search=router_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
        "trainer.max_steps=3", "trainer.batch_size=256", "logger=none", *QUIET, f"hydra.sweep.dir={tmp_path}",
    ]
    result = run_forked("softmoe.train", arguments, ROOT, timeout=600)  # Optuna's trials run in-process
    assert result.returncode == 0, result.stderr[-2000:]
    import yaml

    optimum = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    searched = {"moe.scale_init", "moe.router_lr_mult", "moe.router_weight_decay", "optimizer.lr"}
    assert set(optimum["best_params"]) == searched
    trials = [read_metrics(tmp_path / str(job)) for job in (0, 1)]
    best_val = [max(e["val/acc"] for e in events if "val/acc" in e) for events in trials]
    assert optimum["best_value"] == max(best_val)
    for job, events in enumerate(trials):  # each trial ran the parameters Optuna proposed
        saved = json.loads(load_checkpoint(tmp_path / str(job) / "last.pt")["config"])
        assert 1 <= saved["moe"]["scale_init"] <= 30 and 1e-3 <= saved["optimizer"]["lr"] <= 1e-2


def test_an_optuna_search_keeps_its_study_in_a_database_when_given_one(tmp_path):
    # was: Optuna 2.10 on SQLAlchemy 2 stopped before any trial ("assert version is not None"): pinned to 1.x
    database = tmp_path / "study.db"
    arguments = ["-m", "hparams_search=router_optuna", "hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=1",
                 f"hydra.sweeper.storage=sqlite:///{database}", "trainer.max_steps=2", "model.depth=2", "logger=none",
                 *QUIET, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    result = run_forked("softmoe.train", arguments, ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    import optuna

    study = optuna.load_study(study_name="router_knobs", storage=f"sqlite:///{database}")
    assert [trial.state.name for trial in study.trials] == ["COMPLETE"]


def test_an_epoch_shorter_than_log_every_names_the_step_its_training_figures_come_from(compose_run, tmp_path, caplog):
    # 4 steps an epoch (1,257 digits at batch 256) and a log every 10 steps: epoch 3 logs at step 10, epoch 4 none
    run = ["trainer.max_epochs=4", "trainer.batch_size=256", "model.depth=2", "logger=none", *QUIET]
    with caplog.at_level(logging.INFO, logger="softmoe.harness.loop"):
        train(compose_run(*run), tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [line.split()[:4] for line in lines] == [["epoch", f"{e}/4", "step", str(4 * e)] for e in (1, 2, 3, 4)]
    assert "train loss" not in lines[0] + lines[1]  # nothing logged yet
    assert "img/s)" in lines[2] and "as logged at step" not in lines[2]  # its own log, at step 10
    assert "img/s, as logged at step 10)" in lines[3]  # step 10's figures again, said to be


def test_a_run_without_validation_names_only_last_pt_and_its_epoch_line_says_why_it_has_no_figures(
        compose_run, tmp_path, caplog):
    # was: "checkpoints: one file, last.pt and best.pt, ..." before "best.pt is not written", and "epoch 1/1  step 5  "
    run = ["data.val_size=0", "trainer.max_steps=5", "trainer.batch_size=256", "model.depth=2", "logger=none", *QUIET]
    with caplog.at_level(logging.INFO, logger="softmoe.harness"):
        train(compose_run(*run), tmp_path)
    lines = [r.getMessage() for r in caplog.records]
    (checkpoints,) = [line for line in lines if line.startswith("checkpoints: ")]
    assert checkpoints == "checkpoints: one file, last.pt, written by rank 0"
    assert lines.index(checkpoints) + 1 == next(i for i, line in enumerate(lines) if "best.pt is not written" in line)
    assert [line for line in lines if line.startswith("epoch ")] == [
        "epoch 1/1  step 5  no training step logged (trainer.log_every=10) and no validation split"]
    assert not (tmp_path / "best.pt").exists()


def test_a_rerun_whose_earlier_attempt_saved_no_checkpoint_says_it_starts_over(compose_run, tmp_path, caplog):
    """A sweep rerun restarts a job killed before its first checkpoint: the job says so, and its earlier lines go."""
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 3, "epoch": 1, "train/loss": 2.0}) + "\n")
    run = ["trainer.max_steps=2", "trainer.log_every=1", "trainer.batch_size=256", "trainer.eval_batches=1",
           "model.depth=2", "logger=none", *QUIET]
    with caplog.at_level(logging.INFO, logger="softmoe.harness.context"):
        train(compose_run(*run), tmp_path)
    assert (f"{tmp_path} holds no last.pt: its earlier attempt stopped before its first checkpoint; starting at "
            "step 0") in caplog.messages
    assert [event["step"] for event in read_events(tmp_path) if "train/loss" in event] == [1, 2]


def test_a_warning_met_at_every_step_is_shown_once(compose_run, tmp_path, monkeypatch):
    """The trainer's catch_warnings around the scheduler's step reset the registry that shows a warning once per
    place: torch's FSDP2 "returned a view tensor" warning came once per step on every rank. Only the first step
    catches now (torch's scheduler warns there only)."""
    import warnings

    from softmoe.harness import loop

    classification_loss = loop.classification_loss

    def warning_loss(*args, **kwargs):
        warnings.warn("a warning met at every step", UserWarning)
        return classification_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "classification_loss", warning_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per place
        train(compose_run("trainer.max_steps=4", "trainer.batch_size=256", "model.depth=2", "logger=none", *QUIET),
              tmp_path)
    assert [str(w.message) for w in caught].count("a warning met at every step") == 1


def test_a_best_pt_damaged_before_the_test_leaves_the_final_models_test_and_the_run_finishes(compose_run, tmp_path,
                                                                                             monkeypatch, caplog):
    """Was: the resumed run trained to its end, then stopped on best.pt's checksum, and so did every rerun: its
    test never logged, the run never counted by collect. No rerun can write best.pt again (its weights are gone)."""
    # as the test above: lr 1e-12, so every epoch validates alike and best.pt stays epoch 1's, at step 4
    run = ["trainer.max_steps=10", "trainer.batch_size=256", "optimizer.lr=1e-12", "model.depth=2", "logger=none",
           *QUIET]
    train_killed_after(6, compose_run(*run), tmp_path, monkeypatch)
    best = tmp_path / "best.pt"
    damaged = bytearray(best.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF  # one flipped byte in its tensors: the checksum finds it
    best.write_bytes(bytes(damaged))
    with caplog.at_level(logging.WARNING, logger="softmoe.harness.loop"):
        summary = train(compose_run(*run), tmp_path)
    assert summary.test_acc > 0 and math.isnan(summary.test_acc_at_best_val)
    assert summary.describe().endswith("; best.pt could not be tested (best validation accuracy "
                                       f"{100 * summary.best_val_acc:.2f}% at epoch 1)")  # was: "nan% (best.pt: ..."
    (warned,) = [r.getMessage() for r in caplog.records if "the final model alone is tested" in r.getMessage()]
    assert warned.startswith(f"{best}: corrupted"), warned
    tested = [e for e in read_metrics(tmp_path) if "test/acc" in e]
    assert [e["step"] for e in tested] == [10] and math.isnan(tested[0]["test/acc_at_best_val"])
