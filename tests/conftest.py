import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Under pytest-xdist (the README's `-n auto`) each worker, and every command it starts, computes on one thread: two
# workers of two threads each on a 2-core machine would make OpenMP's spinning threads take turns on the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402  (after OMP_NUM_THREADS: torch reads it once, when imported)

from softmoe.harness.wandb_files import is_closed, item_path, read_records

# tests/ holds shared helpers (reference implementations, fixtures)
sys.path.insert(0, os.path.dirname(__file__))


def _first_backward_before_any_compile():
    """One backward now, when this pytest process starts. The autograd engine decides once per process, at its
    first backward, whether a forked child may run autograd; a process whose first backward came after
    torch.compile or torch.export had run makes every forked child fail with "Unable to handle autograd's threading
    in combination with fork-based multiprocessing". The tests that fork a trainer (tests/test_reliability.py)
    would then pass or fail with the tests pytest-xdist happened to run before them in the same worker."""
    weight = torch.ones(1, requires_grad=True)
    (weight * 2).sum().backward()


_first_backward_before_any_compile()


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


RESUMING = re.compile(r"^resuming from (.+) at step (\d+) of \d+$")  # softmoe.harness.context's line


@pytest.fixture
def resumed_from(caplog):
    """A function giving [(checkpoint path, step)] of every resume logged so far in this test. A resumed CPU run
    ends bit for bit where one that ignored its checkpoint and started again would, so only this line tells them
    apart."""
    caplog.set_level(logging.INFO, logger="softmoe.harness.context")

    def resumes():
        matches = (RESUMING.match(record.getMessage()) for record in caplog.records
                   if record.name == "softmoe.harness.context")
        return [(Path(match.group(1)), int(match.group(2))) for match in matches if match]

    return resumes


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
ROOT = Path(CONF_DIR).parent


@pytest.fixture(scope="session")
def compose_run():
    """compose_run(*overrides): the config `python -m softmoe.train <overrides>` would run (nothing runs)."""
    from hydra import compose, initialize_config_dir

    def _compose(*overrides, hydra_node=False):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose("train", overrides=list(overrides), return_hydra_config=hydra_node)

    return _compose


@pytest.fixture
def user_config(tmp_path):
    """user_config("experiment/mine", text): writes a config file of the user's own into a folder outside the
    repository; returns the override that adds that folder to Hydra's search path."""
    folder = tmp_path / "user_conf"

    def _write(name, text):
        path = folder / f"{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return f"hydra.searchpath=[file://{folder}]"

    return _write


class Killed(Exception):
    """Stands for a process killed mid-step: it writes no checkpoint of its own."""


def train_killed_after(steps, cfg, run_dir, monkeypatch):
    """``train(cfg, run_dir)`` as a process killed after its ``steps``-th AdamW step, before the next one."""
    from softmoe.harness.loop import train

    real_step, taken = torch.optim.AdamW.step, []

    def dying_step(self, *args, **kwargs):
        if len(taken) == steps:
            raise Killed()
        taken.append(1)
        return real_step(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.optim.AdamW, "step", dying_step)
        with pytest.raises(Killed):
            train(cfg, run_dir)


def wandb_closed_records(path):
    """The records of an offline W&B run file, which must be closed: training returns only once the run's closing
    ``exit`` record is on disk (``Telemetry`` waits for it: W&B's service process may still be appending after
    ``run.finish()`` returns)."""
    assert is_closed(path), f"{path} lacks its closing exit record, though the run that wrote it has returned"
    return list(read_records(path))


def wandb_offline_run(run_dir):
    """(run record, {history key: [values as JSON]}) of the single offline W&B run in ``run_dir``, closed."""
    (path,) = Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")
    run, history = None, {}
    for record in wandb_closed_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            for item in record.history.item:
                history.setdefault("/".join(item_path(item)), []).append(item.value_json)
    return run, history


@pytest.fixture(scope="session")
def offline_sweep(tmp_path_factory):
    """A real sweep, ``python -m softmoe.train -m moe.num_experts=4,8`` (3 steps each, W&B offline), shared by
    the tests of the sweep itself and of collecting it; returns its sweep dir once W&B has closed both runs.
    Under pytest-xdist it is made once for all the workers (in the folder above theirs, under a file lock): with
    ``--dist loadfile`` tests/test_train.py and tests/test_collect.py usually run on different workers, and each
    made its own (a W&B service and 2 runs, some 15 s)."""
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, one per worker below it
    sweep_dir, made = shared / "offline_sweep", shared / "offline_sweep.made"
    with FileLock(str(shared / "offline_sweep.lock")):
        if made.exists():
            return sweep_dir
        shutil.rmtree(sweep_dir, ignore_errors=True)  # a sweep that failed in another worker
        command = [
            sys.executable, "-m", "softmoe.train", "-m", "moe.num_experts=4,8",
            "trainer.max_steps=3", "trainer.log_every=1", "trainer.batch_size=256", "model.depth=2",
            "logger.mode=offline", f"hydra.sweep.dir={sweep_dir}",
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        for job in (0, 1):
            wandb_offline_run(sweep_dir / str(job))  # each run's file is closed
        made.touch()
    return sweep_dir
