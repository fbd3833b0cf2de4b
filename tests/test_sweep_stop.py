"""Ctrl-C on a sweep (``softmoe/harness/sweep_stop.py``): under ``launcher=joblib`` every running job saves its step,
no new job starts, and the printed commands resume each job, and the whole sweep, where it stopped."""

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT
from softmoe.harness import sweep_stop
from softmoe.harness.checkpoint import load_checkpoint
from softmoe.harness.resume_hint import resume_command
from softmoe.harness.runs import LOCK_FILE
from test_reliability import read_events

ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
ENV.pop(sweep_stop.STOP_FILE_ENV, None)
# jobs 0 and 1 are held (SIGSTOP) once they trained a step, so they are still running when the signal comes, under
# load too, and the rerun trains only what they left; job 2, which the signal stops before it starts, trains its few
# steps only in the rerun
STEPS = (60, 61, 4)
SWEEP = [
    "launcher=joblib", f"trainer.max_steps={','.join(map(str, STEPS))}", "model.depth=2",
    "trainer.batch_size=32", "trainer.eval_batches=1", "trainer.log_every=1", "trainer.num_threads=1", "logger=none",
    "trainer.progress_bar=false",
]


def trained_steps(run_dir):
    return [event["step"] for event in read_events(run_dir) if "train/lr" in event]


def pasted(command_line):
    """A printed ``python -m softmoe.train ...`` command as the user would paste it, with this interpreter."""
    command = shlex.split(command_line)
    assert command[:3] == ["python", "-m", "softmoe.train"], command_line
    return [sys.executable, *command[1:]]


def hold_after_their_first_step(sweep, run_dirs, timeout=300):
    """Stop (SIGSTOP) each job's process once its run directory logged a step; their pids, from each run's lock."""
    held, deadline = {}, time.monotonic() + timeout
    while len(held) < len(run_dirs):
        for run_dir in run_dirs:
            if run_dir not in held and trained_steps(run_dir):
                pid = int((run_dir / LOCK_FILE).read_text().split()[1])  # "process <pid> on <host>"
                os.kill(pid, signal.SIGSTOP)
                held[run_dir] = pid
        assert sweep.poll() is None and time.monotonic() < deadline, "the jobs ended before their first step"
        time.sleep(0.01)
    return list(held.values())


