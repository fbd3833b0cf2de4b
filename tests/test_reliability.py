"""Reliability: runs survive kills, preemption, damaged checkpoints, NaNs, bad configs, bad data and W&B failures.

Every promise of docs/reliability.md (moved from the README in issue 22) is a test here that fails if the promise
breaks. A run that must die for real is a forked process running ``python -m softmoe.train``'s own
``main`` (the test process has already imported torch, so a fork starts in milliseconds where a fresh interpreter
takes seconds). The child runs the ``softmoe.train`` module as ``__main__``, exactly as ``python -m`` does.
"""

import contextlib
import errno
import hashlib
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CONF_DIR
from data_fixtures import write_image_tree, write_png
from processes import fork_command, wait
from softmoe.harness import checkpoint as checkpoint_module
from softmoe.harness import runs
from softmoe.harness.checkpoint import PREVIOUS, CheckpointError, CheckpointWriteError, load_checkpoint
from softmoe.harness.config import ConfigError
from softmoe.harness.faults import NONFINITE_EXIT_CODE, PreemptionGuard, preempted_exit_code
from softmoe.harness.loop import train
from test_nonfinite import NAN_EXAMPLE, SYNTHETIC, step_holding

pytestmark = pytest.mark.slow  # forked trainers and end-to-end runs
ROOT = Path(CONF_DIR).parent
# 24 steps of batch 32 inside digits' first epoch (44 steps), `last` every 4 steps, an event every step.
RUN = [
    "model.depth=2", "trainer.batch_size=32", "trainer.max_steps=24", "trainer.checkpoint_every=4",
    "trainer.log_every=1", "trainer.eval_batches=1", "logger=none", "trainer.progress_bar=false",
]
CHECKPOINT_EVERY, TOTAL_STEPS = 4, 24


# ----------------------------------------------------------------------------- helpers


def read_events(run_dir):
    """The complete lines of ``metrics.jsonl`` (a line torn by a kill is left out); none before it exists."""
    return runs.read_events(run_dir) if (Path(run_dir) / "metrics.jsonl").is_file() else []


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
    output = run_dir.parent / f"{run_dir.name}.out"
    return fork_command("softmoe.train", [*overrides, f"hydra.run.dir={run_dir}"], output)


def run_cli(run_dir, *overrides):
    return wait(start_cli(run_dir, *overrides))


def signal_at_step(pid, run_dir, step, signum, timeout=300, send=os.kill):
    """Send ``signum`` to ``pid`` once ``metrics.jsonl`` shows training step ``step`` (``send=os.killpg``: to the
    process group ``pid`` leads, as a terminal's Ctrl-C does)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        logged = [e["step"] for e in read_events(run_dir) if "train/lr" in e]
        if logged and logged[-1] >= step:
            send(pid, signum)
            return
        done, status = os.waitpid(pid, os.WNOHANG)
        assert not done, f"the run ended (status {status}) before step {step}; see {run_dir}.out"
        time.sleep(0.002)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def output_of(run_dir):
    return Path(f"{run_dir}.out").read_text()


def fingerprint(run_dir):
    """{file: sha256} of everything in a run directory but its log, ``.hydra/`` configs included."""
    run_dir = Path(run_dir)
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.relative_to(run_dir).parts[0] != "train.log"
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


@pytest.fixture(params=["own", "shared"], ids=["own W&B service", "a detached W&B service both attempts share"])
def wandb_service(request, monkeypatch):
    """The W&B service the training processes log through. "own": each starts its own, and the killed one's goes
    with it. "shared": ``wandb beta core start``'s detached service, named by ``WANDB_SERVICE`` (as a process that
    used W&B passes its own service to the processes it starts); it keeps the killed attempt's stream open."""
    monkeypatch.delenv("WANDB_SERVICE", raising=False)  # a W&B test earlier in this worker exported its own
    if request.param == "own":
        yield
        return
    wandb_cli = [sys.executable, "-c", "from wandb.cli.cli import cli; cli()", "beta", "core"]
    token = subprocess.run([*wandb_cli, "start"], capture_output=True, text=True, timeout=120, check=True).stdout
    monkeypatch.setenv("WANDB_SERVICE", token.strip())
    yield
    subprocess.run([*wandb_cli, "stop"], capture_output=True, timeout=120)


