"""What a user reads when a run stops, and whether it is true: every stop message prints a command that resumes the
run, from the default run directory too; a second Ctrl-C ends the process at once, even inside a long C++ op."""

import contextlib
import errno
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from data_fixtures import write_image_tree
from processes import ForkedCommand
from softmoe.harness import sharded_checkpoint
from softmoe.harness.checkpoint import load_checkpoint, save_checkpoint
from softmoe.harness.faults import Preempted
from softmoe.harness.resume_hint import resume_command
from test_nonfinite import NAN_EXAMPLE, SYNTHETIC, step_holding
from test_readme import README_COMMANDS, RUN_DIR
from test_reliability import RUN, read_events

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


def forked_trainer(cwd: Path, *overrides: str, stderr_apart: bool = False) -> ForkedCommand:
    """``python -m softmoe.train <overrides>`` started in ``cwd`` by fork (some 5 s of imports fewer than a fresh
    interpreter), read like the :class:`subprocess.Popen` it stands for. The commands a test pastes from its output
    run as a user's ``python -m`` (:func:`assert_it_resumes`); a crash, whose line an ``atexit`` hook prints, runs
    as one too."""
    return ForkedCommand("softmoe.train", overrides, cwd, Path(cwd).parent / f"{Path(cwd).name}.trainer.out",
                         stderr_apart)