@pytest.mark.slow
def test_ctrl_c_on_a_joblib_sweep_saves_every_running_job_and_the_printed_commands_resume_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "softmoe.train", "-m", *SWEEP, f"hydra.sweep.dir={sweep_dir}"]
    # a session of its own, as a terminal's foreground job: Ctrl-C goes to the sweep's process and its 2 workers
    sweep = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    held = hold_after_their_first_step(sweep, [sweep_dir / str(job) for job in (0, 1)])
    os.killpg(sweep.pid, signal.SIGINT)  # the held jobs receive it as they go on
    for pid in held:
        os.kill(pid, signal.SIGCONT)
    lines = sweep.communicate(timeout=300)[0].splitlines()
    assert sweep.returncode == 130, lines[-20:]
    assert not any("Traceback" in line for line in lines), lines  # was: joblib's abort, a job killed mid-save
    for job in (0, 1):  # each stopped after its step, saved it, and said how to resume it alone
        (said,) = [line for line in lines if line.startswith(f"[job {job}] SIGINT received: saved last.pt at step")]
        step = int(said.split("at step ")[1].split()[0])
        assert 1 <= step < STEPS[job] and load_checkpoint(sweep_dir / str(job) / "last.pt")["step"] == step
        assert max(trained_steps(sweep_dir / str(job))) == step
        # alone, a job resumes as a single run, whatever mode its experiment file sets (the last test below)
        assert said.endswith(f" hydra.mode=RUN hydra.run.dir={sweep_dir / str(job)}"), said
    assert "[job 2] not started: the sweep was stopped by SIGINT" in lines and not (sweep_dir / "2").exists()
    assert lines[-1].startswith("sweep stopped by SIGINT; rerun it to resume its unfinished jobs: python -m ")

    rerun = pasted(lines[-1].split("unfinished jobs: ")[1])
    resumed = subprocess.run(rerun, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for job in (0, 1, 2):  # every step once: nothing lost, nothing trained twice
        assert trained_steps(sweep_dir / str(job)) == list(range(1, STEPS[job] + 1)), job
    assert not (sweep_dir / sweep_stop.STOP_FILE).exists()


def loky_workers(sweep_pid):
    """The pids of the sweep process's joblib (loky) workers: its children running loky's worker module (read from
    /proc: a pgrep per poll was a process more to start on a loaded machine)."""
    workers = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # the field after the state
            if parent == sweep_pid and "popen_loky_posix" in (stat.parent / "cmdline").read_text():
                workers.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # a process that ended meanwhile
            pass
    return workers


def has_imported_torch(pid):
    """Whether process ``pid`` has torch's library mapped: it ran ``import torch``, if not yet this package."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_ctrl_c_while_the_workers_start_stops_the_sweep_cleanly(tmp_path):
    """The workers are held (SIGSTOP) as soon as they exist, before their Python has run a line of this package:
    the Ctrl-C reaches them there, in the seconds they spend importing torch. It killed such a worker, and joblib
    ended the sweep with its BrokenProcessPool traceback."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "softmoe.train", "-m", *SWEEP, f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    deadline, workers = time.monotonic() + 120, []
    while len(workers) < 2:  # each held as soon as seen: the first one's imports go on while the second starts
        for pid in set(loky_workers(sweep.pid)) - set(workers):
            os.kill(pid, signal.SIGSTOP)
            workers.append(pid)
        assert sweep.poll() is None and time.monotonic() < deadline, "no joblib workers started"
        time.sleep(0.01)
    imported = [pid for pid in workers if has_imported_torch(pid)]  # on a failure: how far each had got
    os.killpg(sweep.pid, signal.SIGINT)
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    lines = sweep.communicate(timeout=300)[0].splitlines()
    everything = "\n".join(lines)  # all of it on a failure: pytest shortens a list (CI's failure at 2d89417)
    everything += f"\n(workers {workers} held; those that had imported torch: {imported})"
    assert sweep.returncode == 130 and "Traceback" not in everything, everything
    for job in (0, 1):  # each worker lived to start its job, which saw the stop (its own pending SIGINT)
        assert f"[job {job}] not started: the sweep was stopped by SIGINT" in lines, everything
    assert lines[-1].startswith("sweep stopped by SIGINT; rerun it to resume its unfinished jobs: python -m ")
    assert not (sweep_dir / "0").exists() and not (sweep_dir / sweep_stop.STOP_FILE).exists()


@pytest.fixture
def handlers_kept():
    """This process's SIGINT and SIGTERM handlers and its main thread's signal mask, put back after the test (and no
    stop file left named)."""
    previous = {signum: signal.getsignal(signum) for signum in sweep_stop.STOP_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    yield previous
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    os.environ.pop(sweep_stop.STOP_FILE_ENV, None)


def test_a_sweep_blocks_the_stop_signals_its_workers_inherit_and_still_answers_them(
    tmp_path, compose_run, capsys, handlers_kept
):
    """The main thread blocks them from the sweep's start (the workers it forks inherit the mask); a signal to
    the process still reaches the sweep's handler, through a thread that leaves them unblocked."""
    callback = sweep_stop.SweepStop()
    callback.on_multirun_start(compose_run("launcher=joblib", f"hydra.sweep.dir={tmp_path}", hydra_node=True))
    assert set(sweep_stop.STOP_SIGNALS) <= signal.pthread_sigmask(signal.SIG_BLOCK, [])
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 10
    while sweep_stop.stop_requested() is None and time.monotonic() < deadline:
        time.sleep(0.01)  # Python runs the handler in the main thread, between bytecodes
    assert sweep_stop.stop_requested() == signal.SIGTERM
    assert capsys.readouterr().err.startswith("sweep: SIGTERM received: each running job stops after its step")
    with pytest.raises(SystemExit):
        callback.on_multirun_end(compose_run("launcher=joblib", f"hydra.sweep.dir={tmp_path}", hydra_node=True))
    assert not set(sweep_stop.STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])  # as it was


def test_a_second_signal_to_a_stopping_sweep_ends_it_at_once_and_names_the_rerun(
    tmp_path, monkeypatch, compose_run, capsys, handlers_kept
):
    """The sweep process's handlers, called as the signals would call them (what joblib then does with the
    KeyboardInterrupt, ending every worker, is joblib's)."""
    cfg = compose_run("launcher=joblib", f"hydra.sweep.dir={tmp_path}", hydra_node=True)
    monkeypatch.setattr(sys, "argv", ["softmoe/train.py", "-m", "launcher=joblib", "seed=0,1"])
    callback = sweep_stop.SweepStop()
    callback.on_multirun_start(cfg)
    assert os.environ[sweep_stop.STOP_FILE_ENV] == str(tmp_path / sweep_stop.STOP_FILE)
    assert sweep_stop.in_parallel_sweep() and sweep_stop.stop_requested() is None
    signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the first: every job stops after its step
    assert sweep_stop.stop_requested() == signal.SIGTERM
    assert capsys.readouterr().err == ("sweep: SIGTERM received: each running job stops after its step and saves "
                                       "last.pt, no further job starts; SIGTERM again ends every job at once\n")
    with pytest.raises(sweep_stop.SweepEndedAtOnce) as ended:  # the second: at once
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert ended.value.exit_code == 130 and isinstance(ended.value, KeyboardInterrupt)
    assert ended.value.message.endswith(
        f"rerun the sweep to resume its unfinished jobs: python -m softmoe.train -m launcher=joblib seed=0,1 "
        f"hydra.sweep.dir={tmp_path}")
    assert all(signal.getsignal(signum) == handler for signum, handler in handlers_kept.items())  # a third: theirs


def test_a_stopped_sweeps_end_names_the_rerun_and_exits_with_the_signals_status(
    tmp_path, compose_run, capsys, monkeypatch, handlers_kept
):
    cfg = compose_run("launcher=joblib", f"hydra.sweep.dir={tmp_path}", hydra_node=True)
    # the command line's own hydra.sweep.dir gives way to the one the sweep ran in (named once, not twice)
    monkeypatch.setattr(sys, "argv", ["softmoe/train.py", "launcher=joblib", "seed=0,1", "--multirun",
                                      "hydra.sweep.dir=elsewhere", "++hydra.sweep.dir=anywhere"])
    callback = sweep_stop.SweepStop()
    callback.on_multirun_start(cfg)
    sweep_stop.request_stop(signal.SIGINT)  # as a job that received Ctrl-C alone does
    with pytest.raises(SystemExit) as exited:
        callback.on_multirun_end(cfg)
    assert exited.value.code == 130 and not (tmp_path / sweep_stop.STOP_FILE).exists()
    assert capsys.readouterr().err == (
        f"sweep stopped by SIGINT; rerun it to resume its unfinished jobs: python -m softmoe.train -m "
        f"launcher=joblib seed=0,1 hydra.sweep.dir={tmp_path}\n")
    assert sweep_stop.STOP_FILE_ENV not in os.environ and sweep_stop.stop_requested() is None
    assert all(signal.getsignal(signum) == handler for signum, handler in handlers_kept.items())


def test_under_the_basic_launcher_the_callback_changes_nothing(tmp_path, compose_run):
    cfg = compose_run(f"hydra.sweep.dir={tmp_path}", hydra_node=True)
    before = {signum: signal.getsignal(signum) for signum in sweep_stop.STOP_SIGNALS}
    sweep_stop.SweepStop().on_multirun_start(cfg)
    assert {signum: signal.getsignal(signum) for signum in sweep_stop.STOP_SIGNALS} == before
    assert sweep_stop.STOP_FILE_ENV not in os.environ and not any(tmp_path.iterdir())


def test_a_sweep_jobs_resume_command_runs_a_single_run_even_where_its_experiment_file_sweeps(compose_run, tmp_path):
    """``experiment=table2_routing`` sets ``hydra.mode: MULTIRUN``: without ``hydra.mode=RUN`` its job's resume
    command would start a new sweep in a new directory and leave the job's ``last.pt`` where it was."""
    assert compose_run("experiment=table2_routing", hydra_node=True).hydra.mode.name == "MULTIRUN"
    command = shlex.split(resume_command(["experiment=table2_routing", "seed=1"], tmp_path, sweep_job=True))
    assert command[-2:] == ["hydra.mode=RUN", f"hydra.run.dir={tmp_path}"]
    cfg = compose_run(*command[3:], hydra_node=True)
    assert cfg.hydra.mode.name == "RUN" and cfg.hydra.run.dir == str(tmp_path) and cfg.seed == 1
    assert "hydra.mode=RUN" not in resume_command(["seed=1"], tmp_path)  # a single run's command stays as it was


def test_a_rerun_of_a_stopped_sweep_is_not_stopped_by_the_stop_file_the_first_run_left(tmp_path, compose_run,
                                                                                     handlers_kept):
    (tmp_path / sweep_stop.STOP_FILE).write_text(str(int(signal.SIGINT)))  # a run killed before it removed it
    callback = sweep_stop.SweepStop()
    callback.on_multirun_start(compose_run("launcher=joblib", f"hydra.sweep.dir={tmp_path}", hydra_node=True))
    assert sweep_stop.stop_requested() is None  # its jobs start
    callback.on_multirun_end(compose_run("launcher=joblib", f"hydra.sweep.dir={tmp_path}", hydra_node=True))
    assert list(tmp_path.iterdir()) == []  # and it ends as a sweep nobody stopped: no SystemExit


def test_a_stop_file_read_before_its_signal_number_was_written_still_stops_the_jobs(tmp_path, monkeypatch):
    monkeypatch.setenv(sweep_stop.STOP_FILE_ENV, str(tmp_path / sweep_stop.STOP_FILE))
    assert sweep_stop.stop_requested() is None
    (tmp_path / sweep_stop.STOP_FILE).write_text("")  # created, not yet written
    assert sweep_stop.stop_requested() == signal.SIGINT


def test_only_a_parallel_sweeps_worker_ignores_stop_signals_between_its_jobs(tmp_path, monkeypatch, handlers_kept):
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sweep_stop.ignore_stop_signals_between_jobs()  # a single run, or a basic sweep: Ctrl-C stays the process's own
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # a joblib worker, born with the stop signals blocked, and a Ctrl-C pending since it started
    monkeypatch.setenv(sweep_stop.STOP_FILE_ENV, str(tmp_path / sweep_stop.STOP_FILE))
    answered = []
    signal.signal(signal.SIGINT, lambda signum, frame: answered.append(signum))
    signal.pthread_sigmask(signal.SIG_BLOCK, sweep_stop.STOP_SIGNALS)
    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
    assert signal.SIGINT in signal.sigpending()
    sweep_stop.ignore_stop_signals_between_jobs()
    # the pending one stops the sweep (the sweep's process may write the stop file only after this job started) and
    # is dropped, not delivered; the sweep's process answers the next ones
    assert sweep_stop.stop_requested() == signal.SIGINT
    assert all(signal.getsignal(signum) is signal.SIG_IGN for signum in sweep_stop.STOP_SIGNALS)
    assert not set(sweep_stop.STOP_SIGNALS) & signal.pthread_sigmask(signal.SIG_BLOCK, [])
    assert not signal.sigpending() and answered == []


def test_a_workers_later_job_with_nothing_pending_does_not_stop_the_sweep(tmp_path, monkeypatch, handlers_kept):
    monkeypatch.setenv(sweep_stop.STOP_FILE_ENV, str(tmp_path / sweep_stop.STOP_FILE))
    signal.pthread_sigmask(signal.SIG_BLOCK, sweep_stop.STOP_SIGNALS)  # as a worker is born
    for _ in range(2):  # its first job and the next
        sweep_stop.ignore_stop_signals_between_jobs()
        assert sweep_stop.stop_requested() is None and not (tmp_path / sweep_stop.STOP_FILE).exists()


@pytest.mark.parametrize("launcher,in_process", [("basic", True), ("joblib", False), ("submitit_local", False)])
def test_only_a_basic_launcher_sweeps_job_ends_the_sweep_and_names_its_rerun(compose_run, launcher, in_process):
    """A submitit job's ``sys.argv`` is submitit's, so it prints no sweep command; a joblib job returns instead."""
    cfg = compose_run(f"launcher={launcher}", "hydra.mode=MULTIRUN", hydra_node=True)
    assert sweep_stop.in_this_process(cfg.hydra) is in_process
    assert not sweep_stop.in_this_process(compose_run(hydra_node=True).hydra)  # a single run


def test_the_sweeps_first_signal_stops_it_even_after_a_job_stopped_it_already(tmp_path, compose_run, capsys,
                                                                               handlers_kept):
    """A job that received SIGINT alone writes the stop file; Ctrl-C to the sweep's process then is its first, not
    its second: it must not end the saving jobs at once."""
    callback = sweep_stop.SweepStop()
    callback.on_multirun_start(compose_run("launcher=joblib", f"hydra.sweep.dir={tmp_path}", hydra_node=True))
    sweep_stop.request_stop(signal.SIGTERM)  # a job preempted by SIGTERM alone
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)  # no SweepEndedAtOnce
    assert capsys.readouterr().err == ("sweep: SIGINT received: each running job stops after its step and saves "
                                       "last.pt, no further job starts; Ctrl-C again ends every job at once\n")
    assert sweep_stop.stop_requested() == signal.SIGTERM  # the first stop is the one the sweep reports and exits with
    with pytest.raises(sweep_stop.SweepEndedAtOnce):
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)