def test_sigkill_at_a_random_step_then_the_same_command_resumes_exactly(uninterrupted, wandb_service, tmp_path):
    run_dir = tmp_path / "run"
    kill_step = random.randrange(CHECKPOINT_EVERY + 2, TOTAL_STEPS - 6)  # 7 steps left for the kill to land in
    with_wandb = [*RUN, "logger=wandb", "logger.mode=offline", "logger.log_images=false"]  # logging draws no randomness
    pid = start_cli(run_dir, *with_wandb)
    signal_at_step(pid, run_dir, kill_step, signal.SIGKILL)
    assert wait(pid) == -signal.SIGKILL, f"kill at step {kill_step}"
    died_at = [e["step"] for e in read_events(run_dir) if "train/lr" in e][-1]
    saved = load_checkpoint(run_dir / "last.pt")["step"]
    assert saved % CHECKPOINT_EVERY == 0 and 0 < saved <= died_at, (kill_step, died_at, saved)

    assert run_cli(run_dir, *with_wandb) == 0, output_of(run_dir)  # the same command, the same run directory
    output = output_of(run_dir)
    assert f"resuming from {run_dir / 'last.pt'} at step {saved}" in output
    assert "W&B could not start" not in output, output
    assert_matches_uninterrupted(run_dir, uninterrupted)

    # W&B: the killed run sent only steps its checkpoint covers, the resumed run the rest, every step once (W&B's
    # writer puts a file on disk in 32 KiB blocks: steps the killed run had sent but not written, the resumed run
    # sends again; was: lost, and the killed attempt's file could hold no step at all)
    from softmoe.harness.wandb_files import history_steps

    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    sent = [history_steps(path) for path in files]
    listing = sorted(str(path.relative_to(run_dir)) for path in run_dir.glob("wandb/**/*"))
    assert len(sent) == 2 and all(step <= saved for step in sent[0]), (saved, sent, listing, output)
    assert [path.parent for path in files] == sorted(run_dir.glob("wandb/offline-run-*")), listing  # no strays
    assert sent[0] + sent[1] == sorted({event["step"] for event in read_events(run_dir)}), (sent, output)


def test_a_line_torn_by_a_kill_is_dropped_on_resume(compose_run, uninterrupted, tmp_path, resumed_from):
    run_dir = tmp_path / "run"
    shutil.copytree(uninterrupted["dir"], run_dir)
    shutil.copy(run_dir / PREVIOUS, run_dir / "last.pt")  # killed after step 20's checkpoint ...
    with open(run_dir / "metrics.jsonl", "a") as file:
        file.write('{"step": 25, "epoch": 1, "train/lo')  # ... while writing a line
    train(compose_run(*RUN), run_dir)
    assert resumed_from() == [(run_dir / "last.pt", TOTAL_STEPS - CHECKPOINT_EVERY)]
    assert_matches_uninterrupted(run_dir, uninterrupted)


