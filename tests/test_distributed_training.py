"""Data parallel and expert-parallel training under a real ``torchrun`` on gloo processes, against one process.

One ``torchrun`` launch runs a four-job sweep (``moe.expert_parallel=false,true`` x ``optimizer.fused=false,true``:
starting processes costs more than training the tiny model; a fused optimizer checks for NaN on the device). All
jobs resume from a single-process run's step-3 checkpoint (saved unfused) and train to step 6, so they exercise
resuming (the sampler's position, the RNGs, and under expert parallelism the experts' weights and Adam moments
sharded from a whole-model checkpoint) as well as training, checkpointing and telemetry.

The launches after it continue one chain across strategies, 3 steps each, every stage against an uninterrupted
one-process run to the same step: 2 DDP + EP ranks (that sweep's job 2, step 6, ``last.pt``) -> 2 FSDP + EP ranks
(step 9, sharded ``last.dcp``) -> 4 DDP + EP ranks as 2 x 2 and 1 x 4 (step 12, ``last.pt``), and one process
resuming the FSDP run's directory by itself (step 12).
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from conftest import CONF_DIR
from softmoe.evaluate import evaluate_run
from softmoe.harness.checkpoint import load_checkpoint, save_checkpoint
from softmoe.harness.config import ConfigError
from softmoe.harness.distributed import Distributed
from softmoe.harness.errors import RunDirInUseError
from softmoe.harness.faults import PreemptionGuard
from softmoe.harness.loop import train
from softmoe.harness.runs import RunDirLock, read_events
from softmoe.harness.sharded_checkpoint import TRAIN_STATE, read_train_state
from softmoe.harness.sampler import ResumableSampler, ShardedSampler
from test_expert_parallel import free_port, start_two_ranks

ROOT = Path(CONF_DIR).parent
# Deterministic and schedule-free (a constant rate: a 3-step run is the first half of a 6-step one); no dropout
# and no stochastic depth (each rank draws its own drop-path masks, one process draws the whole batch's).
RUN = [
    "model.depth=2", "model.drop_path_rate=0.0", "moe.layers=[1]", "moe.num_experts=4", "trainer.batch_size=64",
    "trainer.eval_batches=1",
    "trainer.eval_batch_size=101", "trainer.log_every=1", "scheduler=constant", "logger=none",
    "trainer.progress_bar=false",
]
# float32 sums in another order (per-rank means, then the mean over ranks), through 3 Adam steps
CLOSE = dict(rtol=1e-5, atol=1e-5)  # measured: weights within 1e-6, Adam moments 1e-8


def read_metrics(run_dir):
    return read_events(run_dir)


RESUMED_STEPS = 3  # every multi-process stage trains 3 steps from the checkpoint before it


@pytest.fixture(scope="module")
def single_process_runs(compose_run, tmp_path_factory):
    """{steps: a one-process run to that step}: step 3's to resume from; 6, 9 and 12, uninterrupted, to compare each
    stage of the chain with (about a second each: the model is tiny)."""
    tmp = tmp_path_factory.mktemp("single_process")
    for steps in (3, 6, 9, 12):
        train(compose_run(*RUN, f"trainer.max_steps={steps}"), tmp / str(steps))
    return {steps: tmp / str(steps) for steps in (3, 6, 9, 12)}


def torchrun_sweep(checkpoint, output_dir, processes, *overrides, steps=6):
    """Resume ``checkpoint`` (``last.pt`` or ``last.dcp``) to step ``steps`` in a multirun on ``processes`` gloo ranks:
    (sweep dir, the process)."""
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",  # = torchrun
        "-m", "softmoe.train", "-m", *overrides, *RUN, f"trainer.max_steps={steps}",
        f"trainer.resume={checkpoint}", f"paths.output_dir={output_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (sweep,) = output_dir.glob("multiruns/*/*")  # one sweep directory: every rank used rank 0's ${now:}
    assert not (output_dir / "runs").exists()
    return sweep, result


@pytest.fixture(scope="module")
def runs(single_process_runs, tmp_path_factory):
    """(single-process run dir to step 6, torchrun sweep dir, the torchrun process) once the four jobs are done."""
    output_dir = tmp_path_factory.mktemp("distributed") / "outputs"
    sweep_overrides = ["moe.expert_parallel=false,true", "optimizer.fused=false,true"]
    sweep, result = torchrun_sweep(single_process_runs[3] / "last.pt", output_dir, 2, *sweep_overrides)
    return single_process_runs[6], sweep, result


@pytest.fixture(scope="module")
def mesh_runs(single_process_runs, fsdp_run, tmp_path_factory):
    """(single-process run dir to step 12, sweep dir) of 4 DDP ranks as 2 replicas x 2 expert ranks (job 0) and
    1 x 4 (job 1), resumed from the sharded ``last.dcp`` the 2 FSDP + EP ranks wrote at step 9."""
    output_dir = tmp_path_factory.mktemp("mesh") / "outputs"
    _, fsdp_dir = fsdp_run
    sweep, _ = torchrun_sweep(fsdp_dir / "last.dcp", output_dir, 4, "trainer.expert_parallel_size=2,4", steps=12)
    return single_process_runs[12], sweep


def assert_same_training(run_dir, single, name):
    """The steps resumed in ``run_dir`` log the metrics of ``single`` (one process, uninterrupted, to the same step),
    and save its model and Adam state."""
    reference, events = train_events(single), train_events(run_dir)
    last = max(reference)
    assert sorted(events) == list(range(last - RESUMED_STEPS + 1, last + 1))  # resumed: nothing before logged
    for step, event in events.items():
        for key in ("train/loss", "train/acc", "train/grad_norm", "train/lr"):
            assert event[key] == pytest.approx(reference[step][key], rel=1e-5), (name, step, key)
    (val,) = [e for e in read_metrics(run_dir) if "val/loss" in e]
    (reference_val,) = [e for e in read_metrics(single) if "val/loss" in e]
    assert val["val/acc"] == reference_val["val/acc"]
    assert val["val/loss"] == pytest.approx(reference_val["val/loss"], rel=1e-5)

    # the whole single-process model and optimizer state, whatever the experts' placement while training
    ours, theirs = load_checkpoint(run_dir / "last.pt"), load_checkpoint(single / "last.pt")
    assert ours["step"] == last and list(ours["model"]) == list(theirs["model"])
    for key, value in theirs["model"].items():
        torch.testing.assert_close(ours["model"][key], value, **CLOSE, msg=lambda m: f"{name} {key}: {m}")
    for index, state in theirs["optimizer"]["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(ours["optimizer"]["state"][index][key], value, **CLOSE)


def train_events(run_dir):
    return {e["step"]: e for e in read_metrics(run_dir) if "train/loss" in e}


@pytest.mark.slow
@pytest.mark.parametrize("job,name", [
    (0, "data parallel"), (1, "data parallel, fused"), (2, "expert parallel"), (3, "expert parallel, fused")
])
def test_two_ranks_match_one_process(runs, job, name):
    single, sweep, _ = runs
    run_dir = sweep / str(job)
    # one writer: the checkpoints, metrics, log and lock of rank 0, nothing per rank (best.pt only when validation
    # beat the best of the checkpoint resumed from)
    written = {path.name for path in run_dir.iterdir()} - {"best.pt"}
    assert written == {".hydra", ".lock", "last.pt", "metrics.jsonl", "train.log"}
    assert_same_training(run_dir, single, name)
    # each job ran as its name says: matching one process would not show a sweep value silently ignored
    log = (run_dir / "train.log").read_text()
    expert_parallel = "expert parallel: 1 data-parallel replica x 2 expert ranks" in log
    fused = {group["fused"] for group in load_checkpoint(run_dir / "last.pt")["optimizer"]["param_groups"]}
    assert (expert_parallel, fused) == ("expert parallel" in name, {"fused" in name}), (expert_parallel, fused)


@pytest.mark.slow
@pytest.mark.parametrize("job,name", [(0, "2 replicas x 2 expert ranks"), (1, "1 replica x 4 expert ranks")])
def test_four_ranks_on_a_data_by_expert_mesh_resume_an_fsdp_run_and_match_one_process(mesh_runs, fsdp_run, job, name):
    # DDP + EP resuming the sharded checkpoint of 2 FSDP + EP ranks: each rank reads its experts' slices and the
    # replicated weights from last.dcp, then writes the gathered last.pt of its own strategy
    single, sweep = mesh_runs
    assert_same_training(sweep / str(job), single, name)
    log = (sweep / str(job) / "train.log").read_text()
    mesh = "2 data-parallel replicas x 2 expert ranks" if job == 0 else "1 data-parallel replica x 4 expert ranks"
    assert f"expert parallel: {mesh}" in log  # was "1 data-parallel replicas"
    assert f"resuming from {fsdp_run[1] / 'last.dcp'} at step 9 of 12" in log
    assert not (sweep / str(job) / "last.dcp").exists()


@pytest.mark.slow
def test_a_run_trained_on_two_ranks_with_expert_parallelism_evaluates_on_one(runs, tmp_path):
    single, sweep, _ = runs
    ours = evaluate_run(sweep / "2", tmp_path / "ours", checkpoint="last", images="all")  # the whole test split
    theirs = evaluate_run(single, tmp_path / "theirs", checkpoint="last", images="all")  # (one process)
    assert ours["step"] == 6 and ours["test/examples"] == 360
    assert ours["test/acc"] == theirs["test/acc"] and ours["test/loss"] == pytest.approx(theirs["test/loss"], rel=1e-5)


@pytest.mark.slow
def test_other_ranks_log_nothing_to_the_console_below_warnings(runs):
    *_, result = runs
    output = result.stdout + result.stderr
    assert output.count("done: test accuracy") == 4  # rank 0, once per job
    # and Hydra's own lines, once for the sweep and once per job (was: once per rank)
    assert output.count("[HYDRA] Launching 4 jobs locally") == 1, output[-3000:]
    for job in range(4):
        assert output.count(f"[HYDRA] \t#{job} : ") == 1, output[-3000:]


def test_another_rank_shows_its_own_warnings_and_errors_but_not_those_rank_0_shows_for_every_rank(monkeypatch):
    """Was: a config warning (``scheduler.warmup_steps=50 is longer than this run allows``) once per rank."""
    import io

    from softmoe.harness.sweep_console import EVERY_JOB, show_only_this_ranks_own_warnings

    console = logging.StreamHandler(io.StringIO())
    monkeypatch.setattr(logging.getLogger(), "handlers", [console])  # the console alone: pytest's own stay as they are
    show_only_this_ranks_own_warnings()
    show_only_this_ranks_own_warnings()  # once is enough: a second call adds no second filter
    log = logging.getLogger("softmoe.harness.optim")
    log.warning("scheduler.warmup_steps=50 is longer than this run allows")  # every rank's: rank 0 shows it
    log.warning("SIGTERM received: stopping after this step", extra=EVERY_JOB)  # this rank's alone
    log.error("a rank's error")
    assert console.stream.getvalue() == "SIGTERM received: stopping after this step\na rank's error\n"
    assert len(console.filters) == 1


@pytest.mark.slow
def test_the_console_shows_the_training_metrics_averaged_over_the_ranks_as_metrics_jsonl_does(runs):
    # each rank trains on its own slice, so rank 0's own loss is not the step's; the epoch line shows the logged one
    _, sweep, _ = runs
    for job in range(4):
        e = train_events(sweep / str(job))[6]
        line = f"step 6  train loss {e['train/loss']:.4f} acc {e['train/acc']:.2%} ({e['train/throughput']:.0f} img/s)"
        assert line in (sweep / str(job) / "train.log").read_text(), job


@pytest.mark.slow
def test_the_model_line_counts_the_whole_model_under_expert_parallelism(runs):
    _, sweep, _ = runs  # an expert-parallel rank (jobs 2 and 3) holds half of each expert bank
    logs = [(sweep / str(job) / "train.log").read_text() for job in range(4)]
    assert [log.split(" parameters;")[0].rsplit(", ", 1)[1] for log in logs] == ["0.20M"] * 4


def rank_pids(agent_pid):
    """{rank: pid} of the worker processes a torchrun agent started (read from /proc)."""
    pids = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue  # the process ended meanwhile
        rank = [entry[5:] for entry in environ if entry.startswith(b"RANK=")]
        if parent == agent_pid and rank:
            pids[int(rank[0])] = int(stat.parent.name)
    return pids


def torchrun_run(run_dir, processes, *overrides):
    """``softmoe.train`` on ``processes`` gloo ranks in ``run_dir``, to its end."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "softmoe.train", *overrides, f"hydra.run.dir={run_dir}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.slow