def test_a_jobs_line_reaches_the_shared_console_in_one_write(monkeypatch):
    """The workers of a parallel sweep share the console: a line written as its text, then its newline, let another
    job's line in between ("[job 1] not started: ...[job 0] not started: ..." and then both newlines)."""
    from softmoe import train as train_command

    writes = []

    class Console(io.StringIO):
        def write(self, text):
            writes.append(text)
            return super().write(text)

    monkeypatch.setattr(sys, "stderr", Console())
    train_command.say("[job 0] not started: the sweep was stopped by SIGINT")
    assert writes == ["[job 0] not started: the sweep was stopped by SIGINT\n"]


def test_a_forked_process_starts_a_stop_signal_thread_of_its_own():
    """A fork has none of its parent's threads: one that kept the parent's (dead) thread as its receiver would block
    SIGINT and SIGTERM in its main thread with no thread left to take them."""
    sweep_stop._keep_a_thread_that_receives_stop_signals()
    pid = os.fork()
    if pid == 0:
        code = 2
        try:
            sweep_stop._keep_a_thread_that_receives_stop_signals()
            code = 0 if any(thread.name == "softmoe-stop-signals" and thread.is_alive()
                            for thread in threading.enumerate()) else 1
        finally:
            os._exit(code)
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0


@pytest.mark.slow
def test_a_joblib_jobs_error_leaves_the_jobs_beside_it_to_finish_and_the_sweep_exits_with_its_status(tmp_path):
    """Was: the failing job's worker exited, and joblib killed job 1 mid-step: no line of its own, no resume
    command, the steps since its last checkpoint lost."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "softmoe.train", "-m", "launcher=joblib", "data=synthetic", "model.patch_size=8",
               "data.nan_examples=[5],[]", "trainer.nonfinite=stop", "trainer.max_steps=30",
               "trainer.checkpoint_every=5", "model.depth=2", "trainer.log_every=1", "logger=none",
               "trainer.progress_bar=false", f"hydra.sweep.dir={sweep_dir}"]
    swept = subprocess.run(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=300)
    lines = swept.stdout.splitlines()
    assert swept.returncode == 3, lines[-20:]  # the NaN stop's status, as a single run's
    assert "Traceback" not in swept.stdout
    assert trained_steps(sweep_dir / "1") == list(range(1, 31))  # job 1 ran to its end
    assert any(line.startswith("[job 1] done: test accuracy") for line in lines)
    error = next(line for line in lines if line.startswith("[job 0] error: step "))
    resume = next(line for line in lines if line.startswith("[job 0] last.pt is kept; resume with: "))
    assert lines[-2:] == [error, resume]  # repeated as the sweep ends, below the other jobs' lines
    assert load_checkpoint(sweep_dir / "0" / "last.pt")["step"] == 15  # its last checkpoint before the NaN of step 19


# an Optuna search (conf/hparams_search/router_optuna.yaml) of 4 trials, 2 at a time, each trial OPTUNA_STEPS steps
OPTUNA_STEPS = 40
OPTUNA_SWEEP = [
    "hparams_search=router_optuna", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
    *[arg for arg in SWEEP if not arg.startswith("trainer.max_steps=")], f"trainer.max_steps={OPTUNA_STEPS}",
]


@pytest.mark.slow
def test_ctrl_c_on_an_optuna_sweep_ends_its_search_with_the_rerun_that_resumes_it(tmp_path):
    """Was: each stopped trial returned the NaN "no result", which Optuna's ``tell`` refused; the sweep ended in
    Optuna's traceback, exit status 1, without the rerun line (``softmoe/harness/optuna_sweeper.py``)."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "softmoe.train", "-m", *OPTUNA_SWEEP, f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True)
    held = hold_after_their_first_step(sweep, [sweep_dir / str(job) for job in (0, 1)])
    os.killpg(sweep.pid, signal.SIGINT)
    for pid in held:
        os.kill(pid, signal.SIGCONT)
    everything = sweep.communicate(timeout=300)[0]
    lines = everything.splitlines()
    assert sweep.returncode == 130 and "Traceback" not in everything, everything
    for job in (0, 1):
        assert any(line.startswith(f"[job {job}] SIGINT received: saved last.pt at step") for line in lines)
    assert not (sweep_dir / "2").exists()  # the search drew no trial after the stopped batch
    assert not (sweep_dir / "optimization_results.yaml").exists()  # nor reported a best trial of a search cut short
    assert lines[-1].startswith("sweep stopped by SIGINT; rerun it to resume its unfinished jobs: python -m ")

    rerun = pasted(lines[-1].split("unfinished jobs: ")[1])
    resumed = subprocess.run(rerun, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for job in range(4):  # the same trials drawn again: the stopped ones resumed, every step once
        assert trained_steps(sweep_dir / str(job)) == list(range(1, OPTUNA_STEPS + 1)), job
    import yaml

    best = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())["best_value"]
    assert best == max(max(e["val/acc"] for e in read_events(sweep_dir / str(job)) if "val/acc" in e)
                       for job in range(4))


