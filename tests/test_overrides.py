"""Overrides Hydra cannot compose are refused in one line naming the closest valid key or option, exit status 2;
``HYDRA_FULL_ERROR=1`` still shows Hydra's own message."""

import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT
from processes import refused_here, run_forked
from softmoe import evaluate, train
from softmoe.harness.output_dirs import output_dir, output_dir_error
from softmoe.harness.overrides import compose_config, composition_error, is_global_group, multirun_flag_first
from softmoe.harness.plausibility import CONF_DIR

MISTAKES = [
    (["trainer.max_step=10"], "trainer.max_step=10: not a key of the config; did you mean trainer.max_steps?"),
    (["model=vit_mega"], "model=vit_mega: not an option of model; did you mean model=vit_small? (options: vit_base, "
                         "vit_huge, vit_large, vit_micro, vit_small, vit_tiny)"),
    (["model=[vit_micro,vit_small]"], "model=[vit_micro,vit_small]: takes one of its options, not a list (options: "
                                      "vit_base, vit_huge, vit_large, vit_micro, vit_small, vit_tiny); to run each, "
                                      "sweep them: -m model=vit_micro,vit_small"),  # was: model=['vit_micro', ...]
    (["trainer=null"], "trainer=null: a config group takes one of its options (default, gpu); leave trainer out for "
                       "the config's own default"),  # Hydra: "Config group override must be a string or a list"
    (["-m", "moe.num_experts=4,8", "trainer.max_stepz=2"],  # a sweep: its first job is composed
     "trainer.max_stepz=2: not a key of the config; did you mean trainer.max_steps?"),
    (["-m", "optimizer=adamw,adam"], "optimizer=adam: not an option of optimizer; did you mean optimizer=adamw? "
                                     "(options: adamw, adamw_bf16, sgd)"),
    (["model=vit_small", "model.patch=4"], "model.patch=4: not a key of the config; did you mean model.patch_size?"),
    (["trainer.patience=3"], "trainer.patience=3: not a key of trainer=default; its keys are max_epochs, max_steps, "
                             "batch_size, eval_batch_size, eval_batches, label_smoothing, loss, grad_clip_norm, "
                             "precision, compile, device, num_threads, num_workers, data_on_device, "
                             "cuda_memory_fraction, log_every, checkpoint_every, progress_bar, resume, strategy, "
                             "expert_parallel_size, nonfinite, max_nonfinite_skips, max_tokens_per_image, "
                             # was: "(to add a key: +trainer.patience=3)"
                             "reshard_after_forward, activation_checkpointing, init_device"),
    (["moe.num_experts=4,8"], "moe.num_experts=4,8: several values; add -m to sweep over them (one job each), or "
                              "write moe.num_experts=[4,8] for a list"),  # Hydra: 5 lines, exit status 1
    (["optimizer.lr=interval(0.1,1)"], "optimizer.lr=interval(0.1,1): a sweep; add -m to run it"),
    (["~moe.layers"], "~moe.layers: moe.layers is null already, and Hydra deletes only a key that holds a value; "
                      "leave ~moe.layers out, or give moe.layers a value with moe.layers=..."),  # Hydra: "not exist"
    (["logger=none", "+logger.mode=bogus"], "+logger.mode=bogus: logger=none writes metrics.jsonl only and ignores "
                                            "logger.mode; choose logger=wandb to use it, or leave it out"),
    (["experts_slots=16x1", "moe.slots_per_expert=2"],  # was: 16 x 2 trained, named experts_slots=16x1
     "experts_slots=16x1 moe.slots_per_expert=2: experts_slots=16x1 sets moe.slots_per_expert=1 and names the run "
     "after it; drop one of the two, e.g. experts_slots=16x2 alone"),
    (["-m", "experts_slots=16x2,8x2", "moe.num_experts=16"],
     "experts_slots=8x2 moe.num_experts=16: experts_slots=8x2 sets moe.num_experts=8 and names the run after it; "
     "drop one of the two, e.g. experts_slots=16x2 alone"),
    (["experts_slots=16x1", "moe.slots_per_expert=3"],  # no option is 16x3
     "experts_slots=16x1 moe.slots_per_expert=3: experts_slots=16x1 sets moe.slots_per_expert=1 and names the run "
     "after it; drop one of the two, e.g. moe.num_experts=16 moe.slots_per_expert=3 without experts_slots"),
    (["hydra.mode=multirun"], "hydra.mode=multirun: must be one of RUN, MULTIRUN"),  # was: "Error merging override"
    (["hydra.job.chdir=maybe"], "hydra.job.chdir=maybe: Value 'maybe' is not a valid bool (type str)"),
    (["-m", "logger=wandb,none", "logger.project=x"], "logger.project=x: logger=none writes metrics.jsonl only and "
                                                      "ignores logger.project; choose logger=wandb to use it, or "
                                                      "leave it out"),  # the sweep's second job
]


