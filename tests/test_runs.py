"""softmoe.harness.runs: a run directory back in memory, its log, its lock, and what a run that never started leaves."""

import logging
import os
import shutil
import socket

import pytest
import torch

from softmoe.harness.checkpoint import CheckpointError
from softmoe.harness.errors import ConfigError, RunDirInUseError
from softmoe.harness.loop import train
from softmoe.harness.runs import RunDirLock, load_run, read_events, remove_if_unused


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, compose_run):
    """Two tiny runs (3 steps, 2 blocks) of 4 and 8 experts, in ``<sweep>/0`` and ``<sweep>/1``."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    for job, experts in enumerate((4, 8)):
        overrides = [f"moe.num_experts={experts}", "model.depth=2", "trainer.max_steps=3", "trainer.batch_size=64",
                     "trainer.eval_batches=1", "logger=none", "trainer.progress_bar=false"]
        train(compose_run(*overrides), sweep_dir / str(job))
    return sweep_dir


def test_load_run_rebuilds_the_checkpointed_model(sweep):
    run = load_run(sweep / "1", "last", device="cpu")
    assert run.step == 3 and run.checkpoint == sweep / "1" / "last.pt" and not run.model.training
    assert run.cfg.moe.num_experts == 8 and len(run.data.test) == 360
    saved = torch.load(run.checkpoint, weights_only=True)["model"]
    for name, tensor in run.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name


def test_load_run_names_what_is_wrong(sweep, tmp_path):
    with pytest.raises(ConfigError, match="checkpoint=latest: must be one of best, last"):
        load_run(sweep / "0", "latest")
    with pytest.raises(CheckpointError, match=f"run_dir={tmp_path}: holds no best.pt"):
        load_run(tmp_path)
    # the routing notebook reads SOFTMOE_CHECKPOINT, and its errors say so (was: "pass checkpoint=last", which a
    # notebook cannot take)
    with pytest.raises(ConfigError, match="^SOFTMOE_CHECKPOINT=latest: must be one of best, last$"):
        load_run(sweep / "0", "latest", checkpoint_key="SOFTMOE_CHECKPOINT")
    no_best = tmp_path / "no_best"
    no_best.mkdir()
    shutil.copy(sweep / "0" / "last.pt", no_best / "last.pt")  # a data.val_size=0 run's
    with pytest.raises(CheckpointError, match="validation\\); set SOFTMOE_CHECKPOINT=last$"):
        load_run(no_best, checkpoint_key="SOFTMOE_CHECKPOINT")
    placeholder = "../outputs/runs/<date>/<time>"  # the routing notebook's RUN_DIR, left as it is
    with pytest.raises(CheckpointError, match=f"run_dir={placeholder}: no such directory"):
        load_run(placeholder)
    # and SOFTMOE_RUN_DIR (was: "run_dir=", a setting the notebook has not)
    with pytest.raises(CheckpointError, match=f"^SOFTMOE_RUN_DIR={placeholder}: no such directory"):
        load_run(placeholder, run_dir_key="SOFTMOE_RUN_DIR")
    multirun = tmp_path / "multirun"  # Hydra's sweep directory: multirun.yaml beside its jobs' run directories
    for job in ("0", "1"):
        (multirun / job / ".hydra").mkdir(parents=True)
    (multirun / "multirun.yaml").touch()
    with pytest.raises(CheckpointError, match=f"^SOFTMOE_RUN_DIR={multirun}: a sweep directory; evaluate one of its "
                                              f"runs: SOFTMOE_RUN_DIR={multirun / '0'} \\(runs 0-1\\)$"):
        load_run(multirun, run_dir_key="SOFTMOE_RUN_DIR")
    best = sweep / "0" / "best.pt"  # a checkpoint's path where its run directory's was meant
    with pytest.raises(CheckpointError, match=f"^run_dir={best}: a file, not a directory \\(a training run directory "
                                              "holds best.pt and last.pt\\)$"):
        load_run(best)


def test_read_events_skips_a_torn_last_line(tmp_path):
    lines = '{"step": 1, "train/loss": 2.0}\n{"step": 2, "val/acc": 0.5}\n{"step": 3, "tr'
    (tmp_path / "metrics.jsonl").write_text(lines)
    assert read_events(tmp_path) == [{"step": 1, "train/loss": 2.0}, {"step": 2, "val/acc": 0.5}]


def test_a_metrics_line_that_is_json_but_no_object_is_no_event(tmp_path):
    # was: collect stopped in run_files.numeric_history's AttributeError ("'NoneType' object has no attribute 'items'")
    from softmoe.harness.run_files import read_metrics

    (tmp_path / "metrics.jsonl").write_text('null\n3\n{"step": 1, "train/loss": 2.0}\nNaN\n[1]\n')
    assert read_events(tmp_path) == [{"step": 1, "train/loss": 2.0}]
    assert read_metrics(tmp_path / "metrics.jsonl") == {"step": [1], "train/loss": [2.0]}


def test_a_second_lock_on_a_run_directory_names_its_holder(tmp_path):
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirInUseError) as raised:
            RunDirLock(tmp_path).acquire()
        assert str(raised.value) == (
            f"{tmp_path}: in use by process {os.getpid()} on {socket.gethostname()}; wait for it to end or stop it, "
            "or give this run another hydra.run.dir"
        )
    with RunDirLock(tmp_path):  # released: free again
        pass


def test_only_a_run_directory_holding_nothing_but_hydras_files_is_removed(tmp_path):
    unused, used = tmp_path / "unused", tmp_path / "used"
    for run_dir in (unused, used):
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text("seed: 0\n")
        (run_dir / ".lock").write_text("process 1 on here\n")  # the lock the run took before it was refused
        handler = logging.FileHandler(run_dir / "train.log")
        logging.getLogger().addHandler(handler)  # as Hydra opens it
    try:
        (used / "metrics.jsonl").write_text("")
        assert remove_if_unused(unused) and not unused.exists()
        assert not remove_if_unused(used) and (used / ".hydra").is_dir()
        assert not any(getattr(h, "baseFilename", "").startswith(str(unused)) for h in logging.getLogger().handlers)
    finally:  # a failed assertion must not leave this worker's later records logged to these files
        for h in [h for h in logging.getLogger().handlers if getattr(h, "baseFilename", "").startswith(str(tmp_path))]:
            logging.getLogger().removeHandler(h)
            h.close()


def test_the_sweep_record_is_put_back_as_it_was_found_and_removed_where_there_was_none(tmp_path):
    from softmoe.harness.runs import read_sweep_record, restore_sweep_record

    assert read_sweep_record(tmp_path / "new") is None  # a new sweep: no directory yet
    (tmp_path / "multirun.yaml").write_text("rewritten by the sweeper of a refused rerun\n")
    restore_sweep_record(tmp_path, None)  # there was none: the refused sweep leaves none
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "multirun.yaml").write_text("rewritten\n")
    restore_sweep_record(tmp_path, b"hydra: {the earlier sweep's}\n")
    assert [path.name for path in tmp_path.iterdir()] == ["multirun.yaml"]  # no temporary file left beside it
    assert read_sweep_record(tmp_path) == b"hydra: {the earlier sweep's}\n"


def test_the_lock_names_only_its_present_holder_not_the_one_before(tmp_path):
    (tmp_path / ".lock").write_text("process 1 on an-earlier-host\n")  # left by a run that ended
    with RunDirLock(tmp_path):
        with pytest.raises(RunDirInUseError, match=f"in use by process {os.getpid()} on {socket.gethostname()}; "):
            RunDirLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == f"process {os.getpid()} on {socket.gethostname()}\n"