def default_run_dir(cwd: Path, timeout: float = 120) -> Path:
    """The ``outputs/runs/<date>/<time>`` directory a command started in ``cwd`` without ``hydra.run.dir`` made."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted((cwd / "outputs" / "runs").glob("*/*"))
        if found:
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no run directory below {cwd}/outputs/runs after {timeout} s")


def wait_for_step(process: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(e["step"] >= step for e in read_events(run_dir) if "train/lr" in e):
            return
        assert process.poll() is None, f"the run ended before step {step}: {process.communicate()[0]}"
        time.sleep(0.01)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def printed_resume_command(output: str) -> list[str]:
    (line,) = [line for line in output.splitlines() if "resume with: " in line]
    command = shlex.split(line.split("resume with: ", 1)[1])
    assert command[:3] == ["python", "-m", "softmoe.train"], line
    return [sys.executable, *command[1:]]


def assert_it_resumes(command: list[str], cwd: Path, run_dir: Path) -> str:
    """Run the printed command as the user would paste it; it must continue from ``last.pt``, not start anew."""
    saved_step = load_checkpoint(run_dir / "last.pt")["step"]
    assert saved_step > 0
    result = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    output = result.stdout + result.stderr
    assert f"resuming from {run_dir.resolve() / 'last.pt'} at step {saved_step} " in output, output
    assert sorted((cwd / "outputs" / "runs").glob("*/*")) == [run_dir]  # no new directory at step 0
    return output


# SIGTERM and SIGUSR1 print their line with an explicit run directory in tests/test_reliability.py (which also
# resumes after each); here the default one, for Ctrl-C and for the signal that test leaves out
@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR2], ids=lambda s: s.name)
def test_a_signal_stop_prints_the_command_that_resumes_from_the_default_run_directory(tmp_path, signum):
    trainer = forked_trainer(tmp_path, *RUN)
    run_dir = default_run_dir(tmp_path)
    wait_for_step(trainer, run_dir, 3)
    trainer.send_signal(signum)
    output = trainer.communicate(timeout=300)[0]
    assert trainer.returncode == 128 + signum, output
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(f"{signum.name} received: saved last.pt at step "), output
    assert last_line.endswith(f"hydra.run.dir={run_dir.relative_to(tmp_path)}")  # relative to where it was run
    command = printed_resume_command(output)
    assert command == [sys.executable, "-m", "softmoe.train", *RUN, f"hydra.run.dir={run_dir.relative_to(tmp_path)}"]
    # Every signal prints that same command; running it is checked once, as a resume costs a fresh process
    # (tests/test_reliability.py resumes after each preemption signal, exactly)
    if signum == signal.SIGINT:
        output = assert_it_resumes(command, tmp_path, run_dir)
        assert "done: test accuracy" in output
        assert_summary_and_next_steps_are_the_readmes(output, tmp_path, run_dir)  # each block's entropy, next steps


def assert_summary_and_next_steps_are_the_readmes(output: str, cwd: Path, run_dir: Path) -> None:
    lines = output.splitlines()
    entropy = next(line for line in lines if line.startswith("final dispatch entropy (1 = uniform): "))
    assert [part.split()[:2] for part in entropy.split(": ", 1)[1].split(", ")] == [["block", "1"]]  # depth 2
    steps = lines[lines.index("next:") + 1:]
    # the notebook named where it is: this run's working directory is not the repository's root (was: a relative
    # notebooks/routing_analysis.ipynb, which cp did not find from here)
    notebook = str(ROOT / "notebooks" / "routing_analysis.ipynb")
    assert [step.split()[:3] for step in steps] == [
        ["python", "-m", "softmoe.evaluate"], ["cp", notebook, "/tmp/"], ["python", "-m", "softmoe.collect"],
    ]
    # The printed steps are the README's next steps for this run directory, which tests/test_readme.py runs on the
    # quick start's run (running them again here would cost half a minute and test nothing more).
    absolute, relative = str(run_dir.resolve()), str(run_dir.relative_to(cwd))
    readme = {" ".join(command.split()) for command in README_COMMANDS}
    for step in steps:
        step = step.split("  #")[0].replace(notebook, "notebooks/routing_analysis.ipynb")
        step = step.replace(absolute, f"$PWD/{RUN_DIR}").replace(relative, RUN_DIR)
        assert " ".join(step.split()) in readme, (step, sorted(readme))


@pytest.mark.slow
def test_a_nonfinite_stop_prints_the_command_that_resumes_from_its_last_checkpoint(tmp_path):
    overrides = [*SYNTHETIC, f"data.nan_examples=[{NAN_EXAMPLE}]", "trainer.nonfinite=stop"]
    trainer = forked_trainer(tmp_path, *overrides, stderr_apart=True)
    stdout, stderr = trainer.communicate(timeout=300)
    result = subprocess.CompletedProcess(trainer.pid, trainer.returncode, stdout, stderr)
    assert result.returncode == 3, result.stderr
    run_dir = default_run_dir(tmp_path)
    assert load_checkpoint(run_dir / "last.pt")["step"] == step_holding(NAN_EXAMPLE) - 1
    lines = result.stderr.strip().splitlines()
    assert lines[-2].startswith(f"error: step {step_holding(NAN_EXAMPLE)}: loss=nan")
    assert lines[-1].startswith("last.pt is kept; resume with: python -m softmoe.train ")
    # the same data meets the same NaN again, but only after continuing from the step that was saved
    assert_it_resumes(printed_resume_command(result.stderr), tmp_path, run_dir)


# Own images (the README's own-data command, CPU-sized): 24 training images in 3 steps per epoch, 10 epochs, last.pt
# after each epoch's validation.
OWN_IMAGES = [
    "data=imagefolder", "data.root=my_images", "data.img_size=8", "model.patch_size=4", "data.num_classes=2",
    "data.val_size=8", "model.depth=2", "trainer.batch_size=8", "trainer.max_steps=30", "trainer.log_every=1",
    "logger=none", "trainer.progress_bar=false",
]


def wait_for_checkpoint(process: subprocess.Popen, run_dir: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not (run_dir / "last.pt").is_file():
        assert process.poll() is None, f"the run ended before its first checkpoint: {process.communicate()[0]}"
        assert time.monotonic() < deadline, f"no last.pt in {run_dir} after {timeout} s"
        time.sleep(0.01)


@pytest.mark.slow
def test_an_image_that_breaks_mid_run_prints_the_command_that_resumes(tmp_path):
    """A training image becomes unreadable after a checkpoint (a disk going bad, a file rewritten in place): the run
    stops naming it, keeps last.pt, and the printed command continues from it once the file is good again."""
    write_image_tree(tmp_path / "my_images", train={"a": 16, "b": 16}, val={"a": 4, "b": 4}, size=8)
    images = {path: path.read_bytes() for path in (tmp_path / "my_images").rglob("*.png")}
    trainer = forked_trainer(tmp_path, *OWN_IMAGES)
    run_dir = default_run_dir(tmp_path)
    wait_for_checkpoint(trainer, run_dir)
    trainer.send_signal(signal.SIGSTOP)  # paused after its first checkpoint: it reads nothing until every image is bad
    for path in images:  # every image, so whatever the run reads next (a training batch, validation, test) is bad
        path.write_bytes(b"not a PNG any more")
    trainer.send_signal(signal.SIGCONT)
    output = trainer.communicate(timeout=300)[0]
    assert trainer.returncode == 2, output
    error, hint = output.strip().splitlines()[-2:]
    assert error.startswith("error: my_images/") and ".png: unreadable image" in error, output  # names the file
    assert hint.startswith("last.pt is kept; resume with: python -m softmoe.train data=imagefolder "), output
    for path, data in images.items():
        path.write_bytes(data)
    assert "done: test accuracy" in assert_it_resumes(printed_resume_command(output), tmp_path, run_dir)


def child_processes(pid: int) -> list[int]:
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


@pytest.mark.slow
def test_a_crash_after_a_checkpoint_prints_the_command_that_resumes(tmp_path):
    """An unexpected error (here a DataLoader worker killed, as the OOM killer does) ends the run with Hydra's
    traceback, and the command printed after it, the last line on screen, continues from the last checkpoint."""
    trainer = subprocess.Popen([sys.executable, "-m", "softmoe.train", *RUN, "trainer.num_workers=1"], cwd=tmp_path,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = default_run_dir(tmp_path)
    wait_for_checkpoint(trainer, run_dir)
    killed = set()
    while trainer.poll() is None:  # a worker ending between two loaders is no error: kill the next one then
        trainer.send_signal(signal.SIGSTOP)
        workers = set(child_processes(trainer.pid)) - killed  # a killed worker stays a child until it is reaped
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        killed |= workers
        trainer.send_signal(signal.SIGCONT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            trainer.wait(timeout=2)
    output = trainer.communicate()[0]
    assert trainer.returncode == 1, output
    # the loader reports the killed worker; one killed while it passed a batch's storage leaves a reset connection
    # instead (seen once in CI): an unexpected error either way, which is what this test needs
    assert ("RuntimeError: DataLoader worker (pid " in output and "is killed by signal: Killed" in output) or \
        "ConnectionResetError: [Errno 104] Connection reset by peer" in output, output
    last_line = output.rstrip().splitlines()[-1]  # after the traceback, not scrolled away above it
    assert last_line.startswith("last.pt is kept; resume with: python -m softmoe.train model.depth=2 "), output
    assert "done: test accuracy" in assert_it_resumes(printed_resume_command(output), tmp_path, run_dir)


def test_the_resume_command_keeps_the_overrides_and_names_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # set by some other launcher: without torchrun's run id, not torchrun
    # trainer.resume is dropped however it was given (+trainer.resume adds the key): the run continues its own last.pt
    overrides = ["model.depth=2", "hydra.run.dir=old", "trainer.resume=/x/last.pt", "logger.tags=[a b]",
                 "+trainer.resume=/y/last.pt", "++trainer.resume=/z/last.pt", "++hydra.run.dir=older"]
    command = resume_command(overrides, tmp_path / "outputs" / "runs" / "d" / "t")
    assert command == "python -m softmoe.train model.depth=2 'logger.tags=[a b]' hydra.run.dir=outputs/runs/d/t"
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resume_command([], "/elsewhere").startswith("torchrun --standalone --nproc_per_node=2 -m softmoe.train ")
    monkeypatch.setenv("WORLD_SIZE", "4")  # 2 nodes: their rendezvous is the user's to name
    assert resume_command([], "/elsewhere").startswith("torchrun --nnodes=2 --nproc_per_node=2 -m softmoe.train ")


@pytest.mark.slow
def test_a_run_that_changes_into_its_directory_prints_commands_for_where_it_was_started(tmp_path):
    """``hydra.job.chdir=true``: the printed paths were relative to the run directory (``hydra.run.dir=.``, which the
    pasted command refused) and the resume dropped the key (a Hydra override, not one of the task's)."""
    trainer = forked_trainer(tmp_path, *RUN, "hydra.run.dir=run", "hydra.job.chdir=true")
    wait_for_step(trainer, tmp_path / "run", 3)
    trainer.send_signal(signal.SIGTERM)
    output = trainer.communicate(timeout=300)[0]
    assert trainer.returncode == 143, output
    command = printed_resume_command(output)
    assert command[-2:] == ["hydra.job.chdir=true", "hydra.run.dir=run"], output
    saved_step = load_checkpoint(tmp_path / "run" / "last.pt")["step"]
    resumed = subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert f"resuming from {tmp_path.resolve() / 'run' / 'last.pt'} at step {saved_step} " in output, output
    assert "python -m softmoe.evaluate run_dir=run " in output and "python -m softmoe.collect run " in output


# A process that enters one long C++ op (a single matmul of about a minute on one thread) with the trainer's guard.
LONG_OP = textwrap.dedent("""
    import torch
    from softmoe.harness.faults import PreemptionGuard
    torch.set_num_threads(1)
    a = torch.randn(9000, 9000)
    with PreemptionGuard():
        print("ready", flush=True)
        torch.mm(a, a)
    print("the op ended", flush=True)
""")


@pytest.mark.slow
def test_inside_a_long_cpp_op_ctrl_c_is_answered_at_once_and_a_second_one_ends_the_process():
    process = subprocess.Popen([sys.executable, "-c", LONG_OP], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # inside torch.mm now
        process.send_signal(signal.SIGINT)
        # said while the op runs (not when it ends, after the minute a user would wait in silence)
        said = process.stdout.readline()
        assert said.startswith("SIGINT received: stopping after this step, saving last.pt; Ctrl-C again "), said
        time.sleep(0.5)  # had the op ended before the message, the script would have gone on to its last line by now
        process.send_signal(signal.SIGINT)
        process.wait(timeout=20)  # the op itself runs for about a minute
    finally:
        process.kill()
    output = process.stdout.read()
    assert process.returncode == -signal.SIGINT, output  # the shell reports 128 + 2 = 130
    assert "the op ended" not in output and "SIGINT received" not in output  # the op never ended; said once


def test_a_signal_is_said_once_and_one_sent_to_a_forked_worker_alone_not_at_all(caplog):
    """The guard's handler and its watcher thread both see a signal; one of them says so. A forked child (a DataLoader
    worker) inherits the wakeup fd the watcher reads, unless it lets it go: a SIGTERM to a worker alone would then be
    announced by the trainer, which goes on training."""
    from softmoe.harness.faults import PreemptionGuard

    guard = PreemptionGuard().install()
    try:
        worker = os.fork()
        if worker == 0:
            os.kill(os.getpid(), signal.SIGTERM)  # the guard's handler, inherited, leaves it to the trainer
            os._exit(0)
        os.waitpid(worker, 0)
        assert guard.received is None
        os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        guard.restore()  # waits for the watcher: it has read both signals' wakeups by then
    assert guard.received == signal.SIGUSR1
    said = [message for message in caplog.messages if " received: stopping after this step" in message]
    assert said == ["SIGUSR1 received: stopping after this step, saving last.pt"]


def test_ctrl_c_during_the_final_test_says_the_run_ends_after_it(compose_run, tmp_path, monkeypatch, caplog):
    """Was: "SIGINT received: stopping after this step, saving last.pt", then the test ran on and the run ended 0."""
    from softmoe.harness import loop

    real_test = loop.test_final_and_best

    def test_after_a_ctrl_c(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_test(*args, **kwargs)

    monkeypatch.setattr(loop, "test_final_and_best", test_after_a_ctrl_c)
    summary = loop.train(compose_run("trainer.max_steps=2", "model.depth=2", "logger=none",
                                     "trainer.progress_bar=false"), tmp_path)
    tested = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "test/acc" in line]
    assert summary.steps == 2 and [event["test/acc"] for event in tested] == [summary.test_acc]  # it ran, once
    said = [message for message in caplog.messages if " received" in message]
    assert said == ["SIGINT received after the last step, whose last.pt is saved: the run ends once its test is done; "
                    "Ctrl-C again ends the process at once (a rerun then tests it)"]


def test_ctrl_c_while_wandb_finishes_leaves_the_finished_run_as_finished(compose_run, tmp_path, monkeypatch, caplog):
    """W&B's finish (seconds where it uploads) ran after the stop guard was gone: the Ctrl-C raised KeyboardInterrupt
    there, and the train command said "interrupted before training started" for a run that had trained and tested."""
    from softmoe.harness.loop import train
    from softmoe.harness.telemetry import Telemetry

    real_finish, calls = Telemetry.finish, []

    def finish_after_a_ctrl_c(self):
        if not calls:  # one Ctrl-C, at the first call: the run's cleanup calls it again, as a no-op
            os.kill(os.getpid(), signal.SIGINT)
        calls.append(self)
        return real_finish(self)

    monkeypatch.setattr(Telemetry, "finish", finish_after_a_ctrl_c)
    try:
        summary = train(compose_run("trainer.max_steps=2", "model.depth=2", "logger=none",
                                    "trainer.progress_bar=false"), tmp_path)
    except KeyboardInterrupt:  # not let through to pytest, which would end the whole session
        pytest.fail("the Ctrl-C during W&B's finish reached the caller as KeyboardInterrupt")
    assert summary.steps == 2 and summary.test_acc is not None
    said = [message for message in caplog.messages if " received" in message]
    assert said == ["SIGINT received after the last step, whose last.pt is saved: the run ends once its test is done; "
                    "Ctrl-C again ends the process at once (a rerun then tests it)"]


def test_ctrl_c_at_an_epochs_last_step_still_prints_that_epochs_line(compose_run, tmp_path, monkeypatch, caplog):
    from softmoe.harness import loop
    from softmoe.harness.faults import Preempted

    real_close_epoch = loop.close_epoch

    def close_epoch_after_a_signal(*args, **kwargs):  # SIGTERM lands on the epoch's last step, before its validation
        os.kill(os.getpid(), signal.SIGTERM)
        return real_close_epoch(*args, **kwargs)

    monkeypatch.setattr(loop, "close_epoch", close_epoch_after_a_signal)
    cfg = compose_run(*SYNTHETIC, "trainer.max_steps=16")  # 8 steps per epoch
    with caplog.at_level(logging.INFO, logger="softmoe.harness.loop"), pytest.raises(Preempted):
        loop.train(cfg, tmp_path / "run")
    assert any(message.startswith("epoch 1/2  step 8  train loss") for message in caplog.messages), caplog.messages


def test_the_resume_line_finds_fsdps_sharded_last_and_a_stop_names_the_file_it_saved(compose_run, tmp_path):
    from hydra.core.hydra_config import HydraConfig

    from softmoe import train as command

    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    HydraConfig.instance().set_config(compose_run("model.depth=2", f"hydra.run.dir={tmp_path}", hydra_node=True))
    try:
        assert sharded_checkpoint.latest_last(tmp_path) is None and command.resume_message("", tmp_path) is None
        # a stop saved its checkpoint, even where this rank cannot see it yet (DDP: rank 0 writes it): was "nothing
        # to resume" from a rank that looked before rank 0's last.pt was there
        stopped = command.preempted_line(Preempted(signal.SIGTERM, 3), HydraConfig.get(), tmp_path)
        assert stopped == (f"SIGTERM received: saved last.pt at step 3 (exit status 143); resume with: python -m "
                           f"softmoe.train model.depth=2 hydra.run.dir={tmp_path}")
        sharded_checkpoint.save(tmp_path, "last.pt", model, optimizer, None, {"step": 3}, keep_previous=True)
        assert sharded_checkpoint.latest_last(tmp_path) == tmp_path / "last.dcp"  # an FSDP run's: resumable too
        assert command.resume_message("", tmp_path).startswith("last.dcp is kept; resume with: python -m ")
    finally:
        HydraConfig.instance().cfg = None
    save_checkpoint(tmp_path / "last.pt", {"step": 5})  # resumed under one process: the newer file is the one
    assert sharded_checkpoint.latest_last(tmp_path) == tmp_path / "last.pt"
    assert str(Preempted(signal.SIGTERM, 3, checkpoint="last.dcp")).startswith("SIGTERM received: saved last.dcp at")


def test_a_crash_leaves_its_resume_line_for_the_exit_and_a_sweep_job_says_it_at_once(compose_run, tmp_path, capsys):
    """The two ways a crash's resume line is delivered (``softmoe.train``): after Hydra's traceback, by the atexit
    hook, for a single run; at once for a sweep's job, whose joblib worker process outlives it."""
    from hydra.core.hydra_config import HydraConfig

    from softmoe import train as command

    HydraConfig.instance().set_config(compose_run("model.depth=2", f"hydra.run.dir={tmp_path}", hydra_node=True))
    command.say_how_to_resume_after_a_crash("", tmp_path, after_the_traceback=True)
    command._say_the_resume_line_at_exit()
    assert capsys.readouterr().err == ""  # no last.pt: nothing to say, now or at exit
    save_checkpoint(tmp_path / "last.pt", {"step": 5})
    try:
        command.say_how_to_resume_after_a_crash("", tmp_path, after_the_traceback=True)
        assert capsys.readouterr().err == ""  # not yet: the traceback comes first
        command._say_the_resume_line_at_exit()
        line = capsys.readouterr().err
        assert line.startswith("last.pt is kept; resume with: python -m softmoe.train model.depth=2 "), line
        command.say_how_to_resume_after_a_crash("[job 3] ", tmp_path, after_the_traceback=False)
        assert capsys.readouterr().err.startswith("[job 3] last.pt is kept; resume with: ")
    finally:
        command._resume_line_at_exit.clear()  # this test process exits with nothing to say
        HydraConfig.instance().cfg = None


SWEEP_JOB = ["model.depth=2", "trainer.log_every=1", "trainer.eval_batches=1", "logger=none",
             "trainer.progress_bar=false"]
SWEEP_RERUN = "sweep stopped by SIGINT{}; rerun it to resume its unfinished jobs: "


def trained_steps(run_dir: Path) -> list[int]:
    return [event["step"] for event in read_events(run_dir) if "train/lr" in event]


@pytest.mark.slow
def test_ctrl_c_between_two_jobs_of_a_basic_sweep_prints_the_rerun_that_resumes_it(tmp_path):
    """Hydra's code between two jobs runs under no job's stop guard: the Ctrl-C ended in "interrupted" alone."""
    sweep = tmp_path / "sweep"
    overrides = ["-m", "trainer.max_steps=2,3", *SWEEP_JOB, f"hydra.sweep.dir={sweep}",
                 "+hydra.callbacks.ctrl_c._target_=hydra_signals.SignalAtJob", "+hydra.callbacks.ctrl_c.job=0",
                 f"+hydra.callbacks.ctrl_c.once={tmp_path / 'sent'}"]  # Ctrl-C as job 0 has returned
    trainer = forked_trainer(tmp_path, *overrides)
    output = trainer.communicate(timeout=300)[0]
    assert trainer.returncode == 130, output
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(SWEEP_RERUN.format(" while no job ran")), output
    assert trained_steps(sweep / "0") == [1, 2] and not (sweep / "1").exists()
    command = shlex.split(last_line.split(": ", 1)[1])
    assert command[:4] == ["python", "-m", "softmoe.train", "-m"] and command[-1] == "hydra.sweep.dir=sweep"
    env = {**ENV, "PYTHONPATH": os.pathsep.join([str(ROOT), str(Path(__file__).parent)])}  # the callback's module
    rerun = subprocess.run([sys.executable, *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert trained_steps(sweep / "0") == [1, 2] and trained_steps(sweep / "1") == [1, 2, 3]  # job 0 not trained again


def release_readers(fifos: list[Path], keep_open: bool) -> list[int]:
    """Open for writing each fifo a reader waits on; the write ends (``keep_open``: their reads then wait for data),
    or none (closed at once: their reads end)."""
    writers = []
    for fifo in fifos:
        try:
            writers.append(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError as error:  # ENXIO: nobody reads it (yet)
            assert error.errno == errno.ENXIO, error
    if keep_open:
        return writers
    for writer in writers:
        os.close(writer)
    return []


def stalled_images(tmp_path: Path) -> tuple[Path, list[Path]]:
    """An image folder with files whose reads wait until the test lets them go (fifos), as on a stalled disk: more
    than ``data.verify``'s thread pool has threads. (root, the fifos)."""
    root = write_image_tree(tmp_path / "images", train={"cat": 4, "dog": 4}, val={"cat": 2, "dog": 2}, size=8)
    stalled = [root / "train" / "dog" / f"stalled{index}.png" for index in range(48)]
    for fifo in stalled:
        os.mkfifo(fifo)
    return root, stalled


def stop_while_checking_images(trainer: ForkedCommand, stalled: list[Path], signum: int, said: str) -> str:
    """Send ``signum`` once the image check waits on a stalled file; the trainer must say ``said`` before any read
    is let go (it waited for every check), then end once the reads under way end. Its output."""
    writers, deadline = [], time.monotonic() + 120
    try:
        while not writers:  # the check has begun: a thread of its pool waits on a stalled file
            assert trainer.poll() is None and time.monotonic() < deadline, trainer.output_so_far()
            writers = release_readers(stalled, keep_open=True)
            time.sleep(0.01)
        trainer.send_signal(signum)
        while said not in trainer.output_so_far():
            assert trainer.poll() is None, f"ended without saying it: {trainer.output_so_far()}"
            assert time.monotonic() < deadline, f"still checking the images: {trainer.output_so_far()}"
            time.sleep(0.05)
        for writer in writers:
            os.close(writer)
        while trainer.poll() is None:  # the checks under way end as their reads do; no further one starts
            assert time.monotonic() < deadline, trainer.output_so_far()
            release_readers(stalled, keep_open=False)
            time.sleep(0.05)
    finally:
        if trainer.poll() is None:
            trainer.send_signal(signal.SIGKILL)
    return trainer.communicate(timeout=60)[0]


IMAGES = ["data=imagefolder", "data.img_size=8", "data.num_classes=2", *SWEEP_JOB]


@pytest.mark.slow
def test_ctrl_c_while_a_sweeps_job_checks_its_images_stops_it_at_once_and_prints_the_sweeps_rerun(tmp_path):
    """``data.verify`` reads every image's header in a thread pool before training: a Ctrl-C there waited for the
    whole check (minutes over ImageNet on a network disk), and under the basic launcher no line said how to resume
    the sweep."""
    root, stalled = stalled_images(tmp_path)
    sweep = tmp_path / "sweep"
    trainer = forked_trainer(tmp_path, "-m", "seed=0,1", f"data.root={root}", *IMAGES, f"hydra.sweep.dir={sweep}")
    output = stop_while_checking_images(trainer, stalled, signal.SIGINT, "interrupted before training started")
    assert trainer.returncode == 130, output
    assert "[job 0] error: interrupted before training started" in output
    assert output.strip().splitlines()[-1].startswith(SWEEP_RERUN.format("")), output
    assert "[job 1]" not in output and not (sweep / "0").exists()  # the sweep ended; job 0 left no folder


@pytest.mark.slow
def test_sigterm_before_training_started_is_one_line_and_leaves_no_run_directory(tmp_path):
    """Was: the process ended silently (SIGTERM's default action) and left its run directory (``.hydra``, ``train.log``,
    the lock file), where a Ctrl-C there removed it."""
    root, stalled = stalled_images(tmp_path)
    trainer = forked_trainer(tmp_path, f"data.root={root}", *IMAGES, "hydra.run.dir=run")
    output = stop_while_checking_images(trainer, stalled, signal.SIGTERM, "interrupted by SIGTERM before training")
    assert trainer.returncode == 143, output
    assert output.strip().splitlines()[-1] == "error: interrupted by SIGTERM before training started", output
    assert not (tmp_path / "run").exists()