@pytest.mark.parametrize("argv,message", MISTAKES, ids=[" ".join(a) for a, _ in MISTAKES])
def test_a_mistyped_key_or_option_is_one_line_with_the_closest_valid_one(argv, message):
    assert composition_error(argv, "train") == message


DIGITS = "name, img_size, in_chans, num_classes, test_size, val_size, split_seed, augment"
GROUP_KEYS = [  # were: "not a key of the config (to add a key: +data.root=/tmp/x)"; only the + spelling got this
    (["data.root=/tmp/x"], f"data.root=/tmp/x: not a key of data=digits; its keys are {DIGITS}"),
    (["data.download=true"], f"data.download=true: not a key of data=digits; its keys are {DIGITS}"),
    (["~data.root"], f"~data.root: not a key of data=digits; its keys are {DIGITS}"),
    (["logger=none", "logger.mode=offline"], "logger.mode=offline: logger=none writes metrics.jsonl only and ignores "
                                             "logger.mode; choose logger=wandb to use it, or leave it out"),
    (["launcher.n_jobs=2"], "launcher.n_jobs=2: not a key of launcher=basic; its keys are name"),
    (["-m", "data=digits,synthetic", "data.root=/x"], f"data.root=/x: not a key of data=digits; its keys are {DIGITS}"),
    # where an added key is read (timm's arguments, the optimizer's), the + spelling is still the way
    (["model.reg_tokens=4"], "model.reg_tokens=4: not a key of model=vit_micro; its keys are name, img_size, "
                             "in_chans, num_classes, patch_size, embed_dim, depth, num_heads, mlp_ratio, class_token, "
                             "global_pool, qk_norm, drop_path_rate, upcycle_from, upcycle_noise_std (to add a key: "
                             "+model.reg_tokens=4)"),
    (["optimizer.amsgrad=true"], "optimizer.amsgrad=true: not a key of optimizer=adamw; its keys are lr, betas, eps, "
                                 "weight_decay, head_weight_decay, fused (to add a key: +optimizer.amsgrad=true)"),
    # ... but not for an argument the optimizer lacks (was: "to add a key: +optimizer.momentum=0.9", then refused)
    (["optimizer.momentum=0.9"], "optimizer.momentum=0.9: not a key of optimizer=adamw; its keys are lr, betas, eps, "
                                 "weight_decay, head_weight_decay, fused; nor is momentum an argument of "
                                 "torch.optim.AdamW"),
    (["optimizer=sgd", "optimizer.betas=[0.9,0.99]"], "optimizer.betas=[0.9,0.99]: not a key of optimizer=sgd; its "
                                                      "keys are lr, momentum, nesterov, weight_decay, "
                                                      "head_weight_decay, fused; nor is betas an argument of "
                                                      "torch.optim.SGD"),
]