def test_a_resume_between_two_log_events_logs_what_the_uninterrupted_run_logged(compose_run, tmp_path):
    """A checkpoint between log events holds the batches since the last one, each rank its own share: rank 0's alone
    was saved and every rank of the resumed run took it, so the first training metrics logged after a resume were
    off (train/loss by 0.006 in a helper's run). Logged every 4 steps, checkpointed every 3: ``last.prev.pt`` of
    the 8-step run holds step 6, with steps 5-6 not yet logged."""
    run = [override for override in RUN if not override.startswith("trainer.log_every=")]
    run += ["trainer.log_every=4", "trainer.checkpoint_every=3", "trainer.max_steps=8"]
    torchrun_run(tmp_path / "whole", 2, *run)
    step_6 = tmp_path / "whole" / "last.prev.pt"
    saved = load_checkpoint(step_6)
    assert saved["step"] == 6 and saved["window"]["seen"] == 64  # steps 5-6: 32 images a step on rank 0
    (logged,) = [e for e in train_events(tmp_path / "whole").values() if e["step"] == 8]
    torchrun_run(tmp_path / "two_ranks", 2, *run, f"trainer.resume={step_6}")  # each rank continues its own
    train(compose_run(*run, f"trainer.resume={step_6}"), tmp_path / "one_process")  # their sums, in one
    for resumed, exact in (("two_ranks", True), ("one_process", False)):
        (event,) = train_events(tmp_path / resumed).values()
        for key in ("train/loss", "train/acc"):
            assert event[key] == (logged[key] if exact else pytest.approx(logged[key], rel=1e-5)), (resumed, key)