# ----------------------------------------------------------------------------- 2. preemption


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP],
    ids=["SIGTERM", "SIGUSR1", "SIGINT (Ctrl-C)", "SIGHUP (terminal closed)"]
)
def test_a_preemption_signal_saves_last_and_exits_with_its_code_then_the_rerun_resumes_exactly(
    uninterrupted, tmp_path, signum
):
    run_dir = tmp_path / "run"
    pid = start_cli(run_dir, *RUN)  # forked with SIGHUP's default action, even from a pytest under nohup
    # by step 11 of 24: 12 steps and the test split are left for the signal to land in, on a loaded machine too
    signal_at_step(pid, run_dir, random.randrange(2, TOTAL_STEPS // 2), signum)
    assert wait(pid) == preempted_exit_code(signum) == 128 + signum, output_of(run_dir)  # 130 for Ctrl-C
    logged = [e["step"] for e in read_events(run_dir) if "train/lr" in e]
    assert load_checkpoint(run_dir / "last.pt")["step"] == logged[-1]  # the step it was in, finished and saved
    output = output_of(run_dir)
    assert output.strip().splitlines()[-1] == (  # one line naming the command that resumes, no traceback
        f"{signal.Signals(signum).name} received: saved last.pt at step {logged[-1]} (exit status {128 + signum}); "
        f"resume with: python -m softmoe.train {' '.join(RUN)} hydra.run.dir={run_dir}"
    )
    assert "Traceback" not in output

    assert run_cli(run_dir, *RUN) == 0, output_of(run_dir)
    assert_matches_uninterrupted(run_dir, uninterrupted)


@pytest.mark.slow
def test_ctrl_c_while_a_command_imports_torch_is_one_line_and_nothing_is_written(tmp_path):
    """The first ~4 s of `python -m softmoe.<command>` import torch and timm; a Ctrl-C there printed Python's
    25-line traceback from inside torch's imports. A library user's `import softmoe` keeps its handler."""
    from softmoe import _startup

    assert _startup._replaced is None and signal.getsignal(signal.SIGINT) is not _startup._interrupted
    command = start_interrupted_while_importing(["softmoe.train", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path,
                                                ignoring_ctrl_c=False)
    stdout, stderr = command.communicate(timeout=120)
    assert (command.returncode, stdout, stderr) == (
        130, "", "interrupted while starting (importing its modules): nothing was run or written\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_command_started_with_ctrl_c_ignored_keeps_ignoring_it_while_it_imports(tmp_path):
    """A script's background job inherits Ctrl-C ignored (so the terminal's Ctrl-C is not its to answer); Python
    keeps it so, and so do the command's imports: no one-line exit, the command goes on."""
    command = start_interrupted_while_importing(["softmoe.train", "--help"], tmp_path, ignoring_ctrl_c=True)
    stdout, stderr = command.communicate(timeout=120)
    assert command.returncode == 0 and "interrupted" not in stderr, stderr
    assert "Powered by Hydra" in stdout, stdout[-2000:]


def start_interrupted_while_importing(argv: list, cwd: Path, ignoring_ctrl_c: bool) -> subprocess.Popen:
    """``python -m <argv>`` sent a Ctrl-C while it imports torch, started with SIGINT ignored or at its default
    (whatever this test process inherited: a suite started in the background ignores it)."""
    # a child inherits SIG_IGN through exec; any Python handler here becomes SIG_DFL there
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN if ignoring_ctrl_c else signal.default_int_handler)
    try:
        command = subprocess.Popen([sys.executable, "-m", *argv], cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    time.sleep(0.5)  # past the interpreter's own start (milliseconds), well inside the imports (seconds)
    command.send_signal(signal.SIGINT)
    return command


def test_a_command_collects_no_garbage_while_it_imports_then_freezes_what_the_imports_made(monkeypatch):
    """``python -m softmoe.<command>``: the collector's passes over torch's and timm's objects cost a second of the
    start and another at the exit; after the imports it runs again, on what the command itself makes."""
    import gc

    from softmoe import _startup

    assert not _startup._collection_paused and gc.isenabled()  # this process imported softmoe as a library
    monkeypatch.setattr(sys, "argv", ["-m"])  # as while Python locates a -m command's module
    monkeypatch.setattr(_startup, "_collection_paused", _startup.collect_after_importing())
    try:
        assert _startup._collection_paused and not gc.isenabled()
        _startup.restore()
        assert gc.isenabled() and gc.get_freeze_count() > 0
    finally:
        gc.enable()
        gc.unfreeze()  # this test's process collects as before


@pytest.fixture
def one_line_handler_installed(monkeypatch):
    """SIGINT as a -m command's start finds it: the package's one-line handler installed over Python's own."""
    from softmoe import _startup

    monkeypatch.setattr(_startup, "_replaced", signal.default_int_handler)
    previous = signal.signal(signal.SIGINT, _startup._interrupted)
    yield _startup
    signal.signal(signal.SIGINT, previous)


def test_a_commands_own_imports_and_its_collection_keep_the_one_line_handler(monkeypatch, one_line_handler_installed):
    """A Ctrl-C in the second after the package's imports (its garbage collection, the command module's own imports:
    Hydra, the harness) printed a traceback: the handler was put back at the package's end. A command's is put
    back when its run_command starts; any other -m module's at the package's end, as before."""
    _startup = one_line_handler_installed
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-X", "dev", "-m", "softmoe.train", "seed=1"])
    _startup.restore()
    assert signal.getsignal(signal.SIGINT) is _startup._interrupted  # softmoe/train.py's imports still to come
    with pytest.raises(SystemExit) as exited:  # the command's first act
        runs_command(lambda: 0 if signal.getsignal(signal.SIGINT) is signal.default_int_handler else 1)
    assert exited.value.code == 0
    signal.signal(signal.SIGINT, _startup._interrupted)
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "softmoe.layer"])  # no command of the package's
    _startup.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_every_command_module_runs_through_run_command_and_is_listed():
    from softmoe import _startup

    package = Path(_startup.__file__).parent
    calling = {f"softmoe.{path.stem}" for path in package.glob("*.py")
               if re.search(r"^\s+run_command\(", path.read_text(), re.MULTILINE)}
    assert calling == set(_startup.COMMANDS)


def runs_command(command):
    from softmoe.harness.errors import run_command

    run_command(command)


def test_a_ctrl_c_no_part_of_a_command_answers_is_one_line(capsys):
    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as exited:
        runs_command(interrupted)
    assert (exited.value.code, capsys.readouterr().err) == (130, "interrupted\n")


def test_ctrl_c_while_train_checks_its_command_line_is_one_line(monkeypatch, capsys):
    """The checks before Hydra (composing every job of a sweep) take a second or more, and write nothing."""
    from softmoe import train as train_command

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "check_before_hydra", interrupted)
    monkeypatch.setattr(sys, "argv", ["softmoe.train"])
    with pytest.raises(SystemExit) as exited:
        train_command.command_line()
    assert (exited.value.code, capsys.readouterr().err) == (
        130, "interrupted while starting (checking the config): nothing was run or written\n")


def test_ctrl_c_at_the_terminal_reaches_the_dataloader_workers_too_and_still_says_one_thing_once(tmp_path):
    """A terminal sends Ctrl-C to the whole foreground process group: the trainer and its DataLoader workers, which
    were forked with the trainer's handler. Only the trainer acts on it."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "softmoe.train", *RUN, "trainer.num_workers=2", f"hydra.run.dir={run_dir}"]
    trainer = subprocess.Popen(command, cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    signal_at_step(trainer.pid, run_dir, 3, signal.SIGINT, send=os.killpg)  # as a terminal does: the process group
    output = trainer.communicate(timeout=300)[0]
    assert trainer.returncode == 130, output
    step = load_checkpoint(run_dir / "last.pt")["step"]
    assert output.count("SIGINT received: stopping after this step") == 1, output  # not once per worker
    last_line = output.strip().splitlines()[-1]
    assert last_line.startswith(f"SIGINT received: saved last.pt at step {step} (exit status 130); resume with")
    assert "Traceback" not in output


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


def test_a_run_started_under_nohup_keeps_ignoring_sighup_and_otherwise_stops_on_it():
    """``nohup`` ignores SIGHUP so that a run outlives its terminal: the guard leaves it so. Otherwise the terminal's
    SIGHUP stops the run after its step, saved, as SIGTERM does (it killed the run, losing the steps since its last
    checkpoint: a whole epoch's by default)."""
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        guard = PreemptionGuard().install()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGHUP)
        assert guard.received is None
        guard.restore()
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        guard = PreemptionGuard().install()
        assert signal.getsignal(signal.SIGHUP) == guard._handle  # checked first: SIGHUP's default ends pytest
        os.kill(os.getpid(), signal.SIGHUP)
        assert guard.requested == signal.SIGHUP and preempted_exit_code(signal.SIGHUP) == 129
        guard.restore()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, before)