@pytest.mark.parametrize("argv,message", GROUP_KEYS, ids=[" ".join(a) for a, _ in GROUP_KEYS])
def test_a_key_the_chosen_group_option_lacks_is_named_with_that_options_keys(argv, message):
    assert composition_error(argv, "train") == message


TRAINS_KEYS = ("seed, model, moe, data, optimizer, scheduler, trainer, logger, launcher, paths; its groups: data, "
               "debug, experiment, experts_slots, hparams_search, launcher, logger, model, moe, optimizer, paths, "
               "routing, scheduler, trainer")
UNREAD = "not a key of the config, and nothing reads one added there"
ADDED = [  # were: composed, and ignored without a word (config.yaml: "seed: 0" beside "sed: 3")
    (["+sed=3"], f"+sed=3: {UNREAD}; did you mean seed?"),
    (["++sed=3"], f"++sed=3: {UNREAD}; did you mean seed?"),
    (["+max_steps=3"], f"+max_steps=3: {UNREAD}; did you mean trainer.max_steps?"),
    (["+foo=1"], f"+foo=1: {UNREAD}; train's keys: {TRAINS_KEYS}"),
    (["+foo.bar=1"], f"+foo.bar=1: {UNREAD}; train's keys: {TRAINS_KEYS}"),
    (["-m", "seed=0,1", "+sed=3"], f"+sed=3: {UNREAD}; did you mean seed?"),
    # were: "not a key of the config (to add a key: +foo=1)", the spelling that was then ignored
    (["foo=1"], f"foo=1: not a key of the config; train's keys: {TRAINS_KEYS}"),
    (["max_steps=3"], "max_steps=3: not a key of the config; did you mean trainer.max_steps?"),
]


@pytest.mark.parametrize("argv,message", ADDED, ids=[" ".join(a) for a, _ in ADDED])
def test_a_top_level_key_nothing_reads_is_refused_with_no_hint_to_add_it(argv, message):
    assert composition_error(argv, "train") == message


def test_the_train_command_refuses_an_added_key_nothing_reads_before_hydra_starts(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, "+sed=3", "logger=none") == 2
    assert capsys.readouterr().err == f"error: +sed=3: {UNREAD}; did you mean seed?\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["+model.reg_tokens=2"], ["+optimizer.amsgrad=true"], ["+hydra.job.name=x"],
                                  ["++hydra.run.dir=older"], ["++trainer.resume=/z/last.pt"], ["++seed=3"]])
def test_an_added_key_a_section_reads_still_composes(argv):
    assert composition_error(argv, "train") is None  # the run's config check judges it (timm's arguments, ...)


@pytest.mark.parametrize("argv", [[], ["-m", "moe.num_experts=4,8"], ["model=vit_small", "+trainer.x=1"],
                                  ["--cfg", "job"], ["hydra.run.dir=x", "experiment=digits_dense"],
                                  ["experiment=table2_routing", "seed=0,1"],  # a config in MULTIRUN mode: no -m
                                  ["experiment=appc_slots_per_expert", "logger=none"],  # its logger.tags: not typed
                                  ["logger=none", "logger.backend=none"], ["logger.mode=offline"],
                                  ["experts_slots=16x1", "moe.slots_per_expert=1"],  # the option's own value
                                  ["moe.slots_per_expert=3"]])
def test_what_composes_passes(argv):
    assert composition_error(argv, "train") is None


def test_a_syntax_error_is_one_line():
    problem = composition_error(["moe.num_experts=["], "train")
    assert "moe.num_experts=[" in problem and "\n" not in problem


BARE = "not key=value (each argument sets a key, or picks a config group's option)"