# The signal goes to rank 1 once rank 0 logged step 1 and stops every rank at the end of the step running then
# (step 2 in every measured run); the rerun trains the rest. 12 steps saved some 2 s, but left the test's poll and
# /proc scan about 0.5 s to send the signal before the run ended: a descheduled test would have failed.
SIGTERM_RUN_STEPS = 40


@pytest.mark.slow
@pytest.mark.parametrize("strategy,last", [("ddp", "last.pt"), ("fsdp", "last.dcp")])
def test_sigterm_to_one_rank_stops_every_rank_after_the_same_step_and_a_rerun_resumes(tmp_path, strategy, last):
    run_dir = tmp_path / "run"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "softmoe.train",
        *RUN, f"trainer.max_steps={SIGTERM_RUN_STEPS}", "trainer.checkpoint_every=1000", f"trainer.strategy={strategy}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    agent = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not [e for e in read_metrics(run_dir) if "train/lr" in e] if (run_dir / "metrics.jsonl").exists() else True:
        assert agent.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.01)
    os.kill(rank_pids(agent.pid)[1], signal.SIGTERM)  # the other rank, not the one that writes
    output = agent.communicate(timeout=300)[0]
    assert agent.returncode != 0, output[-3000:]
    saved = (read_train_state if strategy == "fsdp" else load_checkpoint)(run_dir / last)["step"]
    assert 1 <= saved < SIGTERM_RUN_STEPS, output[-3000:]
    assert f"SIGTERM received: saved {last} at step {saved}" in output, output[-3000:]
    assert "resume with: torchrun --standalone --nproc_per_node=2 -m softmoe.train " in output  # it finds last.dcp too
    # torchrun's failure report, after every line of the run, ends with the root cause: that line
    root_cause = output.split("Root Cause (first observed failure):")[1]
    assert f"traceback : SIGTERM received: saved {last} at step {saved}" in root_cause, output[-3000:]
    assert max(e["step"] for e in read_metrics(run_dir) if "train/lr" in e) == saved  # rank 0 stopped there too

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert [e["step"] for e in read_metrics(run_dir) if "train/lr" in e] == list(range(1, SIGTERM_RUN_STEPS + 1))
    assert (read_train_state if strategy == "fsdp" else load_checkpoint)(run_dir / last)["step"] == SIGTERM_RUN_STEPS