# ----------------------------------------------------------------------------- 3. checkpoint integrity


def truncate_file(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes_inside(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])  # inside the tensor data
    path.write_bytes(bytes(data))


def garbage(path):
    # the same bytes every run: urandom's began with pickle's protocol opcode once in 256 runs, and torch warned
    path.write_bytes(random.Random(0).randbytes(4096))


def delete(path):  # was: "holds no last.pt: its earlier attempt stopped before its first checkpoint", from step 0
    path.unlink()


def dangle(path):
    path.unlink()
    path.symlink_to(path.with_name("moved.pt"))


@pytest.mark.parametrize("damage", [truncate_file, flip_bytes_inside, garbage, delete, dangle],
                         ids=["truncated", "flipped", "garbage", "deleted", "a dangling link"])
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


def test_a_full_disk_as_torch_save_reports_it_is_one_line_too(compose_run, tmp_path, monkeypatch):
    """torch.save turns the failed write into a RuntimeError ("unexpected pos 704 vs 598") with the OSError as its
    context: that ended the run in a 30-line traceback. Here the file's writes fail as a full disk's do, inside the
    real torch.save."""
    run_dir, real_save = tmp_path / "run", torch.save

    class FullDisk:
        def __init__(self, file):
            self.file, self.written = file, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 100_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.file.write(data)

        def flush(self):
            self.file.flush()

    def save_to_a_full_disk(state, file):
        return real_save(state, FullDisk(file) if state["step"] == 8 else file)

    monkeypatch.setattr(checkpoint_module.torch, "save", save_to_a_full_disk)
    with pytest.raises(CheckpointWriteError) as raised:
        train(compose_run(*RUN), run_dir)
    assert isinstance(raised.value.__context__ or raised.value.__cause__, RuntimeError)  # torch's own report
    assert str(raised.value) == (f"{run_dir / 'last.pt'}: could not be written (the disk is full): "
                                 f"{os.strerror(errno.ENOSPC)}; last.pt still holds the previous checkpoint")
    assert load_checkpoint(run_dir / "last.pt")["step"] == 4


FILL_METRICS = """
import errno, os, runpy, sys
from softmoe.harness import telemetry

real_log = telemetry.Telemetry.log


class FullDisk:  # the disk fills up under metrics.jsonl at step 10
    def write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = close = lambda self: None


def log(self, step, *args, **kwargs):
    if step == 10:
        self._metrics = FullDisk()
    return real_log(self, step, *args, **kwargs)


telemetry.Telemetry.log = log
sys.argv = ["softmoe.train", *sys.argv[1:]]
runpy.run_module("softmoe.train", run_name="__main__")
"""


