"""``hydra/sweeper`` for ``hparams_search=router_optuna``: Optuna's sweeper, whose search ends after a batch of trials
that a Ctrl-C or a trial's error cut short (``softmoe/harness/optuna_sweeper.py`` says why and how).

Hydra imports every module under ``hydra_plugins`` when any Hydra application starts, so this one imports Optuna and
``softmoe`` only when a sweep instantiates it, as the Optuna plugin does."""

import sys
from typing import Any, List

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class OptunaSweeper(Sweeper):
    """``hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper`` with the same settings, whose search ends
    after a batch a stop or a trial's error cut short, leaving the sweep's end to the multirun's callbacks."""

    def __init__(self, **settings: Any) -> None:
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper as PluginsOptunaSweeper

        self._optuna = PluginsOptunaSweeper(**settings)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from softmoe.harness.optuna_sweeper import LauncherThatEndsTheSearch

        self._optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)
        searching = self._optuna.sweeper
        searching.launcher = LauncherThatEndsTheSearch(searching.launcher, config.hydra.sweep.dir)

    def sweep(self, arguments: List[str]) -> None:
        from softmoe.harness.errors import USER_ERROR_EXIT_CODE
        from softmoe.harness.optuna_sweeper import NoObjective, SearchEnded

        try:
            return self._optuna.sweep(arguments)
        except SearchEnded:  # Optuna's best trial and optimization_results.yaml are for a search that ran out
            return None
        except NoObjective as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            sys.exit(USER_ERROR_EXIT_CODE)