def test_an_argument_without_its_key_is_named_with_what_it_likely_meant(tmp_path):
    """was: Hydra's grammar, e.g. "missing EQUAL at '<EOF>'" or "extraneous input '/' expecting {EQUAL, ...}"."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "best.pt").write_bytes(b"")
    meant = {
        ("train", "vit_small"): "model=vit_small",
        ("train", "soft"): "routing=soft",
        ("train", str(run_dir)): f"hydra.run.dir={run_dir} (to continue the run there)",
        ("train", str(run_dir / "best.pt")): f"trainer.resume={run_dir / 'best.pt'} (to start a new run from it)",
        ("evaluate", str(run_dir)): f"run_dir={run_dir}",
        ("evaluate", str(run_dir / "best.pt")): f"run_dir={run_dir} checkpoint=best",
        ("plan", "vit_base"): "model=vit_base",
    }
    for (command, argument), guess in meant.items():
        assert composition_error([argument], command) == f"{argument}: {BARE}; did you mean {guess}?"
    assert composition_error(["-m", "moe.num_experts=4,8", "vit_tiny"], "train") == (
        f"vit_tiny: {BARE}; did you mean model=vit_tiny?")
    for command in ("train", "evaluate"):  # nothing it could have meant: no guess
        assert composition_error(["bogus"], command) == f"bogus: {BARE}"


def test_an_experiment_kept_in_a_hydra_searchpath_folder_is_an_option(user_config):
    """was: "experiment=mine: not an option of experiment" for a file Hydra itself finds and composes."""
    searchpath = user_config("experiment/mine", "# @package _global_\nseed: 3\n")
    assert composition_error([searchpath, "experiment=mine"], "train") is None
    assert composition_error([searchpath, "experiment=mien"], "train").startswith(
        "experiment=mien: not an option of experiment; did you mean experiment=mine? (options: appc_slots_per_expert, "
    )
    assert composition_error(["experiment=mine"], "train").startswith(  # without the search path: not found
        "experiment=mine: not an option of experiment (options: appc_slots_per_expert, ")


def test_a_value_hydras_schema_refuses_in_an_experiment_file_is_named_with_its_key_and_file(user_config):
    """was: "In 'experiment/bad_mode': ValidationError raised while composing config: (HYDRA_FULL_ERROR=1 ...)"."""
    searchpath = user_config("experiment/bad_mode", "# @package _global_\nhydra:\n  mode: multirun\n")
    assert composition_error([searchpath, "experiment=bad_mode"], "train") == (
        "hydra.mode=multirun: must be one of RUN, MULTIRUN (in experiment/bad_mode.yaml)"
    )


MINE = "moe:\n  layers: [3]\nhydra:\n  mode: MULTIRUN\n  sweeper:\n    params:\n      seed: 0,1\n"


def test_an_experiment_file_without_its_global_header_is_refused_for_a_run_and_a_sweep(user_config):
    """was: its keys composed under experiment.*, and the defaults ran (its sweep too) without a word."""
    searchpath = user_config("experiment/mine", MINE)
    path = searchpath.removeprefix("hydra.searchpath=[file://").removesuffix("]") + "/experiment/mine.yaml"
    message = (f"experiment=mine: {path}'s keys landed under experiment.* (experiment.moe, experiment.hydra); its "
               "first line must be '# @package _global_', as in every file of conf/experiment/")
    assert composition_error([searchpath, "experiment=mine"], "train") == message
    assert composition_error(["-m", searchpath, "experiment=digits_dense,mine"], "train") == message
    user_config("experiment/mine", f"# Mine.\n# @package _global_\n{MINE}")  # Hydra reads no header after a comment
    assert composition_error([searchpath, "experiment=mine"], "train") == message
    user_config("experiment/mine", f"# @package _global_\n{MINE}")
    assert composition_error([searchpath, "experiment=mine"], "train") is None


def test_every_group_of_global_files_is_held_to_its_header(tmp_path):
    conf_dir = tmp_path / "conf"
    shutil.copytree(CONF_DIR, conf_dir)
    (conf_dir / "experiment" / "mine.yaml").write_text(MINE)
    assert composition_error(["experiment=mine"], "train", conf_dir) == (
        "experiment=mine: conf/experiment/mine.yaml's keys landed under experiment.* (experiment.moe, "
        "experiment.hydra); its first line must be '# @package _global_', as in every file of conf/experiment/"
    )
    (conf_dir / "launcher" / "mine.yaml").write_text("# @package hydra\nlauncher:\n  n_jobs: 2\n")
    assert composition_error(["-m", "launcher=mine"], "train", conf_dir) == (
        "launcher=mine: conf/launcher/mine.yaml's keys landed under hydra.* (hydra.launcher); its first line must "
        "be '# @package _global_', as in every file of conf/launcher/"
    )
    groups = [group.name for group in CONF_DIR.iterdir() if is_global_group(group.name, CONF_DIR, "")]
    assert sorted(groups) == ["debug", "experiment", "hparams_search", "launcher"]


def test_the_command_refuses_an_experiment_file_without_its_global_header_before_hydra_starts(
    tmp_path, user_config, monkeypatch, capsys
):
    searchpath = user_config("experiment/mine", MINE)
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, "-m", searchpath, "experiment=mine") == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: experiment=mine: ") and len(stderr.strip().splitlines()) == 1
    assert sorted(path.name for path in tmp_path.iterdir()) == ["user_conf"]  # no sweep directory


def test_evaluate_names_its_own_keys():
    assert composition_error(["run_dir=x", "checkpont=last"], "evaluate") == (
        "checkpont=last: not a key of the config; did you mean checkpoint?"
    )
    keys = "run_dir, checkpoint, device, batch_size, images, data_dir, data_root, save_routing, routing_examples"
    assert composition_error(["run_dir=x", "foo=1"], "evaluate") == (  # was: "(to add a key: +foo=1)"
        f"foo=1: not a key of the config; evaluate's keys: {keys}")
    assert composition_error(["run_dir=x", "trainer.eval_batch_size=8"], "evaluate") == (  # was: its + spelling
        "trainer.eval_batch_size=8: not a key of the config; did you mean batch_size?")
    assert composition_error(["run_dir=x", "+foo=1"], "evaluate") == f"+foo=1: {UNREAD}; evaluate's keys: {keys}"
    # train's key for the data's folder: evaluate's own, not Hydra's hydra.hydra_logging.root (its key of that name)
    assert composition_error(["run_dir=x", "data.root=/data"], "evaluate") == (
        "data.root=/data: not a key of the config; did you mean data_root?")


def test_evaluate_refuses_an_added_key_instead_of_evaluating_best_pt(tmp_path, monkeypatch, capsys):
    """was: ``+checkpont=last`` ignored, and best.pt evaluated and reported."""
    (tmp_path / "last.pt").write_bytes(b"")
    (tmp_path / "best.pt").write_bytes(b"")
    assert refused_here(monkeypatch, evaluate, f"run_dir={tmp_path}", "+checkpont=last") == 2
    assert capsys.readouterr().err == f"error: +checkpont=last: {UNREAD}; did you mean checkpoint?\n"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["best.pt", "last.pt"]


@pytest.mark.slow
def test_the_command_exits_2_with_one_line_and_hydra_full_error_keeps_hydras_message(tmp_path):
    command = [sys.executable, "-m", "softmoe.train", "trainer.max_step=10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    expected = "error: trainer.max_step=10: not a key of the config; did you mean trainer.max_steps?"
    assert result.stderr.strip() == expected
    assert not (tmp_path / "outputs").exists()
    full = subprocess.run(command, cwd=tmp_path, env={**env, "HYDRA_FULL_ERROR": "1"}, capture_output=True, text=True,
                          timeout=120)
    assert full.returncode == 1 and "Could not override 'trainer.max_step'" in full.stderr
    assert "Traceback" in full.stderr


def test_a_run_directory_hydra_cannot_make_is_one_line_naming_the_key(tmp_path):
    # was: Hydra's FileExistsError / FileNotFoundError traceback, exit status 1
    afile = tmp_path / "afile"
    afile.write_text("")
    end = "; it must name a directory, or where one can be made"

    def output_dir_error_of(argv):  # as the train command checks it: the directory its command line names
        return output_dir_error(output_dir(argv, "train"), argv)

    assert output_dir_error_of([f"hydra.run.dir={afile}"]) == f"hydra.run.dir={afile}: {afile} is a file{end}"
    # the key the user typed is named where another key made the directory (was: hydra.run.dir alone)
    made = output_dir_error_of([f"paths.output_dir={afile}"])
    assert made.startswith(f"hydra.run.dir={afile}/runs/") and made.endswith(f"{end} (from paths.output_dir={afile})")
    assert output_dir_error_of([f"paths.output_dir={tmp_path}", f"hydra.run.dir={afile}"]) == (
        f"hydra.run.dir={afile}: {afile} is a file{end}")  # the key itself given: named as it is
    assert output_dir_error_of([f"hydra.run.dir={afile / 'run'}"]) == (
        f"hydra.run.dir={afile / 'run'}: {afile}, on its path, is a file{end}")
    assert output_dir_error_of(["-m", "seed=0,1", f"hydra.sweep.dir={afile}"]) == (
        f"hydra.sweep.dir={afile}: {afile} is a file{end}")
    if os.path.isdir("/proc/self"):
        assert output_dir_error_of(["hydra.run.dir=/proc/x/y"]) == (
            f"hydra.run.dir=/proc/x/y: no folder can be made in /proc (No such file or directory){end}")
        # an existing run directory that takes no files (a rerun's on a read-only disk): was Hydra's traceback on
        # train.log ("Unable to configure handler 'file'")
        assert output_dir_error_of(["hydra.run.dir=/proc/self"]) == (
            "hydra.run.dir=/proc/self: takes no new files (No such file or directory), and a run writes its train.log, "
            "checkpoints and metrics there; copy it to a folder that takes them and name that, or another "
            "hydra.run.dir")
    for argv in ([f"hydra.run.dir={tmp_path}"], [f"hydra.run.dir={tmp_path / 'new' / 'run'}"], []):
        assert output_dir_error_of(argv) is None
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]  # looked for, nothing made or left


def test_the_command_refuses_a_file_as_its_run_directory_in_one_line(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("")
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, "debug=default", f"hydra.run.dir={afile}") == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and stderr.startswith(f"error: hydra.run.dir={afile}: {afile} is a file")


EMPTY = {  # was: the run's files (.hydra/, .lock, checkpoints) or a sweep's job folders in the current directory
    "hydra.run.dir": "hydra.run.dir=: empty (an unset shell variable?), which would put the run's files in the current "
                     "directory; it must name a directory, or where one can be made",
    "hydra.sweep.dir": "hydra.sweep.dir=: empty (an unset shell variable?), which would put the sweep's job folders in "
                       "the current directory; it must name a directory, or where one can be made",
    # was: every job's files in the sweep directory, one over another (only the lock kept jobs apart)
    "hydra.sweep.subdir": "hydra.sweep.subdir=: empty, which would put every job's files in the sweep directory "
                          "itself, one job's over another's; it must name a folder per job, as the default "
                          "${hydra.job.num} does",
}


def test_a_group_set_to_null_is_one_line_from_the_command_too(tmp_path, monkeypatch, capsys):
    """Was Hydra's 40-line ValueError traceback: the run directory's check composed the config first."""
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, "model=null") == 2
    assert capsys.readouterr().err == ("error: model=null: a config group takes one of its options (vit_base, "
                                       "vit_huge, vit_large, vit_micro, vit_small, vit_tiny); leave model out for the "
                                       "config's own default\n")


def test_the_current_directory_as_the_run_directory_is_refused_as_an_empty_one_is(tmp_path, monkeypatch, capsys):
    """Was accepted: the run's checkpoints, train.log and .hydra/ went into the checkout."""
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, "debug=default", "hydra.run.dir=.") == 2
    assert capsys.readouterr().err.startswith("error: hydra.run.dir=.: the current directory, which would put the "
                                              "run's files among whatever it holds")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["debug=default", "hydra.run.dir="], ["hydra.run.dir=''"],
                                  ["-m", "seed=0,1", "debug=default", "hydra.sweep.dir="],
                                  ["seed=0,1", "hydra.sweep.dir=", "-m"],  # -m last: before the overrides
                                  ["-m", "seed=0,1", "debug=default", "hydra.sweep.dir=sweep", "hydra.sweep.subdir="]],
                         ids=lambda argv: " ".join(argv))