def test_a_full_disk_under_metrics_jsonl_is_one_line_and_the_resume(tmp_path):
    """Was: three chained OSError tracebacks (46 lines), exit status 1."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", FILL_METRICS, *RUN, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    error, resume = result.stderr.splitlines()[-2:]
    assert error == (f"error: {run_dir / 'metrics.jsonl'}: could not be written (the disk is full: "
                     f"{os.strerror(errno.ENOSPC)}); free some space, then rerun")
    assert resume.startswith("last.pt is kept; resume with: ") and load_checkpoint(run_dir / "last.pt")["step"] == 8


def test_a_real_full_disk_is_one_line(tmp_path):
    """The real thing, where this process may mount a small tmpfs (root): the first checkpoint does not fit."""
    disk = tmp_path / "small"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    try:
        result = subprocess.run([sys.executable, "-m", "softmoe.train", *RUN, f"hydra.run.dir={disk / 'run'}"],
                                cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (f"error: {disk / 'run' / 'last.pt'}: could not be written (the disk "
                                              f"is full): {os.strerror(errno.ENOSPC)}")


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

# The in-process NaN/inf tests are in test_nonfinite.py; here, the exit status of the real command.


def test_the_cli_exits_3_on_a_nonfinite_stop(tmp_path):
    run_dir = tmp_path / "run"
    code = run_cli(run_dir, *SYNTHETIC, f"data.nan_examples=[{NAN_EXAMPLE}]", "trainer.nonfinite=stop")
    assert code == NONFINITE_EXIT_CODE == 3
    assert f"error: step {step_holding(NAN_EXAMPLE)}: loss=nan" in output_of(run_dir)


# ----------------------------------------------------------------------------- 5. bad configuration

# Each bad override (beyond those of test_configs.py) and the whole one-line message it must give.
BAD_OVERRIDES = [
    (["trainer.nonfinite=ignore"], "trainer.nonfinite=ignore: must be one of skip, stop"),
    (["trainer.max_nonfinite_skips=0"], "trainer.max_nonfinite_skips=0: must be a positive integer"),
    (["trainer.checkpoint_every=0"], "trainer.checkpoint_every=0: must be a positive integer, or null"),
    (["trainer.eval_batch_size=0"], "trainer.eval_batch_size=0: must be a positive integer"),
    (["trainer.grad_clip_norm=-1"], "trainer.grad_clip_norm=-1: must be a number > 0, or null"),
    (["trainer.num_workers=-1"], "trainer.num_workers=-1: must be an integer >= 0"),
    (["trainer.compile=yes"], "trainer.compile=yes: must be true or false"),
    (
        ["trainer.precision=fp16", "trainer.device=cpu"],
        "trainer.precision=fp16: needs a CUDA device (trainer.device=cpu); use bf16",
    ),
    (["trainer.eval_batches=0"], "trainer.eval_batches=0: must be a positive integer, or null"),
    (["trainer.num_threads=0"], "trainer.num_threads=0: must be a positive integer, or null"),
    (["model.mlp_ratio=0"], "model.mlp_ratio=0: must be a number > 0"),
    (["model.drop_path_rate=1.0"], "model.drop_path_rate=1.0: must be a number in [0, 1)"),
    (["model.global_pool=mean"], "model.global_pool=mean: must be one of avg, token, max, avgmax, map"),
    (["model.embed_dim=2.5"], "model.embed_dim=2.5: must be a positive integer"),
    (["model.patch_size=0"], "model.patch_size=0: must be a positive integer"),
    # timm's own arguments added to the model, checked by their signature (softmoe/harness/vit_arguments.py)
    (["+model.reg_tokens=abc"], "model.reg_tokens=abc: must be an integer >= 0"),  # crashed inside the check
    (["+model.reg_tokens=-1"], "model.reg_tokens=-1: must be an integer >= 0"),
    (["+model.weight_init=bogus"], "model.weight_init=bogus: must be one of skip, reset, jax, jax_nlhb, moco, ''"),
    (["+model.pos_embed=bogus"], "model.pos_embed=bogus: must be one of learn, none, ''"),
    (["+model.drop_rate=2"], "model.drop_rate=2: must be a number in [0, 1)"),
    (["+model.qkv_bias=maybe"], "model.qkv_bias=maybe: must be true or false"),
    (["+model.fc_norm=maybe"], "model.fc_norm=maybe: must be true or false, or null"),
    (["moe.layers=[4]"], "moe.layers=[4]: 4 is not a block of this model (model.depth=4): blocks are 0..3"),
    (["moe.layers=[-1]"], "moe.layers=[-1]: -1 is not a block of this model (model.depth=4): blocks are 0..3"),
    (
        ["model.depth=1", "moe=every_other"],  # was built as a dense ViT
        "moe.placement=every_other: puts no MoE block in a model of model.depth=1; name the blocks with moe.layers "
        "(e.g. moe.layers=[0]), or use moe=dense for a dense ViT",
    ),
    (
        ["moe.dispatch=identity", "moe.slots_per_expert=2"],
        "moe.num_experts=16: identity routing needs num_experts * slots_per_expert = the 16 tokens of each image, "
        "got 16 * 2 = 32",
    ),
    (
        ["moe.combine=identity", "moe.num_experts=4"],
        "moe.num_experts=4: identity routing needs num_experts * slots_per_expert = the 16 tokens of each image, "
        "got 4 * 1 = 4",
    ),
    (
        ["data=synthetic", "data.train_size=16", "trainer.batch_size=32"],
        "trainer.batch_size=32: larger than the 16 training examples of data=synthetic; must be at most 16",
    ),
    (
        ["data=synthetic", "data.nan_examples=[-1]"],
        "data.nan_examples=[-1]: must be a list of example indices (integers >= 0), e.g. [] or [3,17]",
    ),
    (["data=synthetic", "data.signal=-1"], "data.signal=-1: must be a number >= 0"),
    (["data.split_seed=-3"], "data.split_seed=-3: must be an integer in [0, 2**32)"),
    (["data.split_seed=4294967296"], "data.split_seed=4294967296: must be an integer in [0, 2**32)"),  # sklearn's
    (
        ["+data.root=/x"],
        "data.root=/x: not a key of data=digits; its keys are img_size, in_chans, num_classes, test_size, val_size, "
        "split_seed, augment",
    ),
    (["optimizer=sgd", "optimizer.momentum=1.5"], "optimizer.momentum=1.5: must be a number in [0, 1)"),
    (["optimizer.eps=0"], "optimizer.eps=0: must be a number > 0"),
    (["optimizer.betas=[1.5,0.999]"], "optimizer.betas=[1.5,0.999]: must be two numbers in [0, 1), e.g. [0.9,0.999]"),
    (["optimizer.betas=0.9"], "optimizer.betas=0.9: must be two numbers in [0, 1), e.g. [0.9,0.999]"),
    # an interpolation's string reads as a number in the echoed value: was "must be two numbers" alone
    (["optimizer.betas=[0.9,'0.99']"], "optimizer.betas=[0.9,0.99]: must be two numbers in [0, 1), e.g. "
                                      "[0.9,0.999] ('0.99' is a string)"),
    (
        ["optimizer=sgd", "optimizer.momentum=0"],
        "optimizer.momentum=0: optimizer.nesterov=true needs a momentum > 0; set a momentum, or "
        "optimizer.nesterov=false",
    ),
    (
        ["model.global_pool=token"],
        "model.global_pool=token: pools the class token, so needs model.class_token=true (or pool with avg, max, "
        "avgmax or map)",
    ),
    (
        ["model.mlp_ratio=0.001"],  # timm would build int(64 * 0.001) = 0 hidden features as 64
        "model.mlp_ratio=0.001: model.embed_dim=64 x mlp_ratio must be at least 1 (the MLP's hidden features)",
    ),
    (["scheduler.min_lr_ratio=2"], "scheduler.min_lr_ratio=2: must be a number in [0, 1]"),
    (["logger.tags=5"], "logger.tags=5: must be a list of non-empty strings"),
    (["logger.backend=tensorboard"], "logger.backend=tensorboard: must be one of wandb, none"),
    (["+moe.top_k=2"], "moe.top_k=2: not a key of the moe group"),
    # keys added where nothing reads them (they trained without a word)
    (["+logger.tag=[a]"], "logger.tag=[a]: not a key of the logger group; did you mean logger.tags?"),
    (["+paths.foo=1"], "paths.foo=1: not a key of the paths group"),
    (["launcher=joblib", "+launcher.jobs=4"],
     "launcher.jobs=4: not a key of any launcher; did you mean launcher.n_jobs?"),
    (["seed=abc"], "seed=abc: must be an integer in [0, 2**32)"),
    (["seed=4294967296"], "seed=4294967296: must be an integer in [0, 2**32)"),
    (["paths.data_dir=''"], "paths.data_dir=: must be a non-empty string"),
    (["launcher=joblib", "launcher.n_jobs=0"], "launcher.n_jobs=0: must be an integer other than 0 (-1: every core)"),
    (["launcher=slurm", "launcher.nodes=0"], "launcher.nodes=0: must be a positive integer"),  # submitit's own error
]


@pytest.mark.parametrize("overrides,message", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_a_bad_override_stops_with_one_line_before_the_run_directory_is_touched(
    compose_run, tmp_path, overrides, message
):
    with pytest.raises(ConfigError) as raised:
        train(compose_run(*overrides), tmp_path / "run")  # the trainer's first act: check_config
    assert str(raised.value) == message
    assert not (tmp_path / "run").exists()  # no data loaded, no model built, nothing written


CLI_BAD = [
    (["trainer.nonfinite=ignore"], 2, "error: trainer.nonfinite=ignore: must be one of skip, stop"),
    (["+trainer.patience=3"], 2, "error: trainer.patience=3: not a key of the trainer group"),
    (
        ["data=synthetic", "data.train_size=16", "trainer.batch_size=32"],
        2,
        "error: trainer.batch_size=32: larger than the 16 training examples of data=synthetic; must be at most 16",
    ),
    (
        ["data=fashion_mnist", "data.root=/nonexistent/fashion"],  # missing data: found only once the run starts
        2,
        "error: data=fashion_mnist data.root=/nonexistent/fashion: the four IDX files (train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each plain or .gz) are not in "
        "/nonexistent/fashion or /nonexistent/fashion/FashionMNIST/raw. Put them there, fetch them with "
        "data.download=true, or set data.root to the folder that holds them.",
    ),
    (["optimizer=adam"], 2, "error: optimizer=adam: not an option of optimizer; did you mean optimizer=adamw? "
                            "(options: adamw, adamw_bf16, sgd)"),  # Hydra cannot compose it: one line (overrides.py)
    (["trainer.max_step=5"], 2, "error: trainer.max_step=5: not a key of the config; did you mean trainer.max_steps?"),
]


@pytest.mark.parametrize("overrides,code,message", CLI_BAD, ids=[" ".join(o) for o, _, _ in CLI_BAD])
def test_the_command_line_refuses_bad_overrides_leaving_no_run_directory(tmp_path, overrides, code, message):
    run_dir = tmp_path / "run"
    assert run_cli(run_dir, *overrides) == code
    output = output_of(run_dir)
    assert message in output and "Traceback" not in output
    if code == 2:
        assert output.strip().splitlines()[-1] == message  # one line
    assert not run_dir.exists()  # not even Hydra's .hydra/ and train.log


def test_a_second_process_on_a_live_run_directory_is_refused_and_a_killed_holder_leaves_no_stale_lock(
    uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    first = start_cli(run_dir, *RUN)
    signal_at_step(first, run_dir, 3, signal.SIGSTOP)  # alive, holding the run directory, making no progress
    try:
        before = fingerprint(run_dir)
        assert {".hydra/config.yaml", ".hydra/overrides.yaml", "metrics.jsonl"} <= set(before)
        assert run_cli(run_dir, *RUN, "seed=1") == 2  # another run given the same directory
        last_line = output_of(run_dir).strip().splitlines()[-1]
        assert last_line == (
            f"error: {run_dir}: in use by process {first} on {socket.gethostname()}; wait for it to end or stop it, "
            "or give this run another hydra.run.dir"
        )
        assert fingerprint(run_dir) == before  # the second process wrote nothing there, Hydra's configs included
    finally:
        os.kill(first, signal.SIGKILL)
    assert wait(first) == -signal.SIGKILL
    assert run_cli(run_dir, *RUN) == 0, output_of(run_dir)  # the kernel released the killed process's lock
    assert_matches_uninterrupted(run_dir, uninterrupted)


HOLD_AND_FORK = """
import multiprocessing, sys, time
from softmoe.harness.runs import RunDirLock

