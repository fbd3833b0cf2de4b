"""Train a (Soft MoE) vision transformer from the Hydra configs in ``conf/``.

    python -m softmoe.train                                        # Soft MoE ViT on digits, ~2 min on CPU
    python -m softmoe.train model=vit_small data=cifar10 model.patch_size=4 trainer=gpu
    python -m softmoe.train -m moe.num_experts=4,8 moe.slots_per_expert=1,2   # a sweep: one job each
    python -m softmoe.train hydra.run.dir=outputs/my_run           # again later: resumes from its last.pt

A bad value stops the run before anything loads, with one line naming the key (exit status 2), and leaves no
run directory behind. Ctrl-C finishes the step, saves ``last.pt`` and says how to resume (exit status 130).
Every exit status: ``softmoe/harness/errors.py``.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from softmoe.harness.distributed import quiet_other_ranks
from softmoe.harness.errors import USER_ERRORS, NonFiniteError, RunDirInUseError, exit_code, preempted_exit_code
from softmoe.harness.faults import Preempted
from softmoe.harness.loop import train
from softmoe.harness.runs import remove_if_unused, save_hydra_configs
from softmoe.harness.sweeps import tag_console
from softmoe.runtime import tune_allocator

log = logging.getLogger("softmoe.train")


def wandb_group_and_name(hydra_cfg: DictConfig) -> tuple[Optional[str], Optional[str]]:
    """A sweep's jobs share a W&B group (the sweep directory); each run is named by its overrides."""
    group = None
    if hydra_cfg.mode == RunMode.MULTIRUN:
        group = str(hydra_cfg.sweep.dir)
    return group, hydra_cfg.job.override_dirname or "defaults"


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    hydra_cfg = HydraConfig.get()
    tune_allocator()  # glibc keeps freed memory for reuse: the expert gradients are not page-faulted every step
    quiet_other_ranks()  # under torchrun rank 0 logs; the others only warn, on the console
    # parallel jobs (launcher=joblib) share the terminal: each line says whose it is, and a warning every job
    # repeats is shown once for the sweep
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tag = f"[job {hydra_cfg.job.num}] " if multirun else ""
    tag_console(tag, Path(hydra_cfg.sweep.dir) if multirun else None)
    group, name = wandb_group_and_name(hydra_cfg)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        # Hydra's .hydra/ configs are written once this process holds the run directory (conf/hydra/default.yaml)
        hydra_configs = functools.partial(save_hydra_configs, task_cfg=cfg, hydra_cfg=HydraConfig.instance().cfg)
        summary = train(cfg, run_dir, wandb_group=group, wandb_name=name, on_claim=hydra_configs)
    except (*USER_ERRORS, NonFiniteError) as error:
        print(f"{tag}error: {error}", file=sys.stderr)
        if not isinstance(error, RunDirInUseError):  # that directory is the other process's
            remove_if_unused(run_dir)  # a run that never started leaves no directory behind
        sys.exit(exit_code(error))
    except Preempted as preempted:
        log.warning("%s", preempted)
        preempted.handover()  # e.g. submitit's requeue on SLURM; it may exit the process itself
        sys.exit(preempted.exit_code)
    except KeyboardInterrupt:  # Ctrl-C before training started, or a second one during a step
        print(f"{tag}error: interrupted, not saved; rerun the same command to resume from the last checkpoint",
              file=sys.stderr)
        remove_if_unused(run_dir)
        sys.exit(preempted_exit_code(signal.SIGINT))
    log.info("done: %s, %d steps", summary.describe(), summary.steps)
    log.info("run directory: %s", summary.run_dir)
    log.info("W&B run: %s", summary.wandb_run_path or "none")
    # The objective a Hydra sweeper (e.g. Optuna) maximises: validation, never test, accuracy.
    return summary.best_val_acc


if __name__ == "__main__":
    main()
