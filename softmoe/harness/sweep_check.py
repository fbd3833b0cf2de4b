"""Every job of a sweep (the command line's, or an experiment's own) checked before the first one starts.

Each job checks its own config when it starts (:func:`~.config.check_config`), so a sweep with one bad value
(``moe.num_experts=4,0``) used to run every job before that one, perhaps for hours, then stop at it. The train
command calls :func:`sweep_job_error` before Hydra starts: it composes the config of every job the basic sweeper
would run (the cartesian product of the discrete sweeps) and checks each, reading no data and building models, if
at all, on the meta device; it also looks for each distinct dataset's files (``data.check_data_present``), so a
sweep over ``data=digits,cifar10`` without CIFAR-10 on disk does not train job 0 first; it looks into each job's run
directory that exists (a rerun of the sweep), for a live process training there or a checkpoint of another
experiment, reading the checkpoint's config alone (``resume.resume_refusal``); and a launcher this machine
cannot start (``launcher=slurm`` without SLURM's commands) is refused before Hydra makes the sweep dir, as is a group
option that an experiment's ``hydra.sweeper.params`` sweeps and no file holds (with the options). Interval
sweeps (an Optuna search's ``interval(...)``) are left to their sweeper: their values are not known before it draws
them.

A single run is checked the same way (:func:`single_run_error`), so that a run it refuses makes no run directory.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import os
import re
from pathlib import Path
from typing import Iterator, Optional, Sequence

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from .config import check_config, check_launch, check_launcher_here
from .data import check_data_present
from .distributed import launched_by_torchrun
from .errors import ConfigError, MissingDataError
from .overrides import (
    HYDRA_FLAGS,
    all_keys,
    compose_config,
    conflicting_overrides,
    group_key_error,
    group_overrides,
    hydra_refusal,
    missing_key,
    missing_option,
    plain_overrides,
    runs_as_multirun,
)
from .plausibility import CONF_DIR, threads_warning
from .resume import resume_refusal
from .rules import plain
from .runs import RunDirLock
from .sweep_duplicates import duplicate_jobs_warning
from .sweep_stop import is_grid_sweeper

MAX_JOBS_CHECKED = 200  # at about 0.2 s a job, 40 s at most; a larger grid is checked job by job as it runs


def sweep_jobs(overrides: Sequence[str]) -> Iterator[list[str]]:
    """Each job's overrides, as Hydra's basic sweeper makes them (``BasicSweeper.split_arguments``): one value per
    key, a key given twice taking its last value at the place of its first (an experiment's ``hydra.sweeper.params``
    sweep, then the command line's ``seed=0``), and the cartesian product of the discrete sweeps, the last varying
    fastest. Interval sweeps are dropped: their values are the sweeper's to draw."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    values_of: dict[str, list[str]] = {}
    for override in parsed:
        key = override.get_key_element()
        if not override.is_sweep_override():
            values_of[key] = [override.input_line]
        elif override.is_discrete_sweep():
            values_of[key] = [f"{key}={value}" for value in override.sweep_string_iterator()]
    for values in itertools.product(*values_of.values()):
        yield list(values)


def job_composition_error(job: Sequence[str], config_name: str, conf_dir: Path, error: Exception) -> str:
    """Why Hydra cannot compose one job of a sweep whose first job composes, in one line: mostly a key that one
    swept group option has and another lacks (``optimizer=adamw,sgd optimizer.betas=[0.9,0.99]``)."""
    parsed = OverridesParser.create().parse_overrides(list(job))
    groups = group_overrides(parsed, conf_dir)
    chosen = {override.key_or_group: override.value() for override in groups}
    try:
        keys = all_keys(OmegaConf.to_container(compose_config(config_name, plain_overrides(groups), conf_dir)))
    except (HydraException, OmegaConfBaseException):
        keys = None
    for override in (override for override in parsed if override not in groups):
        section = override.key_or_group.split(".")[0]
        if keys is not None and override.type == OverrideType.CHANGE and section in chosen \
                and override.key_or_group not in keys:
            return group_key_error(override.input_line, section, chosen[section], keys)
    return missing_key(parsed, config_name, conf_dir) or hydra_refusal(error)


def command_config(argv: Sequence[str], config_name: str, conf_dir: Path) -> tuple[list[str], Optional[DictConfig]]:
    """(the overrides, the config of the command line's first job); the config is None for one Hydra will refuse
    anyway (``overrides.composition_error``) or one with Hydra's flags (``--help``, ``--cfg``)."""
    overrides = [argument for argument in argv if argument not in HYDRA_FLAGS]
    if any(argument.startswith("-") for argument in overrides):
        return overrides, None
    try:
        return overrides, compose_config(
            config_name, plain_overrides(OverridesParser.create().parse_overrides(overrides)), conf_dir)
    except (HydraException, OmegaConfBaseException):
        return overrides, None


def multirun_config(argv: Sequence[str], config_name: str, conf_dir: Path) -> tuple[list[str], Optional[DictConfig]]:
    """:func:`command_config`, its config None for a single run too."""
    overrides, base = command_config(argv, config_name, conf_dir)
    return overrides, base if base is not None and runs_as_multirun(argv, base) else None


def swept_params(base: DictConfig) -> list[str]:
    """The config's own ``hydra.sweeper.params`` as overrides: the basic sweeper sweeps them, then the command
    line's."""
    return [f"{key}={value}" for key, value in (OmegaConf.select(base, "hydra.sweeper.params") or {}).items()]


def sweep_warning(argv: Sequence[str], config_name: str, conf_dir: Path = CONF_DIR) -> Optional[str]:
    """What a multirun that will start should be told once, before its jobs (``plausibility.threads_warning``: more
    threads at once than cores), in one line; None otherwise."""
    overrides, base = multirun_config(argv, config_name, conf_dir)
    if base is None or OmegaConf.select(base, "launcher.name") != "joblib":
        return None
    basic = is_grid_sweeper(OmegaConf.select(base, "hydra.sweeper._target_"))
    jobs = sum(1 for _ in sweep_jobs([*swept_params(base), *overrides])) if basic else None  # Optuna's: its own
    return threads_warning(OmegaConf.select(base, "launcher.n_jobs"), OmegaConf.select(base, "trainer.num_threads"),
                           jobs, os.cpu_count() or 1)


def duplicate_runs_warning(argv: Sequence[str], config_name: str, conf_dir: Path = CONF_DIR) -> Optional[str]:
    """Two jobs of a grid sweep that train the same run, their values differing only in keys their options leave
    unused (``sweep_duplicates``), in one line; None otherwise (a sweeper that draws its jobs, a grid too large to
    compose job by job, a job that does not compose: the checks name that)."""
    overrides, base = multirun_config(argv, config_name, conf_dir)
    if base is None or not is_grid_sweeper(OmegaConf.select(base, "hydra.sweeper._target_")):
        return None
    jobs = list(itertools.islice(sweep_jobs([*swept_params(base), *overrides]), MAX_JOBS_CHECKED + 1))
    if len(jobs) < 2 or len(jobs) > MAX_JOBS_CHECKED:
        return None
    configs = []
    try:
        for number, job in enumerate(jobs):  # as job_problem reads each job's config (its compositions are kept)
            composed = compose_config(config_name, job, conf_dir)
            with hydra_config_set_to(job_config(composed, number)):
                configs.append(plain(composed))
    except (HydraException, OmegaConfBaseException, ConfigError, ValueError):
        return None
    return duplicate_jobs_warning(jobs, configs, set(overrides))


def sweep_job_error(argv: Sequence[str], config_name: str, conf_dir: Path = CONF_DIR) -> Optional[str]:
    """The first job of this multirun (``-m``, or a config that sets ``hydra.mode: MULTIRUN``, as the experiments
    do) whose config the job would refuse, in one line naming the job and its swept values (or a launcher this
    machine lacks, :func:`~.config.check_launcher_here`); None when every job
    passes, or the command line is no multirun, or Hydra will refuse its first job anyway
    (``overrides.composition_error``)."""
    overrides, base = multirun_config(argv, config_name, conf_dir)
    if base is None:
        return None
    try:
        check_launcher_here(OmegaConf.select(base, "launcher.name"))
    except ConfigError as error:
        return str(error)
    params, parser = swept_params(base), OverridesParser.create()
    grid = is_grid_sweeper(OmegaConf.select(base, "hydra.sweeper._target_"))  # else drawn (Optuna)
    problem = ((None if grid else objective_error(base)) or params_option_error(params, overrides, conf_dir)
               or conflicting_overrides(parser.parse_overrides([*params, *overrides]), conf_dir,
                                        OmegaConf.select(base, "hydra.runtime.choices")))
    if problem:
        return problem
    jobs = list(itertools.islice(sweep_jobs([*params, *overrides]), MAX_JOBS_CHECKED + 1))
    if len(jobs) > MAX_JOBS_CHECKED:
        return None  # a huge grid is checked as it runs
    fixed, data_checked = set(overrides), []
    for number, job in enumerate(jobs):  # one job too: was checked only once Hydra had made the sweep directory
        problem = job_problem(job, number, config_name, conf_dir, data_checked, values_known=grid)
        if problem:
            swept = " ".join(override for override in job if override not in fixed)
            return f"job {number}{f' ({swept})' if swept else ''}: {problem.rstrip('.')}; no job was started"
    return None


def objective_error(base: DictConfig) -> Optional[str]:
    """For a sweeper that draws its trials (Optuna), which maximises the best validation accuracy each job returns:
    without a validation split there is none, and Optuna refused the job's NaN in a traceback once it had trained."""
    if OmegaConf.select(base, "data.val_size") != 0:
        return None
    return ("data.val_size=0: this sweeper maximises each run's best validation accuracy, and a run without a "
            "validation split has none; hold out training images for it (data.val_size=<count or fraction>)")


def single_run_error(argv: Sequence[str], config_name: str, conf_dir: Path = CONF_DIR) -> Optional[str]:
    """Why this command line's single run (no sweep) would refuse to start, in one line, or None: a sweep job's
    checks (:func:`job_problem`), before Hydra makes the run directory. A run refused here makes none; one refused
    once started removes the one it made, and under torchrun that pulled the directory from under another rank,
    whose Hydra was still opening its ``train.log`` there (a 30-line traceback, exit status 1)."""
    overrides, composed = command_config(argv, config_name, conf_dir)  # composition_error's, from its cache
    if composed is None or runs_as_multirun(argv, composed):
        return None  # composition_error names what Hydra refuses; sweep_job_error checks a sweep
    return job_problem(overrides, None, config_name, conf_dir, [])


def params_option_error(params: Sequence[str], overrides: Sequence[str], conf_dir: Path) -> Optional[str]:
    """A group option that a config's ``hydra.sweeper.params`` sweeps (``experts_slots: 16x1,3x5``) and no config
    file holds, named as the command line's would be (was: Hydra's "Could not find 'experts_slots/3x5'")."""
    parser = OverridesParser.create()
    searchpath = [o for o in parser.parse_overrides(list(overrides)) if o.key_or_group == "hydra.searchpath"]
    problem = missing_option([*parser.parse_overrides(list(params)), *searchpath], conf_dir)
    return f"hydra.sweeper.params: {problem}" if problem else None


def job_problem(job: Sequence[str], number: Optional[int], config_name: str, conf_dir: Path,
                data_checked: list, values_known: bool = True) -> Optional[str]:
    """Why job ``number`` (its overrides ``job``; None: a single run) would refuse to start, in one line, or None:
    its config, its dataset's files (each distinct dataset once: looked for, not read; ``data_checked`` holds those
    seen), and its run directory (a live process trains there, or its checkpoint is of another experiment: a rerun it
    refuses). The line is the run's own ``error:`` line, as it would print it once started. ``values_known=False``:
    a sweeper that draws the job's values (Optuna), so its checkpoint is left for the job to compare: a job's
    ``interval()`` values are not in ``job``, nor is it known which ``choice()`` value job ``number`` draws."""
    try:
        composed = compose_config(config_name, job, conf_dir)
        as_run = job_config(composed, number)  # what the hydra: resolver and the job's run directory read
        with hydra_config_set_to(as_run):  # ${hydra:job.num} and the like resolve as the job's will
            check_config(composed)
            config = plain(composed)
        check_launch_as_the_run_will(config, single_run=number is None)
        data = (config["data"], config["paths"]["data_dir"])
        if data not in data_checked:
            data_checked.append(data)
            check_data_present(*data)
    except (ConfigError, MissingDataError) as error:
        return str(error)
    except (HydraException, OmegaConfBaseException) as error:
        return job_composition_error(job, config_name, conf_dir, error)
    run_dir = job_run_dir(as_run, number)
    if run_dir is None:
        return None
    # under torchrun each rank checks its sweep for itself, and rank 0 may hold job 0's lock by the time another rank
    # looks: the ranks' own lock check (Distributed.claim_run_dir) settles that one
    in_use = None if launched_by_torchrun() or not run_dir.is_dir() else RunDirLock(run_dir).in_use()
    if in_use:
        return in_use
    if not values_known:  # was: a stopped Optuna sweep's rerun refused, its drawn values taken as the defaults
        return None
    # a new run directory too: trainer.resume's checkpoint, another model's or past this run's end, is refused here
    refusal = resume_refusal(run_dir, config["trainer"]["resume"], config)
    return each_job_its_own(refusal, run_dir, number) if refusal and number is not None else refusal


def each_job_its_own(refusal: str, run_dir: Path, number: int) -> str:
    """A sweep job's refusal names its own checkpoint to start a new run from (``trainer.resume=<sweep dir>/1/
    last.pt``); given to the sweep, that would start every job from job 1's. Where the job's run directory is
    ``<sweep dir>/<job number>`` (``conf/hydra/default.yaml``'s subdir), it names each job's own instead, through
    Hydra's resolver, quoted for the shell: ``'trainer.resume=<sweep dir>/${hydra:job.num}/last.pt'``."""
    if run_dir.name != str(number):
        return refusal
    own = re.compile(rf"trainer\.resume={re.escape(str(run_dir))}/(\S+)")
    return own.sub(lambda found: f"'trainer.resume={run_dir.parent}/${{hydra:job.num}}/{found.group(1)}'", refusal)


def check_launch_as_the_run_will(config: dict, single_run: bool) -> None:
    """:func:`~.config.check_launch` (``trainer.strategy``, expert parallelism) against this process's launch, where
    the run sees the same one: under torchrun (its variables), or a single run started here. A sweep's jobs may get
    theirs from their launcher (a SLURM job's tasks): they check it themselves."""
    torchrun = launched_by_torchrun()
    if torchrun or (single_run and "SUBMITIT_EXECUTOR" not in os.environ):
        check_launch(config, torchrun=torchrun, world_size=int(os.environ["WORLD_SIZE"]) if torchrun else 1)


def job_run_dir(config: DictConfig, number: Optional[int]) -> Optional[Path]:
    """Where job ``number`` will run (``config``: its :func:`job_config`): ``hydra.sweep.dir``/``hydra.sweep.subdir``,
    ``hydra.job.num`` set as every launcher sets it; None where the path names what only the launcher knows
    (``hydra.job.id``: submitit's is the SLURM job's). A single run's (``number`` None): ``hydra.run.dir``."""
    if number is None:
        run_dir = OmegaConf.select(config, "hydra.run.dir", throw_on_resolution_failure=False)
        return Path(str(run_dir)).absolute() if run_dir is not None else None
    sweep_dir, subdir = (OmegaConf.select(config, key, throw_on_resolution_failure=False)
                         for key in ("hydra.sweep.dir", "hydra.sweep.subdir"))
    if sweep_dir is None or subdir is None:
        return None
    return Path(str(sweep_dir), str(subdir)).absolute()  # as Hydra gives the job its output dir, and its messages


def job_config(composed: DictConfig, number: Optional[int]) -> DictConfig:
    """A sweep job's composed config as it runs: a copy, its ``hydra.job.num`` set as every launcher sets it; a
    single run's (``number`` None) is the composed one."""
    if number is None:
        return composed
    config = copy.deepcopy(composed)
    OmegaConf.set_readonly(config, False)
    with open_dict(config):
        config.hydra.job.num = number
    return config


@contextlib.contextmanager
def hydra_config_set_to(config: DictConfig) -> Iterator[None]:
    """Hydra's ``hydra:`` resolver (``trainer.resume=<sweep dir>/${hydra:job.num}/last.pt``) reads a singleton that
    Hydra sets only once a job runs, so the checks, which run before, refused every such config ("HydraConfig was
    not set"): set it to the job's ``config`` (:func:`job_config`) for the checks, and put back what was there."""
    instance = HydraConfig.instance()
    previous = instance.cfg
    instance.set_config(config)
    try:
        yield
    finally:
        instance.cfg = previous
