"""A sweep with a bad value in any job is refused before its first job starts: one line naming the job and its
swept values, exit status 2, no sweep directory. A rerun that its jobs refuse leaves the sweep directory as it was."""

import hashlib
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys

import pytest

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import ROOT
from processes import run_forked
from processes import refused_here
from softmoe import train
from softmoe.harness import runs
from softmoe.harness.checkpoint import FORMAT_VERSION, save_checkpoint
from softmoe.harness.distributed import TORCHRUN_VARIABLES
from softmoe.harness.overrides import compose_config
from softmoe.harness.plausibility import CONF_DIR
from softmoe.harness.rules import plain
from softmoe.harness.runs import RunDirLock
from softmoe.harness.sharded_checkpoint import TRAIN_STATE
from softmoe.harness.sweep_check import (duplicate_runs_warning, single_run_error, sweep_job_error, sweep_jobs,
                                         sweep_warning)


def test_jobs_come_in_the_basic_sweepers_order_and_interval_sweeps_are_left_to_their_sweeper():
    assert list(sweep_jobs(["a=1", "b=x,y", "c=1,2", "d=interval(0,1)"])) == [
        ["a=1", "b=x", "c=1"], ["a=1", "b=x", "c=2"], ["a=1", "b=y", "c=1"], ["a=1", "b=y", "c=2"],
    ]


@pytest.mark.parametrize("overrides", [
    ["a=1", "b=x,y", "c=1,2"],
    # a key given twice: the last value, at the first one's place (was: both kept, 4 jobs of moe.layers=[3] checked
    # where Hydra runs 2 of moe.layers=[2,3]; conf/experiment/table4_placement.yaml's sweep, then its README's loop)
    ["moe.layers=[3],[11]", "seed=0,1", "moe.layers=[2,3]"],
    ["seed=0", "model=vit_micro", "seed=1,2", "+trainer.x=1"],
])
def test_jobs_are_the_basic_sweepers_own(overrides):
    parsed = OverridesParser.create().parse_overrides(overrides)
    assert list(sweep_jobs(overrides)) == BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


def test_a_bad_value_in_a_later_job_is_named_with_the_job():
    assert sweep_job_error(["-m", "moe.num_experts=4,0", "seed=0,1"], "train") == (
        "job 2 (moe.num_experts=0 seed=0): moe.num_experts=0: must be a positive integer; no job was started"
    )


def test_an_experiments_own_sweep_is_checked_without_minus_m():
    """conf/experiment/table2_routing.yaml sweeps routing x seed in hydra.sweeper.params, in MULTIRUN mode."""
    problem = sweep_job_error(["experiment=table2_routing", "trainer.max_epochs=0"], "train")
    assert problem == ("job 0 (routing=soft seed=0): trainer.max_epochs=0: must be a positive integer; "
                       "no job was started")


EXPERIMENT_SWEEP = "hydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      seed: 0,1\n"


def test_a_mistyped_key_in_an_experiment_file_gets_the_did_you_mean_the_command_line_gets(user_config):
    """was: "trainer.max_step=40: not a key of the trainer group", where trainer.max_step=40 typed on the command
    line gets "did you mean trainer.max_steps?"."""
    searchpath = user_config("experiment/mine", f"# @package _global_\ntrainer:\n  max_step: 40\n{EXPERIMENT_SWEEP}")
    assert sweep_job_error([searchpath, "experiment=mine"], "train") == (
        "job 0 (seed=0): trainer.max_step=40: not a key of the trainer group; did you mean trainer.max_steps?; "
        "no job was started"
    )


def test_an_option_an_experiment_file_sweeps_that_no_file_holds_is_named_with_the_options(user_config):
    """was: "In 'train': Could not find 'experts_slots/3x5' (HYDRA_FULL_ERROR=1 shows Hydra's message)"."""
    sweep = EXPERIMENT_SWEEP.replace("seed: 0,1", "experts_slots: 16x1,4x4,3x5")
    searchpath = user_config("experiment/mine", f"# @package _global_\n{sweep}")
    assert sweep_job_error([searchpath, "experiment=mine"], "train") == (
        "hydra.sweeper.params: experts_slots=3x5: not an option of experts_slots (options: 128x1, 16x1, 16x2, 16x8, "
        "2x8, 32x1, 32x4, 4x4, 4x8, 64x1, 64x2, 8x1, 8x16, 8x2, 8x4)"
    )
    one_job = EXPERIMENT_SWEEP.replace("seed: 0,1", "experts_slots: 3x5")  # one job: checked all the same
    searchpath = user_config("experiment/one", f"# @package _global_\n{one_job}")
    assert sweep_job_error([searchpath, "experiment=one"], "train").startswith(
        "hydra.sweeper.params: experts_slots=3x5: not an option of experts_slots (options: 128x1, ")