def exchange_signals_while_one_arrives_midway(rank, init_file, results_dir):
    """Two exchanges of preemption signals; SIGTERM reaches rank 1 while it waits for rank 0 in the first."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    distributed = Distributed(rank=rank, world_size=2, data_parallel=True)
    agreed = []
    with PreemptionGuard() as guard:
        for exchange in range(2):
            if exchange == 0 and rank == 1:
                threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM)).start()
            if exchange == 0 and rank == 0:
                time.sleep(1.5)  # rank 1 is inside the exchange when its signal arrives
            distributed.share_signal(guard)
            agreed.append(guard.requested)
    (Path(results_dir) / f"rank{rank}.json").write_text(json.dumps(agreed))
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_signal_that_arrives_during_the_exchange_stops_every_rank_at_the_next_one(tmp_path):
    start_two_ranks(exchange_signals_while_one_arrives_midway, tmp_path / "init", tmp_path)
    agreed = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert agreed == [[None, signal.SIGTERM]] * 2  # not lost: rank 1 had sent 0 before it arrived


def claim_a_held_run_dir(rank, init_file, run_dir, results_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        Distributed(rank=rank, world_size=2, data_parallel=True).claim_run_dir(run_dir)
        outcome = "claimed"
    except RunDirInUseError as error:
        outcome = str(error)
    (Path(results_dir) / f"rank{rank}.txt").write_text(outcome)
    dist.destroy_process_group()


@pytest.mark.slow
def test_a_launch_on_a_run_directory_another_process_holds_is_refused_on_every_rank(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    held = RunDirLock(run_dir).acquire()  # this process holds it, as a live run would
    try:
        start_two_ranks(claim_a_held_run_dir, tmp_path / "init", run_dir, tmp_path)
    finally:
        held.release()
    outcomes = [(tmp_path / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert outcomes[0] == outcomes[1] and outcomes[0].startswith(f"{run_dir}: in use by process {os.getpid()} on ")


@pytest.mark.slow
def test_a_bad_value_under_torchrun_is_one_line_and_makes_no_run_directory(tmp_path):
    # was: each rank made the default run directory and printed the line, and the first rank to refuse removed the
    # directory while another rank's Hydra opened its train.log there: a FileNotFoundError traceback, exit status 1
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "softmoe.train", "moe.num_experts=0", "logger=none"]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                            capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "exitcode  : 2 " in output, output[-3000:]  # torchrun's report of each rank
    line = "error: moe.num_experts=0: must be a positive integer"
    assert output.splitlines().count(line) == 1, output[-3000:]
    # and that report, the last lines on screen, names it for each rank (was: "To enable traceback see: ...")
    assert output.count(f"  traceback : {line}\n") == 2 and "To enable traceback" not in output, output[-3000:]
    assert "Error: [Errno" not in output and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- in process, no launch


@pytest.mark.parametrize("size", [50, 59])  # 59: 11 examples of a partial batch, more than a rank's 4 of a batch
def test_each_rank_takes_its_slice_of_the_single_process_batches(size):
    single = ResumableSampler(size, seed=3)
    ranks = [ShardedSampler(size, 3, batch_size=12, rank=r, world_size=3) for r in range(3)]
    for skip in (0, 24):  # a resumed epoch skips whole global batches
        single.set_epoch(2, skip=skip)
        for sampler in ranks:
            sampler.set_epoch(2, skip=skip)
        order = list(single)
        shares = [list(sampler) for sampler in ranks]
        assert [len(share) for share in shares] == [len(sampler) for sampler in ranks] == [(size - skip) // 12 * 4] * 3
        for batch in range((size - skip) // 12):  # the global batch = the ranks' batches, in rank order
            global_batch = sum((share[4 * batch : 4 * batch + 4] for share in shares), [])
            assert global_batch == order[12 * batch : 12 * batch + 12]


TORCHRUN_ENV = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}


def without_torchrun(monkeypatch):
    """No torchrun variables now, and none after the test, even those the code under test exports."""
    for name in [*TORCHRUN_ENV, "LOCAL_WORLD_SIZE"]:
        monkeypatch.setenv(name, "")  # records the variable's state before the test, to be restored
        monkeypatch.delenv(name)


def test_a_bad_launch_stops_train_before_the_process_group_or_data(compose_run, monkeypatch, tmp_path):
    # every launch rule and its message: tests/test_configs.py (config.check_launch)
    without_torchrun(monkeypatch)
    with pytest.raises(ConfigError, match="^trainer.strategy=ddp: needs a torchrun launch"):
        train(compose_run("trainer.strategy=ddp", "logger=none"), tmp_path)


@pytest.fixture
def agent_store(monkeypatch, tmp_path):
    """A store as torchrun's agent holds one, and the variables its workers see, for a launch of 2 ranks."""
    from datetime import timedelta

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=60))
    torchrun = {"TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_ERROR_FILE": str(tmp_path / "error.json"),
                "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(store.port), "WORLD_SIZE": "2", "RANK": "1",
                "GROUP_RANK": "1", "TORCHELASTIC_RUN_ID": "launch", "TORCHELASTIC_RESTART_COUNT": "0"}
    for name, value in torchrun.items():
        monkeypatch.setenv(name, value)
    return store