lock = RunDirLock(sys.argv[1]).acquire()
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))  # as a DataLoader worker
child.start()
print(child.pid, flush=True)
time.sleep(60)
"""


def test_a_killed_holders_forked_children_do_not_keep_its_lock(tmp_path):
    """DataLoader workers are forked, and a flock belongs to the open file they share: after a SIGKILL of a run with
    trainer.num_workers=2 the orphaned workers held its lock, and the rerun was refused, naming the dead process."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        assert "in use by process" in runs.RunDirLock(tmp_path).in_use()
        holder.kill()
        holder.wait(timeout=30)
        os.kill(child, 0)  # the forked child lives on
        assert runs.RunDirLock(tmp_path).in_use() is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)


# ----------------------------------------------------------------------------- 6. bad data


def test_skipped_bad_images_are_counted_in_metrics_and_the_summary(compose_run, tmp_path):
    root = write_image_tree(tmp_path / "images", train={"cat": 6, "dog": 6}, val={"cat": 2, "dog": 2}, size=8)
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")  # unreadable
    write_png(root / "val" / "bird" / "0.png", size=8)  # a class the training split lacks: label out of range
    overrides = [
        "data=imagefolder", f"data.root={root}", "data.img_size=8", "data.num_classes=2", "data.on_bad_file=skip",
        "model.depth=2", "trainer.batch_size=4", "trainer.max_steps=3", "trainer.log_every=1", "logger=none",
        "trainer.progress_bar=false",
    ]
    summary = train(compose_run(*overrides), tmp_path / "run")
    assert summary.skipped_examples == 2 and summary.steps == 3
    events = read_events(tmp_path / "run")
    assert events[0] == {"step": 0, "epoch": 1, "data/skipped_examples": 2}
    assert_every_step_once(events, total=3)