def test_an_option_an_experiment_file_sweeps_from_the_users_own_config_folder_is_found_there(user_config):
    """The command line's hydra.searchpath holds options the experiment sweeps: they are no missing option."""
    user_config("experts_slots/3x5", "# @package moe\nnum_experts: 3\nslots_per_expert: 5\n")
    sweep = EXPERIMENT_SWEEP.replace("seed: 0,1", "experts_slots: 16x1,3x5")
    searchpath = user_config("experiment/mine", f"# @package _global_\n{sweep}")
    assert sweep_job_error([searchpath, "experiment=mine"], "train") is None


def test_a_key_that_changes_what_an_experiments_swept_option_sets_is_refused_naming_both():
    """conf/experiment/fig6_experts_slots.yaml sweeps experts_slots in hydra.sweeper.params."""
    assert sweep_job_error(["experiment=fig6_experts_slots", "moe.slots_per_expert=2"], "train") == (
        "experts_slots=16x1 moe.slots_per_expert=2: experts_slots=16x1 sets moe.slots_per_expert=1 and names the run "
        "after it; drop one of the two, e.g. experts_slots=16x2 alone"
    )


def test_a_joblib_sweep_with_more_threads_than_cores_gets_one_warning_from_the_parent(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    warning = "launcher.n_jobs=2 x trainer.num_threads=2 = 4 threads at once on 2 cores: the jobs take turns"
    assert sweep_warning(["-m", "launcher=joblib", "trainer.num_threads=2", "seed=0,1"], "train").startswith(warning)
    assert sweep_warning(["-m", "launcher=joblib", "launcher.n_jobs=8", "seed=0,1,2"], "train").startswith(
        "launcher.n_jobs=8 (3 at once) x trainer.num_threads=1 = 3 threads at once on 2 cores: the jobs take turns")
    assert sweep_warning(["experiment=fig6_experts_slots", "launcher=joblib"], "train") is None  # 2 x 1 on 2 cores
    assert sweep_warning(["launcher=joblib", "trainer.num_threads=2"], "train") is None  # one run, no sweep
    assert sweep_warning(["launcher=joblib", "trainer.num_threads=3"], "train") is None  # one run: no sweep's to warn
    assert sweep_warning(["-m", "trainer.num_threads=2", "seed=0,1"], "train") is None  # one job at a time
    # printed once by the sweep's parent, which goes on to run the jobs: test_train.py's joblib sweep


def test_a_grid_whose_jobs_differ_only_in_unused_keys_is_warned_once():
    """Was: two identical dense runs trained, and collect listed them apart as if moe.num_experts had mattered."""
    assert duplicate_runs_warning(["-m", "moe=dense,last_half", "moe.num_experts=4,8"], "train") == (
        "jobs 0 (moe=dense moe.num_experts=4) and 1 (moe=dense moe.num_experts=8) train the same run: moe.num_experts "
        "is unused there (moe.placement=none: a dense ViT, no MoE layer); 1 of the sweep's 4 jobs repeats another "
        "job's run")
    # routing=dense places no MoE layer either: named by the key, not as moe=dense, which the user did not choose
    assert duplicate_runs_warning(["-m", "routing=dense", "experts_slots=8x2,16x1"], "train") == (
        "jobs 0 (experts_slots=8x2) and 1 (experts_slots=16x1) train the same run: experts_slots is unused there "
        "(moe.placement=none: a dense ViT, no MoE layer); 1 of the sweep's 2 jobs repeats another job's run")
    assert duplicate_runs_warning(["-m", "moe.k=1,2,3"], "train") == (
        "jobs 0 (moe.k=1) and 1 (moe.k=2) train the same run: moe.k is unused there (moe.router=soft reads none of "
        "the sparse routers' keys); 2 of the sweep's 3 jobs repeat another job's run")
    for distinct in (["-m", "seed=0,1"], ["-m", "moe=dense", "seed=0,1"],
                     ["-m", "moe.router=tokens_choice", "moe.k=1,2"],
                     ["moe.k=1,2"], ["-m", "hparams_search=router_optuna"]):  # a single run; Optuna's drawn jobs
        assert duplicate_runs_warning(distinct, "train") is None, distinct


def test_a_later_jobs_missing_dataset_is_named_before_the_first_job_trains(tmp_path):
    # was: job 0 trained digits to the end, then job 1 stopped on "CIFAR-10 not found"
    problem = sweep_job_error(["-m", "data=digits,cifar10", f"paths.data_dir={tmp_path}"], "train")
    assert problem.startswith(f"job 1 (data=cifar10): data=cifar10: CIFAR-10 not found in {tmp_path / 'cifar10'}")
    assert problem.endswith("or set data.root to the folder that holds cifar-10-batches-py/; no job was started")
    assert list(tmp_path.iterdir()) == []  # looked for, nothing made
    folder = tmp_path / "fashion_mnist"  # the IDX files present (their contents are read when a job builds the data)
    folder.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (folder / name).write_bytes(b"")
    assert sweep_job_error(["-m", "data=digits,fashion_mnist", f"paths.data_dir={tmp_path}"], "train") is None


def test_a_key_one_swept_group_option_lacks_is_named_with_the_job_and_that_options_keys():
    # was: Hydra's 5-line "Could not override 'optimizer.betas'", exit status 1, after writing multirun.yaml
    problem = sweep_job_error(["-m", "optimizer=adamw,sgd", "optimizer.betas=[0.9,0.99]"], "train")
    assert problem == ("job 1 (optimizer=sgd): optimizer.betas=[0.9,0.99]: not a key of optimizer=sgd; its keys are "
                       "lr, momentum, nesterov, weight_decay, head_weight_decay, fused; no job was started")


def test_a_slurm_sweep_on_a_machine_without_slurm_is_refused_before_submitit_is_asked(tmp_path, monkeypatch):
    # was: submitit's 'Could not detect "srun"' traceback, exit status 1, after Hydra wrote multirun.yaml
    argv = ["-m", "launcher=slurm", "seed=0,1"]
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM here, whatever this machine has
    assert sweep_job_error(argv, "train") == (
        "launcher=slurm: sbatch and srun not found on this machine (no SLURM here); run the sweep on a SLURM login "
        "node, or use launcher=submitit_local (or joblib) to run its jobs on this machine"
    )
    for command in ("sbatch", "srun"):  # a login node: SLURM's commands on the PATH
        (tmp_path / command).write_text("#!/bin/sh\n")
        (tmp_path / command).chmod(stat.S_IRWXU)
    assert sweep_job_error(argv, "train") is None


def test_a_grid_up_to_the_limit_is_checked_whole_and_a_larger_one_left_to_its_jobs(monkeypatch):
    from softmoe.harness import sweep_check

    monkeypatch.setattr(sweep_check, "MAX_JOBS_CHECKED", 2)  # the limit, at a size this test can afford
    assert sweep_job_error(["-m", "moe.num_experts=4,0"], "train") == (  # 2 jobs: at the limit, checked
        "job 1 (moe.num_experts=0): moe.num_experts=0: must be a positive integer; no job was started")
    assert sweep_job_error(["-m", "moe.num_experts=0,4,8"], "train") is None  # 3: none checked here, job 0 included


def test_trainer_resume_of_another_model_is_named_before_any_job_starts(tmp_path):
    # trainer.resume's checkpoint, of 4 experts where the sweep builds 16: refused for job 0 before it starts, in a
    # new sweep directory (was: inside the job, once Hydra had made the directory) as in a rerun's
    argv = ["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    other = tmp_path / "other" / "last.pt"
    save_config_checkpoint(other, argv, job=0, **{"moe.num_experts": 4})
    for run_dir_made in (False, True):  # a rerun's: it holds no last.pt of its own (stopped before its first one)
        if run_dir_made:
            (tmp_path / "sweep" / "0").mkdir(parents=True)
        assert sweep_job_error([*argv, f"trainer.resume={other}"], "train") == (
            f"job 0 (seed=0): moe.num_experts=16: trainer.resume's checkpoint {other} was saved with "
            "moe.num_experts=4, another model, whose weights this one cannot take; start from it with "
            "moe.num_experts=4, or set trainer.resume=null to train afresh; no job was started")


def test_a_jobs_hydra_interpolations_resolve_as_the_job_will(tmp_path):
    """``trainer.resume=<old sweep>/${hydra:job.num}/last.pt`` (a sweep trained on, job by job) was refused for
    every job: the check resolved it before Hydra sets what the ``hydra:`` resolver reads. Job 1's resolves to job
    1's checkpoint, here one of another model, named as the job would name it."""
    argv = ["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    for job in (0, 1):
        save_config_checkpoint(tmp_path / "old" / str(job) / "last.pt", argv, job,
                               **({"moe.num_experts": 4} if job == 1 else {}))
    resume = f"trainer.resume={tmp_path / 'old'}/${{hydra:job.num}}/last.pt"
    assert sweep_job_error([*argv, resume], "train").startswith(
        f"job 1 (seed=1): moe.num_experts=16: trainer.resume's checkpoint {tmp_path / 'old' / '1' / 'last.pt'} was "
        "saved with moe.num_experts=4")
    assert not HydraConfig.initialized()  # put back as it was: unset before Hydra runs


@pytest.mark.parametrize("argv", [
    ["-m", "moe.num_experts=4,8", "seed=0,1"],  # every job is valid
    ["experiment=table2_routing"],
    ["moe.num_experts=0"],  # no sweep: the run checks itself before anything loads
    ["--cfg", "job", "moe.num_experts=4,0"],  # Hydra's flags: left to Hydra
    ["-m", "trainer.max_stepz=2,3"],  # a key Hydra cannot compose: overrides.composition_error names it
])
def test_what_the_check_leaves_alone(argv):
    assert sweep_job_error(argv, "train") is None


def test_the_command_starts_no_job_and_makes_no_sweep_directory(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, "-m", "moe.num_experts=4,0", "logger=none") == 2
    assert capsys.readouterr().err == ("error: job 1 (moe.num_experts=0): moe.num_experts=0: must be a positive "
                                       "integer; no job was started\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, line", [
    (["-m", "moe.num_experts=0"], "job 0: moe.num_experts=0: must be a positive integer; no job was started"),
    (["-m", "launcher=joblib", "launcher.n_jobs=0"],  # was joblib's traceback (n_jobs == 0 has no meaning)
     "job 0: launcher.n_jobs=0: must be an integer other than 0 (-1: every core); no job was started"),
])
def test_a_sweep_of_one_job_is_checked_before_hydra_makes_its_directory(tmp_path, monkeypatch, capsys, argv, line):
    """Was: left to the job, after Hydra had made the sweep directory (its multirun.yaml stayed behind)."""
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, *argv, "logger=none") == 2
    assert capsys.readouterr().err == f"error: {line}\n"
    assert list(tmp_path.iterdir()) == []


def save_config_checkpoint(path, argv, job, **changed):
    """A checkpoint at ``path`` (a file, or a sharded checkpoint's folder) holding the config job ``job`` of
    ``argv``'s sweep composes, with ``changed`` ({"optimizer.lr": 0.01}) in place of its values: as a run of that
    other experiment would have saved it. It carries no model: the check must not need one."""
    config = plain(compose_config("train", list(sweep_jobs(argv[1:]))[job], CONF_DIR))  # argv[0]: -m
    for key, value in changed.items():
        section, name = key.split(".")
        config[section][name] = value
    state = {"format": FORMAT_VERSION, "config": json.dumps(config), "step": 2}
    if path.suffix == ".dcp":  # FSDP's: shards beside rank 0's train state; its .metadata marks it complete
        path.mkdir(parents=True)
        (path / ".metadata").write_bytes(b"")
        path = path / TRAIN_STATE
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, state)


def test_a_rerun_of_an_optuna_sweep_is_not_refused_for_the_values_its_sampler_drew(tmp_path):
    """Was: "job 0 (moe.router_weight_decay=0): moe.router_lr_mult=1.0: this run directory's checkpoint ... was saved
    with moe.router_lr_mult=11.387...": the check composed job 0 from the choice() parameter alone, the interval()
    ones at their defaults, though the seeded sampler proposes the trial again and the job resumes it."""
    argv = ["-m", "hparams_search=router_optuna", f"hydra.sweep.dir={tmp_path}"]
    save_config_checkpoint(tmp_path / "0" / "last.pt", argv, job=0, **{"moe.router_lr_mult": 11.387})
    assert sweep_job_error(argv, "train") is None
    grid = ["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]  # a grid's jobs are known: still refused
    assert sweep_job_error(grid, "train").startswith("job 0 (seed=0): moe.router_lr_mult=1.0: this run directory's ")


def test_an_optuna_search_without_a_validation_split_is_refused_before_any_trial_trains(tmp_path):
    """Was: each trial trained to its end, returned no validation accuracy (NaN), and Optuna's refusal of it ended
    the sweep in a traceback."""
    argv = ["-m", "hparams_search=router_optuna", "data.val_size=0", f"hydra.sweep.dir={tmp_path}"]
    assert sweep_job_error(argv, "train") == (
        "data.val_size=0: this sweeper maximises each run's best validation accuracy, and a run without a "
        "validation split has none; hold out training images for it (data.val_size=<count or fraction>)")
    assert sweep_job_error(["-m", "hparams_search=router_optuna", f"hydra.sweep.dir={tmp_path}"], "train") is None
    assert sweep_job_error(["-m", "data.val_size=0", "seed=0,1", f"hydra.sweep.dir={tmp_path}"], "train") is None


@pytest.mark.parametrize("checkpoint", ["last.pt", "last.dcp"])
def test_a_later_jobs_run_directory_holding_another_experiment_is_named_before_any_job_starts(tmp_path, checkpoint):
    # was: job 0 ran to its end, then job 1 refused its run directory
    argv = ["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]
    save_config_checkpoint(tmp_path / "1" / checkpoint, argv, job=1, **{"optimizer.lr": 0.01})
    problem = sweep_job_error(argv, "train")
    assert problem.startswith(f"job 1 (seed=1): optimizer.lr=0.003: this run directory's checkpoint "
                              f"{tmp_path / '1' / checkpoint} was saved with optimizer.lr=0.01, and a run directory "
                              "resumes only the experiment it holds; rerun with optimizer.lr=0.01")
    assert problem.endswith("; no job was started")
    # the same experiment resumes (or reports its finished run): nothing to refuse
    assert sweep_job_error(["-m", "seed=0,1", "optimizer.lr=0.01", f"hydra.sweep.dir={tmp_path}"], "train") is None
    # another model's checkpoint, named as the run names it
    assert sweep_job_error(["-m", "seed=0,1", "optimizer.lr=0.01", "moe.num_experts=4",
                            f"hydra.sweep.dir={tmp_path}"], "train").startswith(
        f"job 1 (seed=1): moe.num_experts=4: this run directory's checkpoint {tmp_path / '1' / checkpoint} was "
        "saved with moe.num_experts=16, and a run directory resumes only the experiment it holds; rerun with "
        "moe.num_experts=16")


def test_a_checkpoint_the_check_cannot_read_is_left_to_the_job(tmp_path):
    """The job falls back to the last.prev.pt beside a damaged last.pt, or says itself why it cannot resume."""
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "last.pt").write_bytes(b"not a checkpoint")
    assert sweep_job_error(["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}"], "train") is None


# the variables torchrun gives rank 0 of 2 processes
RANK_0_OF_2 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "29500"}
assert set(RANK_0_OF_2) == set(TORCHRUN_VARIABLES)


def test_a_run_directory_a_live_process_trains_in_is_named_before_any_job_starts(tmp_path, monkeypatch):
    argv = ["-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]
    (tmp_path / "1").mkdir()
    with RunDirLock(tmp_path / "1"):  # the lock a live run holds
        assert sweep_job_error(argv, "train") == (
            f"job 1 (seed=1): {tmp_path / '1'}: in use by process {os.getpid()} on {socket.gethostname()}; wait for "
            "it to end or stop it, or give this run another hydra.run.dir; no job was started")
        lock_file = (tmp_path / "1" / ".lock").read_bytes()
        with monkeypatch.context() as torchrun:  # a rank of a torchrun sweep: rank 0's jobs may hold it already
            for name, value in RANK_0_OF_2.items():
                torchrun.setenv(name, value)
            assert sweep_job_error(argv, "train") is None
    assert (tmp_path / "1" / ".lock").read_bytes() == lock_file  # looked at, not taken: the holder stays named
    assert sweep_job_error(argv, "train") is None  # its run ended: the directory is free


def test_a_single_run_gets_a_sweep_jobs_checks_before_hydra_makes_its_run_directory(tmp_path, monkeypatch):
    # the run's own error lines (test_configs.py and test_data.py check them as the run prints them), found before
    # Hydra makes a run directory: under torchrun one rank removed it under another's Hydra (test_distributed_training)
    assert single_run_error(["moe.num_experts=0"], "train") == "moe.num_experts=0: must be a positive integer"
    assert single_run_error(["data=cifar10", f"paths.data_dir={tmp_path}"], "train").startswith(
        f"data=cifar10: CIFAR-10 not found in {tmp_path / 'cifar10'}")
    run_dir = tmp_path / "run"
    argv = [f"hydra.run.dir={run_dir}"]
    save_config_checkpoint(run_dir / "last.pt", ["-m", *argv], job=0, **{"optimizer.lr": 0.01})
    assert single_run_error(argv, "train").startswith(
        f"optimizer.lr=0.003: this run directory's checkpoint {run_dir / 'last.pt'} was saved with optimizer.lr=0.01,")
    assert single_run_error([*argv, "optimizer.lr=0.01"], "train") is None  # its own experiment: it resumes
    with RunDirLock(run_dir):
        assert single_run_error([*argv, "optimizer.lr=0.01"], "train").startswith(f"{run_dir}: in use by process ")
    # the launch, as the run will see it (config.check_launch): this process's, or each torchrun rank's own
    assert single_run_error(["trainer.strategy=ddp"], "train").startswith("trainer.strategy=ddp: needs a torchrun ")
    with monkeypatch.context() as torchrun:
        for name, value in RANK_0_OF_2.items():
            torchrun.setenv(name, value)
        assert single_run_error(["moe.num_experts=3", "moe.expert_parallel=true"], "train") == (
            "moe.num_experts=3: expert parallelism needs it divisible by the 2 processes")
    # a sweep's jobs may get their ranks from their launcher (a SLURM job's tasks): each checks its own launch
    assert sweep_job_error(["-m", "trainer.strategy=ddp", "seed=0,1"], "train") is None
    # left to the others: a sweep (sweep_job_error), Hydra's flags, a command line Hydra refuses (composition_error)
    for argv in (["-m", "moe.num_experts=0"], ["experiment=table2_routing", "trainer.max_epochs=0"],
                 ["moe.num_experts=0", "--cfg", "job"], ["moe.num_expert=4"]):
        assert single_run_error(argv, "train") is None, argv


NO_SLURM = pytest.mark.skipif(shutil.which("srun") is not None, reason="SLURM is installed here")


@pytest.mark.parametrize("overrides, error", [
    (["debug=default", "optimizer=adamw,sgd", "optimizer.betas=[0.9,0.99]"],
     "error: job 1 (optimizer=sgd): optimizer.betas=[0.9,0.99]: not a key of "),  # was: Hydra's 5 lines, exit 1
    pytest.param(["launcher=slurm", "debug=default", "seed=0,1"], "error: launcher=slurm: ", marks=NO_SLURM),
])
def test_a_sweep_that_cannot_launch_stops_in_one_line_before_hydra_writes(tmp_path, overrides, error, monkeypatch,
                                                                          capsys):
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, "-m", *overrides, f"hydra.sweep.dir={tmp_path / 'sweep'}") == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith(error)
    assert list(tmp_path.iterdir()) == []  # no multirun.yaml, no sweep directory


def sweep_fingerprint(sweep_dir):
    """{file: sha256} of a sweep directory's record (``multirun.yaml``) and its runs, ``.hydra/`` configs included;
    not the log a refused job appends to and the lock it took (which names the last process to hold it), nor the
    launchers' and the console's own folders."""
    return {
        str(path.relative_to(sweep_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(sweep_dir.rglob("*"))
        if path.is_file() and path.name not in ("train.log", ".lock")
        and path.relative_to(sweep_dir).parts[0] not in (".console_warnings", ".submitit")
    }


@pytest.mark.slow
def test_a_sweep_trains_on_in_a_new_sweep_directory_each_job_from_its_own_checkpoint(tmp_path):
    """docs/training.md's recipe: the same sweep, a longer trainer.max_steps, a new hydra.sweep.dir and
    ``trainer.resume=<old sweep dir>/${hydra:job.num}/last.pt``."""
    tiny = ["data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=32", "data.test_size=8",
            "model.depth=2", "trainer.batch_size=16", "trainer.log_every=1", "logger=none",
            "trainer.progress_bar=false"]

    def sweep(name, steps, *overrides):
        arguments = ["-m", "seed=0,1", *tiny, f"trainer.max_steps={steps}", *overrides,
                     f"hydra.sweep.dir={tmp_path / name}"]
        done = run_forked("softmoe.train", arguments, tmp_path, merged=True)  # the basic launcher: jobs in-process
        assert done.returncode == 0, done.stdout[-3000:]
        return done.stdout.splitlines()

    sweep("first", 2)
    # rerun into its own directory, it says how: each job from its own checkpoint (was: job 0's, for every job)
    assert sweep_job_error(["-m", "seed=0,1", *tiny, "trainer.max_steps=4", f"hydra.sweep.dir={tmp_path / 'first'}"],
                           "train").endswith(
        f"or to train on, start a new run directory from it with 'trainer.resume={tmp_path / 'first'}/"
        "${hydra:job.num}/last.pt' trainer.max_steps=4; no job was started")
    # shorter: no checkpoint can start it, so none is suggested (was the recipe, whose jobs then refused it)
    assert sweep_job_error(["-m", "seed=0,1", *tiny, "trainer.max_steps=1", f"hydra.sweep.dir={tmp_path / 'first'}"],
                           "train").endswith(
        "train a run of trainer.max_steps=1 in a new run directory (a new hydra.run.dir, or hydra.sweep.dir for a "
        "sweep); no job was started")
    # the recipe with a length its checkpoints already reached: refused before any job (was: inside job 0, after the
    # new sweep directory was made)
    resume = f"trainer.resume={tmp_path / 'first'}/${{hydra:job.num}}/last.pt"
    assert sweep_job_error(["-m", "seed=0,1", *tiny, "trainer.max_steps=2", resume,
                            f"hydra.sweep.dir={tmp_path / 'same_length'}"], "train") == (
        f"job 0 (seed=0): trainer.resume={tmp_path / 'first' / '0' / 'last.pt'}: that checkpoint is at step 2, already "
        "this run's 2 steps; raise trainer.max_steps (or trainer.max_epochs) to train on from it; no job was started")
    assert not (tmp_path / "same_length").exists()
    lines = sweep("longer", 4, f"trainer.resume={tmp_path / 'first'}/${{hydra:job.num}}/last.pt")
    for job in (0, 1):
        assert f"[job {job}] resuming from {tmp_path / 'first' / str(job) / 'last.pt'} at step 2 of 4" in lines
        events = runs.read_events(tmp_path / "longer" / str(job))
        assert [event["step"] for event in events if "train/lr" in event] == [3, 4]


@pytest.mark.slow
def test_a_sweep_rerun_its_jobs_would_refuse_starts_none_and_leaves_the_sweep_directory_as_it_was(tmp_path):
    # was: each job refused its run directory (which holds the optimizer.lr=0.003 run) only once it started: after
    # the jobs before it had run, and under launcher=submitit_local in submitit's 25-line traceback, exit status 1
    sweep_dir = tmp_path / "sweep"
    tiny = ["data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=32", "data.test_size=8",
            "model.depth=2", "trainer.batch_size=16", "trainer.max_steps=2", "logger=none",
            "trainer.progress_bar=false"]

    def sweep(*overrides):
        command = [sys.executable, "-m", "softmoe.train", "-m", "seed=0,1", *tiny, *overrides,
                   f"hydra.sweep.dir={sweep_dir}"]
        return subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              capture_output=True, text=True, timeout=300)

    trained = run_forked("softmoe.train", ["-m", "seed=0,1", *tiny, f"hydra.sweep.dir={sweep_dir}"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    for job in ("0", "1"):  # joblib's job ids, for the jobs below that name their run directories after them
        shutil.copytree(sweep_dir / job, sweep_dir / f"train_{job}")
    before = sweep_fingerprint(sweep_dir)
    assert {"multirun.yaml", "0/.hydra/config.yaml", "1/.hydra/overrides.yaml", "1/last.pt"} <= set(before)
    refusal = (
        f"job 0 (seed=0): optimizer.lr=0.01: this run directory's checkpoint {sweep_dir}/0/last.pt was "
        "saved with optimizer.lr=0.003, and a run directory resumes only the experiment it holds; rerun with "
        f"optimizer.lr=0.003, or start a new run directory from it with 'trainer.resume={sweep_dir}/"
        "${hydra:job.num}/last.pt' (a new hydra.run.dir, or hydra.sweep.dir for a sweep); no job was started")
    # the check runs before Hydra and its launcher: here for each launcher, and once as a command (submitit's, the
    # launcher that had ended in a traceback)
    for launcher in ("basic", "joblib", "submitit_local"):
        argv = ["-m", "seed=0,1", *tiny, "optimizer.lr=0.01", f"launcher={launcher}", f"hydra.sweep.dir={sweep_dir}"]
        assert sweep_job_error(argv, "train") == refusal, launcher
    refused = sweep("optimizer.lr=0.01", "launcher=submitit_local")
    assert (refused.returncode, refused.stderr) == (2, f"error: {refusal}\n")
    assert sweep_fingerprint(sweep_dir) == before
    # run directories named after hydra.job.id, which only the launcher knows: each job refuses its own when it
    # starts, and puts back the multirun.yaml Hydra's sweeper rewrote before it; one after another in this process,
    # and in joblib's worker processes (main reaches them pickled)
    for launcher in ("basic", "joblib launcher.n_jobs=1"):  # one joblib worker is enough to show it
        refused = sweep("optimizer.lr=0.01", *f"launcher={launcher}".split(), "hydra.sweep.subdir=${hydra.job.id}")
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert re.search(rf"\[job 0\] error: optimizer.lr=0.01: this run directory's checkpoint "
                         rf"{re.escape(str(sweep_dir))}/(train_)?0/last.pt was saved with optimizer.lr=0.003",
                         refused.stderr)
        assert sweep_fingerprint(sweep_dir) == before
        assert sorted(path.name for path in sweep_dir.iterdir() if path.is_file()) == ["multirun.yaml"]


@pytest.mark.slow
def test_a_submitit_job_that_refuses_itself_is_one_line_on_the_sweeps_console(tmp_path):
    # was: submitit's 25-line UncompletedJobError traceback, the job's line inside it, exit status 1. The refusal
    # only the job can make: the image folder's training split is counted once the job scans it (a run directory
    # named after ${hydra.job.id}, submitit's process id, is another: no test can lay one out in advance)
    from data_fixtures import write_image_tree

    root = write_image_tree(tmp_path / "images", train={"a": 6, "b": 6}, val={"a": 2, "b": 2})
    sweep_dir = tmp_path / "sweep"
    command = [sys.executable, "-m", "softmoe.train", "-m", "seed=0,1", "data=imagefolder", f"data.root={root}",
               "data.num_classes=2", "data.img_size=32", "model.patch_size=8", "model.depth=2",
               "trainer.batch_size=64", "trainer.max_steps=2", "logger=none", "trainer.progress_bar=false",
               "launcher=submitit_local", f"hydra.sweep.dir={sweep_dir}"]
    refused = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
                             capture_output=True, text=True, timeout=300)
    line = ("error: trainer.batch_size=64: larger than the 12 training examples of data=imagefolder (what "
            "data.val_size=0.01 leaves for training); must be at most 12")
    assert (refused.returncode, refused.stderr) == (2, f"[job 0] {line}\n[job 1] {line}\n")
    assert "sweep done" not in refused.stdout
    assert sorted(path.name for path in sweep_dir.iterdir()) == [".submitit", "multirun.yaml"]


def test_the_sweep_prints_the_lines_its_jobs_handed_over_and_exits_with_the_first_ones_status(tmp_path, capsys):
    from omegaconf import OmegaConf

    from softmoe.harness.sweep_console import RefusedJobs, console_is_a_log_file, hand_to_sweep

    launchers = {"hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": True,
                 "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher": True,
                 "hydra._internal.core_plugins.basic_launcher.BasicLauncher": False,
                 "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher": False}
    for target, own_log_file in launchers.items():
        assert console_is_a_log_file(OmegaConf.create({"launcher": {"_target_": target}})) == own_log_file
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    callback = RefusedJobs()
    callback.on_multirun_end(config)  # no job refused: nothing to say
    assert capsys.readouterr().err == ""
    hand_to_sweep(tmp_path, 10, ["[job 10] error: a", "[job 10] resume with: python -m softmoe.train ..."], 3)
    hand_to_sweep(tmp_path, 2, ["[job 2] error: b"], 2)  # in job order, not the order they ended in
    with pytest.raises(SystemExit) as exited:
        callback.on_multirun_end(config)
    assert exited.value.code == 2
    assert capsys.readouterr().err == ("[job 2] error: b\n[job 10] error: a\n"
                                       "[job 10] resume with: python -m softmoe.train ...\n")
    assert list(tmp_path.iterdir()) == []  # the sweep directory keeps only its runs
    hand_to_sweep(tmp_path, 0, ["left by an earlier multirun"], 2)
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    assert capsys.readouterr().err == ""
