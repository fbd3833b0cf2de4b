"""Train a (Soft MoE) vision transformer from the Hydra configs in ``conf/``.

    python -m softmoe.train                                        # Soft MoE ViT on digits, ~2 min on CPU
    python -m softmoe.train model=vit_small data=cifar10 model.patch_size=4 trainer=gpu
    python -m softmoe.train -m moe.num_experts=4,8 moe.slots_per_expert=1,2   # a sweep: one job each
    python -m softmoe.train hydra.run.dir=outputs/my_run           # again later: resumes from its last.pt

A bad value stops the run before anything loads, with one line naming the key (exit status 2).
Exit statuses: 0 done; 2 a bad config, data or checkpoint; 3 stopped on a NaN/inf (trainer.nonfinite);
128 + the signal (143 SIGTERM, 138 SIGUSR1, 140 SIGUSR2) preempted after saving last.pt: rerun to resume.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from softmoe.harness.checkpoint import CheckpointError
from softmoe.harness.config import ConfigError
from softmoe.harness.data import BadDataError, MissingDataError
from softmoe.harness.distributed import quiet_other_ranks
from softmoe.harness.faults import NONFINITE_EXIT_CODE, NonFiniteError, Preempted
from softmoe.harness.loop import train
from softmoe.runtime import tune_allocator

log = logging.getLogger("softmoe.train")

# Errors whose message is the whole story: printed as one line, no traceback.
USER_ERRORS = (ConfigError, MissingDataError, BadDataError, CheckpointError)


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
    group, name = wandb_group_and_name(hydra_cfg)
    try:
        summary = train(cfg, Path(hydra_cfg.runtime.output_dir), wandb_group=group, wandb_name=name)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(NONFINITE_EXIT_CODE)
    except Preempted as preempted:
        log.warning("%s", preempted)
        preempted.handover()  # e.g. submitit's requeue on SLURM; it may exit the process itself
        sys.exit(preempted.exit_code)
    log.info(
        "done: test accuracy %.2f%% (final model), best %.2f%% at epoch %d, %d steps",
        100 * summary.test_acc,
        100 * summary.best_acc,
        summary.best_epoch,
        summary.steps,
    )
    log.info("run directory: %s", summary.run_dir)
    log.info("W&B run: %s", summary.wandb_run_path or "none")
    return summary.test_acc  # the objective a Hydra sweeper (e.g. Optuna) maximises


if __name__ == "__main__":
    main()