# ----------------------------------------------------------------------------- 7. W&B failures


def test_wandb_failing_mid_run_warns_once_and_training_and_metrics_go_on(compose_run, tmp_path, monkeypatch, caplog):
    import wandb

    from conftest import wandb_offline_run

    real_init, sent = wandb.init, []

    def init_whose_log_breaks(*args, **kwargs):
        run = real_init(*args, **kwargs)
        real_log = run.log

        def log(values, step=None, **rest):
            if len(sent) == 4:
                raise ConnectionError("api.wandb.ai: connection reset")
            sent.append(step)
            return real_log(values, step=step, **rest)

        run.log = log
        return run

    monkeypatch.setattr(wandb, "init", init_whose_log_breaks)
    overrides = [
        *RUN[:-2], "trainer.max_steps=12", "logger.mode=offline", "logger.log_images=false",
        "trainer.progress_bar=false",
    ]
    with caplog.at_level(logging.WARNING):
        summary = train(compose_run(*overrides), tmp_path)
    assert summary.steps == 12
    failures = [r.getMessage() for r in caplog.records if "W&B logging failed" in r.getMessage()]
    assert failures == [
        "W&B logging failed (api.wandb.ai: connection reset); training continues, logging to "
        f"{tmp_path / 'metrics.jsonl'} only"
    ]
    assert_every_step_once(read_events(tmp_path), total=12)
    # what reached W&B before the failure is in its offline run file, readable for `wandb sync`
    run, history = wandb_offline_run(tmp_path)
    assert run.run_id and [int(step) for step in history["_step"]] == sent == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- 8. soak


