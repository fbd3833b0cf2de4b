"""An Optuna search that ends after a batch of trials that a stop or a trial's error left without a result.

Optuna's Hydra sweeper (``hydra-optuna-sweeper``) tells the study each job's return value. A job of a stopped
joblib sweep (``sweep_stop``) and a joblib job that stopped on its own error (``sweep_console.hand_to_sweep``)
return the NaN "no result" objective; Optuna's ``study.tell`` refuses NaN, the sweeper then tells the trial as
failed *with* that value, which Optuna refuses again, and the sweep ended in a 30-line traceback (exit status 1),
with no rerun line. The sweeper named in ``conf/hparams_search/router_optuna.yaml``
(``hydra_plugins/softmoe_optuna_sweeper``: Hydra instantiates plugins from that namespace only) launches each batch
through :class:`LauncherThatEndsTheSearch`, and ends the search when it raises :class:`SearchEnded`, before anything
is told: the multirun's end callbacks then end the sweep as a grid sweep's (``SweepStop``: the rerun line and 128 +
signal; ``RefusedJobs``: the failed trial's lines and its exit status). The batch's other trials finish first.

Its trials stay unfinished in the study. The same command rerun into the sweep directory draws the same trials
again (the sampler is seeded, and a finished trial reports its result again), and each resumes from its run
directory.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence, Union

from . import sweep_stop
from .sweep_console import jobs_handed_to_sweep


class SearchEnded(Exception):
    """A batch of trials came back with one that has no result (stopped, or failed): the search goes no further."""


class NoObjective(Exception):
    """A trial ran to its end without the validation accuracy the search maximises (its run held out no validation
    image: a ``data.val_size`` fraction that rounds to none); ``str()`` is the line that says so."""


class LauncherThatEndsTheSearch:
    """A sweep's launcher that raises :class:`SearchEnded` after a batch a stop or a job's error cut short (its NaN
    results would be told to the study as they are)."""

    def __init__(self, launcher: Any, sweep_dir: Union[str, Path]) -> None:
        self._launcher, self._sweep_dir = launcher, Path(sweep_dir)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        returns = self._launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        if sweep_stop.stop_requested() is not None or jobs_handed_to_sweep(self._sweep_dir):
            raise SearchEnded
        missing = [initial_job_idx + number for number, job in enumerate(returns) if no_objective(job)]
        if missing:  # Optuna would refuse the NaN in its traceback
            raise NoObjective(f"job {missing[0]} trained without the validation accuracy this search maximises (its "
                              "run held out no validation image); hold out some with data.val_size=<count or "
                              "fraction> (a fraction rounds to whole images)")
        return returns

    def __getattr__(self, name: str) -> Any:  # anything else is the launcher's
        return getattr(self._launcher, name)


def no_objective(job: Any) -> bool:
    """Whether a finished job (Hydra's ``JobReturn``) returned the NaN "no result" objective."""
    value = getattr(job, "return_value", None)
    return isinstance(value, float) and math.isnan(value)