def meet_in_a_thread(refusal):
    """One rank's :func:`other_ranks_refusal`, run in a thread: (the thread, a list that gets its result)."""
    from softmoe.harness.launch_check import other_ranks_refusal

    result = []
    rank = threading.Thread(target=lambda: result.append(other_ranks_refusal(refusal)))
    rank.start()
    return rank, result


@pytest.mark.parametrize("first_refuses", [True, False], ids=["the refusing rank comes first", "it comes last"])
def test_a_refusal_is_heard_by_every_rank_before_any_goes_on_and_the_refusing_rank_waits_for_them(
    agent_store, first_refuses
):
    """torchrun's agent stops the other ranks once one exits: a rank stopped before its refusal was in its error file
    showed in the report as "Signal 15 (SIGTERM)"; and a rank of another node that passed its checks went on into
    init_process_group, waiting for the refused ranks until torch's timeout."""
    from softmoe.harness.launch_check import other_ranks_refusal

    refusal = "trainer.resume=/gone/last.pt: no such file or directory"
    first, result = meet_in_a_thread(refusal if first_refuses else None)
    while agent_store.add("softmoe/launch/launch/0/checked", 0) < 1:  # until the first rank counted itself
        assert first.is_alive(), "the first rank returned before it counted itself"
        time.sleep(0.01)
    time.sleep(0.2)
    assert first.is_alive()  # waiting for the other rank
    heard = other_ranks_refusal(None if first_refuses else refusal)  # the other rank, the last: it lets the first go
    first.join(timeout=60)
    assert not first.is_alive()
    said = f"rank 1 (node 1) refused the launch: {refusal}"
    assert (heard, result) == ((said, [None]) if first_refuses else (None, [said]))