def test_soak_three_kills_and_twenty_bad_overrides_lose_and_duplicate_nothing(compose_run, uninterrupted, tmp_path):
    run_dir, bad = tmp_path / "run", iter(BAD_OVERRIDES[:20])
    logged = 0
    for cycle in range(3):
        # beyond what the killed run had logged (progress each cycle), and past the first checkpoint
        target = max(logged, CHECKPOINT_EVERY) + random.randrange(2, 4)  # about step 15 at most: room for the kill
        pid = start_cli(run_dir, *RUN)
        signal_at_step(pid, run_dir, target, signal.SIGKILL)
        assert wait(pid) == -signal.SIGKILL
        events = read_events(run_dir)
        train_steps = [e["step"] for e in events if "train/lr" in e]
        assert train_steps == list(range(1, train_steps[-1] + 1)), f"cycle {cycle}: a step lost or logged twice"
        for name in ("last.pt", PREVIOUS, "best.pt"):
            if (run_dir / name).exists():
                load_checkpoint(run_dir / name)  # every checkpoint on disk is whole
        logged = train_steps[-1]
        assert load_checkpoint(run_dir / "last.pt")["step"] <= logged
        before = fingerprint(run_dir)
        for overrides, message in [next(bad) for _ in range(7 if cycle < 2 else 6)]:  # 7 + 7 + 6 = 20
            with pytest.raises(ConfigError, match=re.escape(message)):
                train(compose_run(*overrides), run_dir)
        assert fingerprint(run_dir) == before, f"cycle {cycle}: a bad config changed the run directory"
    assert run_cli(run_dir, *RUN) == 0, output_of(run_dir)
    assert_matches_uninterrupted(run_dir, uninterrupted)


COMMANDS = ("train", "evaluate", "collect", "to_safetensors", "plan", "benchmark")


def test_every_command_runs_through_run_command():
    for command in COMMANDS:  # the one place that ends a command quietly on a closed stdout (test below and above)
        source = (ROOT / "softmoe" / f"{command}.py").read_text()
        assert source.rstrip().split('if __name__ == "__main__":\n')[1].lstrip().startswith("run_command("), command


# started as commands: a Hydra command's --help (train's) and an argparse one's (collect's); the others are the same
# two kinds, and each runs through run_command (the test above)
def run_with_stdout_closed(arguments, buffered=True):
    """A command started with its stdout's reader gone before it writes: every write to stdout fails."""
    reader, writer = os.pipe()
    os.close(reader)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}
    env.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, **({} if buffered else {"PYTHONUNBUFFERED": "1"}))
    try:
        return subprocess.run([sys.executable, "-m", *arguments], cwd=ROOT, env=env, stdout=writer,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(writer)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["train", "collect"])
def test_a_reader_that_closes_stdout_early_ends_the_command_quietly(command):
    # was (python -m softmoe.train --help | head -3): a BrokenPipeError traceback, or "Exception ignored in:
    # <_io.TextIOWrapper name='<stdout>' ...> BrokenPipeError" and exit status 120 with buffered output
    completed = run_with_stdout_closed([f"softmoe.{command}", "--help"])
    assert completed.stderr == "" and completed.returncode == 128 + signal.SIGPIPE  # the status a shell gives SIGPIPE


@pytest.mark.slow
def test_a_reader_that_closes_stdout_early_stops_a_runs_console_lines_not_the_run(tmp_path):
    # was (python -m softmoe.train | head -1): a "--- Logging error --- ... BrokenPipeError" traceback on stderr for
    # every log line after the first (unbuffered: every line)
    completed = run_with_stdout_closed(
        ["softmoe.train", "trainer.max_steps=3", "model.depth=2", "trainer.eval_batches=1", "logger=none",
         f"hydra.run.dir={tmp_path}"], buffered=False)
    assert completed.stderr == "" and completed.returncode == 0
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 3
    assert "done: test accuracy" in (tmp_path / "train.log").read_text()  # the log file keeps every line


def test_run_command_exits_with_the_commands_status_and_quietly_on_a_closed_stdout(monkeypatch):
    from softmoe.harness.errors import run_command

    for command, status in ((lambda: None, 0), (lambda: 2, 2), (lambda: 0.97, 0), (lambda: sys.exit(3), 3)):
        with pytest.raises(SystemExit) as exited:
            run_command(command)
        assert exited.value.code == status

    class ClosedPipe:
        """stdout whose reader has gone; its descriptor a copy, so the test's own stdout stays open."""

        def __init__(self):
            self.descriptor = os.dup(1)

        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.descriptor

    closed = ClosedPipe()
    monkeypatch.setattr(sys, "stdout", closed)
    try:
        with pytest.raises(SystemExit) as exited:
            run_command(lambda: print("usage: ..."))
        assert exited.value.code == 128 + signal.SIGPIPE
        devnull, now = os.stat(os.devnull), os.fstat(closed.descriptor)  # so the flush at exit cannot fail
        assert (now.st_dev, now.st_ino) == (devnull.st_dev, devnull.st_ino)
    finally:
        os.close(closed.descriptor)