def test_an_empty_run_or_sweep_directory_is_refused_and_nothing_is_written_here(tmp_path, monkeypatch, capsys, argv):
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, train, *argv) == 2
    key = argv[-1].rstrip("=") if argv[-1].endswith("subdir=") else "hydra.sweep.dir" if "-m" in argv else \
        "hydra.run.dir"
    assert capsys.readouterr().err == f"error: {EMPTY[key]}\n"
    assert list(tmp_path.iterdir()) == []


def test_minus_m_after_the_overrides_goes_before_them_where_hydra_takes_it():
    assert multirun_flag_first(["debug=default", "-m", "seed=0,1"]) == ["-m", "debug=default", "seed=0,1"]
    assert multirun_flag_first(["a=1", "--multirun"]) == ["--multirun", "a=1"]
    assert multirun_flag_first(["a=1", "b=2"]) == ["a=1", "b=2"]


@pytest.mark.slow
def test_a_sweep_runs_with_minus_m_after_an_override(tmp_path):
    # was: Hydra's 8-line usage, "unrecognized arguments: seed=0,1"
    arguments = ["debug=default", "-m", "seed=0,1", f"hydra.sweep.dir={tmp_path}"]  # as the command line parses them
    result = run_forked("softmoe.train", arguments, tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert all((tmp_path / job / "metrics.jsonl").is_file() for job in ("0", "1"))


@pytest.mark.parametrize("argument,placeholder", [
    ("run_dir=outputs/runs/<date>/<time>", "<date>"), ("trainer.resume=<run dir>/last.pt", "<run dir>"),
])
def test_a_placeholder_pasted_from_the_docs_is_named_as_one(argument, placeholder):
    """Was Hydra's grammar speaking: "token recognition error at: '<'"."""
    config_name = "evaluate" if argument.startswith("run_dir") else "train"
    assert composition_error([argument], config_name) == (
        f"{argument}: {placeholder} is a placeholder; put your own value there "
        f"(run directories: ls -d outputs/runs/*/*)")
    assert "token recognition error" in composition_error(["seed=1<"], "train")  # no placeholder: Hydra's words


def test_a_kept_composition_follows_the_config_files_it_read(user_config):
    """The checks keep the configs they compose; one composed again after its files changed (a notebook editing
    its experiment file, a test writing one where an earlier test wrote another) is composed anew, even when the
    new file is the same size and written within the same clock tick as the old."""
    searchpath = user_config("experiment/mine", "# @package _global_\nseed: 1\n")
    overrides = [searchpath, "experiment=mine"]
    assert compose_config("train", overrides, CONF_DIR).seed == 1
    assert compose_config("train", overrides, CONF_DIR) is compose_config("train", overrides, CONF_DIR)  # kept
    user_config("experiment/mine", "# @package _global_\nseed: 2\n")
    assert compose_config("train", overrides, CONF_DIR).seed == 2
    user_config("experiment/other", "# @package _global_\nseed: 3\n")  # a new file of the folder: composed anew
    assert compose_config("train", [searchpath, "experiment=other"], CONF_DIR).seed == 3