@pytest.mark.slow
def test_an_optuna_trials_error_ends_the_search_after_its_batch_with_the_trials_lines_and_status(tmp_path):
    """The trial whose example 5 is NaN (it is met at step 19) stops; the one beside it finishes, no further trial
    is drawn, and the sweep ends as a grid sweep does (was: joblib killed the other trial mid-step)."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "softmoe.train", "-m", *OPTUNA_SWEEP[:3], "launcher=joblib", "data=synthetic",
               "model.patch_size=8", "data.nan_examples=[5]", "trainer.nonfinite=stop",
               "trainer.max_steps=choice(10,30)", "trainer.checkpoint_every=5", "model.depth=2", "trainer.log_every=1",
               "logger=none", "trainer.progress_bar=false", f"hydra.sweep.dir={sweep_dir}"]
    swept = subprocess.run(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=300)
    lines = swept.stdout.splitlines()
    assert swept.returncode == 3 and "Traceback" not in swept.stdout, swept.stdout  # the NaN stop's status
    steps = {job: json.loads(load_checkpoint(sweep_dir / str(job) / "last.pt")["config"])["trainer"]["max_steps"]
             for job in (0, 1)}
    assert sorted(steps.values()) == [10, 30]  # the seeded sampler drew one trial of each
    failed, finished = sorted(steps, key=steps.get, reverse=True)
    assert trained_steps(sweep_dir / str(finished)) == list(range(1, 11))
    assert any(line.startswith(f"[job {finished}] done: test accuracy") for line in lines)
    error = next(line for line in lines if line.startswith(f"[job {failed}] error: step 19: loss=nan"))
    resume = next(line for line in lines if line.startswith(f"[job {failed}] last.pt is kept; resume with: "))
    assert lines[-2:] == [error, resume]  # repeated as the sweep ends
    assert not (sweep_dir / "2").exists() and not (sweep_dir / "optimization_results.yaml").exists()


def test_a_stopped_search_whose_sampler_is_unseeded_says_no_rerun_resumes_it(compose_run, tmp_path, capsys,
                                                                             handlers_kept):
    """Was: "rerun it to resume its unfinished jobs", and the rerun's trials, drawn anew, were refused by the run
    directories of the stopped ones (their checkpoints saved with other values)."""
    unseeded = compose_run("hparams_search=router_optuna", "hydra.sweeper.sampler.seed=null", hydra_node=True)
    line = sweep_stop.sweep_resume_line(signal.SIGINT, "sweep", ["hparams_search=router_optuna"],
                                        unseeded.hydra.sweeper)
    assert line == ("sweep stopped by SIGINT; its sampler is not seeded (hydra.sweeper.sampler.seed=null), so a rerun "
                    "would draw other trials than the stopped ones: resume each stopped trial with its own line above")
    # a second signal, which ends every job at once, says the same (was: "rerun the sweep to resume")
    sweep_stop.SweepStop().on_multirun_start(compose_run(
        "hparams_search=router_optuna", "hydra.sweeper.sampler.seed=null", "launcher=joblib",
        f"hydra.sweep.dir={tmp_path}", hydra_node=True))
    signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    with pytest.raises(sweep_stop.SweepEndedAtOnce) as ended:
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    assert ended.value.message.endswith(
        "its sampler is not seeded, so a rerun would draw other trials: resume each trial alone with the overrides "
        "in <its job dir>/.hydra/overrides.yaml and hydra.mode=RUN hydra.run.dir=<its job dir>")
    for seeded in (compose_run("hparams_search=router_optuna", hydra_node=True), compose_run(hydra_node=True)):
        line = sweep_stop.sweep_resume_line(signal.SIGINT, "sweep", ["seed=0,1"], seeded.hydra.sweeper)
        assert line.startswith("sweep stopped by SIGINT; rerun it to resume its unfinished jobs: python -m ")


def test_a_ctrl_c_between_jobs_names_the_rerun_only_while_a_basic_launcher_sweep_runs(compose_run, tmp_path,
                                                                                       handlers_kept):
    """``tests/test_stop_messages.py`` runs it; here the lines it chooses between, and when there is none."""
    assert sweep_stop.interrupted_sweep_line(["seed=0,1"]) is None  # no sweep: the command says "interrupted"
    callback = sweep_stop.SweepStop()
    for launcher, line in (("joblib", None), ("basic", (
            "sweep stopped by SIGINT while no job ran; rerun it to resume its unfinished jobs: python -m "
            f"softmoe.train -m seed=0,1 hydra.sweep.dir={tmp_path}"))):
        cfg = compose_run(f"launcher={launcher}", f"hydra.sweep.dir={tmp_path}", hydra_node=True)
        callback.on_multirun_start(cfg)
        try:  # a joblib sweep's Ctrl-C is its callback's (the jobs stop and save); the basic launcher's reaches here
            assert sweep_stop.interrupted_sweep_line(["seed=0,1"]) == line
        finally:
            callback.on_multirun_end(cfg)
        assert sweep_stop.interrupted_sweep_line(["seed=0,1"]) is None  # every job ended: nothing left to resume
    unseeded = compose_run("hparams_search=router_optuna", "hydra.sweeper.sampler.seed=null", hydra_node=True)
    assert sweep_stop.sweep_resume_line(signal.SIGINT, "sweep", [], unseeded.hydra.sweeper, between_jobs=True) == (
        "sweep stopped by SIGINT while no job ran; its sampler is not seeded (hydra.sweeper.sampler.seed=null), so a "
        "rerun draws new trials: the finished ones keep their results in their job directories")


@pytest.mark.slow
def test_an_optuna_trial_without_a_validation_accuracy_ends_the_search_in_one_line(tmp_path):
    """A fraction that holds out no image (the up-front check refuses data.val_size=0 alone). Was: Optuna's
    60-line traceback on the NaN objective, exit status 1, once every trial of the batch had trained."""
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "softmoe.train", "-m", *OPTUNA_SWEEP[:3], "launcher=joblib",
               "data.val_size=0.0001", "trainer.max_steps=3", "model.depth=2", "logger=none",
               "trainer.progress_bar=false", f"hydra.sweep.dir={sweep_dir}"]
    swept = subprocess.run(command, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=300)
    assert swept.returncode == 2 and "Traceback" not in swept.stdout, swept.stdout
    assert swept.stdout.splitlines()[-1] == (
        "error: job 0 trained without the validation accuracy this search maximises (its run held out no validation "
        "image); hold out some with data.val_size=<count or fraction> (a fraction rounds to whole images)")
    assert not (sweep_dir / "2").exists()
