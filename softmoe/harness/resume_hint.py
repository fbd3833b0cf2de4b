"""The command that resumes a stopped run, for every message that says how to resume.

"Rerun the same command" is wrong for the default run directory, ``outputs/runs/<date>/<time>``: the same command
run again later makes a new directory and starts at step 0. The command printed here names the directory:

    python -m softmoe.train model.depth=2 hydra.run.dir=outputs/runs/2026-12-04/20-31-07

The run directory holds ``last.pt`` (or FSDP's ``last.dcp``), so the trainer continues from it
(``loop.resume_checkpoint``). A sweep's job resumes the same way, as a single run in its job directory
(``hydra.mode=RUN``); rerunning the whole sweep into its ``hydra.sweep.dir`` resumes every job (``sweep_stop.py``).
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Sequence, Union

from hydra.core.hydra_config import HydraConfig


# Overrides the resume command sets itself (the directory), or that would start from somewhere else.
# In each spelling: +key= adds the key, ++key= adds or overrides it.
REPLACED = ("hydra.run.dir=", "trainer.resume=")


def launcher_prefix() -> list[str]:
    """How this process was started: ``torchrun --standalone --nproc_per_node=N`` under torchrun on one node (its own
    rendezvous on a free port: without ``--standalone`` torchrun waits on port 29500, which another job may hold),
    ``torchrun --nnodes=M --nproc_per_node=N`` on several (their rendezvous is the user's to name), else ``python``."""
    per_node = os.environ.get("LOCAL_WORLD_SIZE")
    if per_node and os.environ.get("TORCHELASTIC_RUN_ID"):
        nodes = int(os.environ.get("WORLD_SIZE", per_node)) // max(int(per_node), 1)
        launch = [f"--nnodes={nodes}"] if nodes > 1 else ["--standalone"]
        return ["torchrun", *launch, f"--nproc_per_node={per_node}"]
    return ["python"]


def launch_dir() -> Path:
    """The directory the command was started in, where a printed command is pasted: Hydra's ``hydra.runtime.cwd``
    inside a job, whose working directory ``hydra.job.chdir=true`` moved into its run directory, else this one."""
    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.cwd)
    return Path.cwd()


def changes_into_its_run_dir() -> bool:
    """Whether this Hydra job runs in its run directory (``hydra.job.chdir=true``): its resume must too, or its
    relative paths (``paths.data_dir``) would name other folders."""
    return HydraConfig.initialized() and bool(HydraConfig.get().job.chdir)


def shown_path(path: Union[str, Path]) -> str:
    """``path`` relative to the directory the command was started in when it lies below it (shorter to read and to
    paste; was relative to the job's own working directory: ``hydra.run.dir=.`` under ``hydra.job.chdir=true``)."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(launch_dir().resolve()))
    except ValueError:
        return str(path)


def resume_command(
    task_overrides: Sequence[str], run_dir: Union[str, Path], module: str = "softmoe.train", *, sweep_job: bool = False
) -> str:
    """The command line that continues the run in ``run_dir``: its overrides, with ``hydra.run.dir`` naming it.
    ``sweep_job``: a sweep's job, which resumes as a single run, so ``hydra.mode=RUN`` too: an experiment file that
    sweeps sets ``hydra.mode: MULTIRUN``, which would start a new sweep elsewhere and ignore ``hydra.run.dir``."""
    kept = [override for override in task_overrides if not override.lstrip("+").startswith(REPLACED)]
    single_run = ["hydra.mode=RUN"] if sweep_job else []
    chdir = ["hydra.job.chdir=true"] if changes_into_its_run_dir() else []  # a Hydra key: not a task override
    return shlex.join([*launcher_prefix(), "-m", module, *kept, *single_run, *chdir,
                       f"hydra.run.dir={shown_path(run_dir)}"])