def test_ranks_that_all_pass_go_on_and_a_rank_alone_goes_on_after_the_timeout(agent_store, monkeypatch):
    from softmoe.harness.launch_check import other_ranks_refusal

    first, result = meet_in_a_thread(None)
    assert other_ranks_refusal(None) is None
    first.join(timeout=60)
    assert result == [None]
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "another launch")
    began = time.monotonic()
    assert other_ranks_refusal("a refusal", timeout=0.5) is None  # alone: it waits a while, then exits all the same
    assert other_ranks_refusal(None, timeout=0.5) is None  # (a passing rank goes on into init_process_group)
    assert time.monotonic() - began < 30


@pytest.mark.slow
def test_a_node_that_refuses_ends_the_launch_on_every_node(tmp_path):
    """Two torchrun agents on this machine, each a node of one rank; node 1 cannot find the checkpoint its command
    line names. Was: node 0's rank waited in init_process_group until torch's timeout (30 minutes)."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", f"--node_rank={node}",
         "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "softmoe.train", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}", *(["trainer.resume=/gone/last.pt"] if node else [])],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for node in (0, 1)]
    outputs = [node.communicate(timeout=240)[0] for node in nodes]
    refusal = "trainer.resume=/gone/last.pt: no such file or directory"
    assert [node.returncode for node in nodes] == [1, 1], outputs  # torchrun's status for a failed worker
    assert f"error: not started: rank 1 (node 1) refused the launch: {refusal}" in outputs[0], outputs[0][-3000:]
    assert "exitcode  : 2 " in outputs[0] and "exitcode  : 2 " in outputs[1]
    assert f"error: {refusal}" in outputs[1], outputs[1][-3000:]
    assert "waitForInput" not in outputs[0] + outputs[1]  # c10d's two lines per timed-out wait in the store
    assert not (tmp_path / "run").exists()


def test_one_process_is_not_distributed(compose_run, monkeypatch):
    without_torchrun(monkeypatch)
    setup = Distributed.from_config(compose_run())
    assert (setup.data_parallel, setup.expert_parallel, setup.world_size, setup.is_main) == (False, False, 1, True)


def test_a_slurm_job_of_several_submitit_tasks_is_a_torchrun_launch(compose_run, monkeypatch, tmp_path):
    # the variables SLURM sets for task 3 of a 2-node x 2-task job started by submitit (launcher=slurm)
    slurm = {
        "SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": "2",
        "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_PROCID": "3", "SLURM_LOCALID": "1",
    }
    without_torchrun(monkeypatch)
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    indivisible = "^trainer.batch_size=6: the global batch must be divisible by the 4 processes"
    with pytest.raises(ConfigError, match=indivisible):
        train(compose_run("trainer.batch_size=6", "logger=none"), tmp_path)  # a data-parallel launch of 4 ranks
    exported = [os.environ[name] for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")]
    assert exported == ["3", "4", "1", "2", "gpu07"]  # LOCAL_WORLD_SIZE: whether expert groups fit in a node


# ----------------------------------------------------------------------------- several nodes (no cluster here)


def test_expert_groups_of_a_2_node_by_8_gpu_job_stay_inside_a_node():
    """SLURM numbers a job's tasks node by node (its default block distribution: rank = node x 8 + local rank), and
    the mesh puts consecutive ranks in an expert group, so a group of 8, 4 or 2 ranks never leaves its node."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from softmoe.parallel import expert_data_mesh

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=16)  # this process is rank 0 of 16
    try:
        for size in (8, 4, 2):
            mesh = expert_data_mesh("cpu", size)
            groups = mesh.mesh.tolist()  # [data replica][expert rank] -> global rank
            assert all(len({rank // 8 for rank in group}) == 1 for group in groups), (size, groups)
            assert dist.get_process_group_ranks(mesh["expert"].get_group()) == list(range(size))
            assert dist.get_process_group_ranks(mesh["data"].get_group()) == list(range(0, 16, size))
    finally:
        dist.destroy_process_group()


def test_expert_groups_that_span_nodes_are_warned_about(monkeypatch, caplog):
    from softmoe.harness.distributed import warn_if_expert_groups_span_nodes

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with caplog.at_level(logging.WARNING):
        warn_if_expert_groups_span_nodes(4)
        assert not caplog.records
        warn_if_expert_groups_span_nodes(16)
    (record,) = caplog.records
    assert "expert groups of 16 ranks span nodes of 8 processes" in record.getMessage()


def test_a_2_node_by_8_gpu_slurm_job_composes_one_task_per_gpu(compose_run):
    cfg = compose_run("launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=8", hydra_node=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["gpus_per_node"], launcher["tasks_per_node"]) == (2, 8, 8)
    one_gpu = OmegaConf.to_container(compose_run("launcher=slurm", hydra_node=True).hydra.launcher, resolve=True)
    assert (one_gpu["nodes"], one_gpu["gpus_per_node"], one_gpu["tasks_per_node"]) == (1, 1, 1)  # sweeps of 1-GPU jobs


STAND_INS = {  # SLURM's commands as submitit calls them: sbatch keeps the script it is given and answers as sbatch
    # copied, then renamed into place: the test reads the script as soon as its name exists, never half-copied
    "sbatch": '#!/bin/sh\ncp "$1" "$SBATCH_CAPTURE.part" && mv "$SBATCH_CAPTURE.part" "$SBATCH_CAPTURE"\n'
              'echo "Submitted batch job 4242"\n',
    "srun": "#!/bin/sh\nexit 1\n",  # submitit only checks that it exists before submitting
}


@pytest.mark.slow
def test_the_2_node_by_8_gpu_command_submits_16_ranks_that_requeue_on_preemption(tmp_path):
    """The documented command (docs/scale_out.md), through Hydra's submitit launcher, up to the sbatch script it
    submits; the job itself cannot run here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, script in STAND_INS.items():
        (bin_dir / name).write_text(script)
        (bin_dir / name).chmod(0o755)
    script = tmp_path / "submitted.sh"
    command = [
        sys.executable, "-m", "softmoe.train", "-m", "launcher=slurm", "launcher.nodes=2", "launcher.gpus_per_node=8",
        "trainer.expert_parallel_size=4", "moe.num_experts=128", "logger=none", f"paths.output_dir={tmp_path / 'out'}",
    ]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_CAPTURE": str(script)}
    launch = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not script.exists():  # afterwards the launcher waits for the job's results, forever here
            assert launch.poll() is None and time.monotonic() < deadline, "nothing was submitted"
            time.sleep(0.2)
    finally:
        launch.kill()
        launch.wait()
    lines = script.read_text().splitlines()
    for line in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR2@120", "--open-mode=append"):
        assert f"#SBATCH {line}" in lines  # 16 ranks; SIGUSR2 120 s before the limit: save, then requeue
    (srun,) = [line for line in lines if line.startswith("srun ")]
    assert " -u -m submitit.core._submit " in srun and srun.split()[-1].startswith(str(tmp_path / "out"))
    assert "export SUBMITIT_EXECUTOR=slurm" in lines  # each task becomes a rank: export_submitit_tasks


# trainer.strategy=fsdp: the one torchrun end-to-end test of FSDP2 and sharded checkpoints ------------------------


@pytest.fixture(scope="module")
def fsdp_run(single_process_runs, runs, tmp_path_factory):
    """(single-process run dir to step 9, the run dir of 2 ranks under FSDP + 2 expert ranks resumed from the step-6
    last.pt of 2 DDP + EP ranks, ``runs``' job 2), built on the meta device (trainer.init_device=meta: nothing drawn,
    the checkpoint writes every piece)."""
    _, ddp_sweep, _ = runs
    output_dir = tmp_path_factory.mktemp("fsdp") / "outputs"
    overrides = "trainer.strategy=fsdp", "trainer.expert_parallel_size=2", "trainer.init_device=meta"
    sweep, _ = torchrun_sweep(ddp_sweep / "2" / "last.pt", output_dir, 2, *overrides, steps=9)
    return single_process_runs[9], sweep / "0"


@pytest.mark.slow
def test_fsdp_with_expert_parallelism_resumes_a_ddp_run_and_writes_sharded_checkpoints(fsdp_run, tmp_path):
    from safetensors.torch import load_file

    from softmoe.harness import sharded_checkpoint
    from softmoe.to_safetensors import main as to_safetensors

    single, run_dir = fsdp_run
    reference, events = train_events(single), train_events(run_dir)
    assert sorted(events) == [7, 8, 9]  # resumed after step 6, from the gathered last.pt of 2 DDP + EP ranks
    for step, event in events.items():
        for key in ("train/loss", "train/grad_norm"):
            assert event[key] == pytest.approx(reference[step][key], rel=1e-5), (step, key)
    log = (run_dir / "train.log").read_text()
    assert "checkpoints: sharded (torch.distributed.checkpoint)" in log
    assert "trainer.init_device=meta: no weights drawn, the checkpoint provides them" in log
    assert not (run_dir / "last.pt").exists() and sorted(p.name for p in (run_dir / "last.dcp").glob("*.distcp")) == [
        "__0_0.distcp", "__1_0.distcp"
    ]

    # the sharded checkpoint read on one process: the single-process run's weights; evaluated; exported
    whole, theirs = sharded_checkpoint.read_model(run_dir / "last.dcp"), load_checkpoint(single / "last.pt")["model"]
    assert list(whole) == list(theirs)
    for key, value in theirs.items():
        torch.testing.assert_close(whole[key], value, **CLOSE, msg=lambda m: f"{key}: {m}")
    ours = evaluate_run(run_dir, tmp_path / "ours", checkpoint="last")
    assert ours["step"] == 9 and ours["checkpoint"].endswith("last.dcp")
    assert ours["test/acc"] == evaluate_run(single, tmp_path / "theirs", checkpoint="last")["test/acc"]
    assert to_safetensors([str(run_dir / "last.dcp"), str(tmp_path / "model.safetensors")]) == 0
    exported = load_file(tmp_path / "model.safetensors")
    assert exported.keys() == whole.keys() and all(torch.equal(exported[k], v) for k, v in whole.items())


@pytest.mark.slow
def test_one_process_continues_an_fsdp_run_directory_by_itself(fsdp_run, single_process_runs, compose_run, tmp_path,
                                                                 caplog):
    # the FSDP run's directory as a requeued job finds it (last.dcp and best.dcp, no last.pt), continued by another
    # strategy without trainer.resume: it finds last.dcp by itself, then writes its own strategy's last.pt
    _, fsdp_dir = fsdp_run
    run_dir = tmp_path / "run"
    for name in ("last.dcp", "best.dcp"):
        shutil.copytree(fsdp_dir / name, run_dir / name)
    # as a 12-step run stopped at step 9 leaves it: a run directory resumes only the run its config describes
    train_state = run_dir / "last.dcp" / TRAIN_STATE
    state = load_checkpoint(train_state)
    config = json.loads(state["config"])
    config["trainer"]["max_steps"] = 12
    save_checkpoint(train_state, {**state, "config": json.dumps(config)})
    with caplog.at_level(logging.INFO, logger="softmoe.harness.context"):
        train(compose_run(*RUN, "trainer.max_steps=12"), run_dir)
    assert f"resuming from {run_dir / 'last.dcp'} at step 9 of 12" in caplog.text
    assert_same_training(run_dir, single_process_runs[12], "one process after FSDP")
