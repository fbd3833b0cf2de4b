"""Every option of every config group composes, passes the checks and builds its objects; bad values stop with one line.

The options are read from conf/<group>/*.yaml, so a new file is tested by being added.
"""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import get_class
from omegaconf import OmegaConf

from conftest import CONF_DIR
from processes import run_forked
from softmoe import moe_layers
from softmoe.harness.config import TRAINER_RULES, ConfigError, check_config, check_launch
from softmoe.harness.model import build_model, moe_blocks
from softmoe.harness.optim import build_optimizer, build_scheduler
from softmoe.harness.output_dirs import output_dir
from softmoe.harness.rules import check_known, check_section, plain, positive_int

ROOT = Path(CONF_DIR).parent
GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((Path(CONF_DIR) / group).glob("*.yaml"))]
PAPER_SIZES = {  # our model option -> timm's model of the same size
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
    "vit_huge": "vit_huge_patch14_224",
}
IMAGENET_SHAPE = ["data=imagefolder"]  # 224 px, 3 channels, 1000 classes; checking it reads no files


def test_every_group_has_options():
    assert {"model", "moe", "data", "optimizer", "scheduler", "trainer", "logger", "launcher"} <= set(GROUPS)
    assert {"routing", "experts_slots", "experiment", "hparams_search", "debug"} <= set(GROUPS)
    assert set(PAPER_SIZES) <= {option for group, option in OPTIONS if group == "model"}


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_passes_the_checks_and_builds(compose_run, group, option):
    overrides = [f"{group}={option}"] + (IMAGENET_SHAPE if option in PAPER_SIZES else [])
    if (group, option) == ("data", "imagefolder"):  # 224 px at vit_micro's patch 2: refused (test_plausibility.py)
        overrides.append("model.patch_size=16")
    cfg = compose_run(*overrides)
    if cfg.trainer.device.startswith("cuda") and not torch.cuda.is_available():
        overrides.append("trainer.device=cpu")  # validation refuses cuda on a machine without it
    if cfg.model.upcycle_from is not None:
        overrides.append("model.upcycle_from=null")  # a study's later stage: its source is an earlier stage's output
    cfg = compose_run(*overrides)
    check_config(cfg)
    if group in ("model", "moe", "optimizer", "scheduler", "experiment"):
        with torch.device("meta"):  # paper sizes reach billions of parameters: shapes only
            model = build_model(cfg.model, cfg.moe)
        with torch.device("cpu"):
            tiny = torch.nn.Linear(2, 2)
            scheduler = build_scheduler(cfg.scheduler, build_optimizer(cfg.optimizer, tiny), total_steps=1000)
        assert 0 < scheduler.get_last_lr()[0] <= cfg.optimizer.lr
        assert len(moe_layers(model)) == len(moe_blocks(cfg.moe, cfg.model.depth))


@pytest.mark.parametrize("option", sorted(PAPER_SIZES))
def test_paper_sizes_match_timm_vits(compose_run, option):
    cfg = compose_run(f"model={option}", "moe=dense", *IMAGENET_SHAPE)
    with torch.device("meta"):
        ours = build_model(cfg.model, cfg.moe)
        reference = timm.create_model(PAPER_SIZES[option], num_classes=1000, class_token=False, global_pool="avg")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


def test_soft_moe_s16_with_128_experts_has_the_papers_parameter_count(compose_run):
    # 128 experts in blocks 6-11 of S/16: about 0.9 B parameters (each expert a 384-1536-384 MLP).
    dense = compose_run("model=vit_small", "moe=dense", *IMAGENET_SHAPE)
    moe = compose_run("model=vit_small", "moe.num_experts=128", *IMAGENET_SHAPE)
    with torch.device("meta"):
        counts = [sum(p.numel() for p in build_model(c.model, c.moe).parameters()) for c in (dense, moe)]
    expert = 384 * 1536 + 1536 + 1536 * 384 + 384
    router = 384 * 128 + 1  # Φ [d, n, p] and scale
    assert counts[1] - counts[0] == 6 * (127 * expert + router)
    assert 0.85e9 < counts[1] < 0.95e9


@pytest.mark.parametrize(
    "overrides,blocks",
    [
        (["moe=last_half"], [2, 3]),
        (["moe=every_other"], [1, 3]),
        (["moe=all"], [0, 1, 2, 3]),
        (["moe=dense"], []),
        (["moe.layers=[0,3]"], [0, 3]),
        (["model=vit_small", "moe=last_half", *IMAGENET_SHAPE], [6, 7, 8, 9, 10, 11]),
        (["model=vit_huge", "moe=last_half", *IMAGENET_SHAPE], list(range(16, 32))),
    ],
)
def test_placements_put_moe_in_the_named_blocks(compose_run, overrides, blocks):
    cfg = compose_run(*overrides)
    with torch.device("meta"):
        model = build_model(cfg.model, cfg.moe)
    assert [int(name.split(".")[1]) for name in moe_layers(model)] == blocks


def test_moe_keys_reach_the_layers(compose_run):
    cfg = compose_run("moe.num_experts=4", "moe.slots_per_expert=2", "moe.normalize=false", "moe.dispatch=uniform")
    layer = next(iter(moe_layers(build_model(cfg.model, cfg.moe)).values()))
    assert (layer.num_experts, layer.slots_per_expert, layer.normalize, layer.dispatch_mode) == (4, 2, False, "uniform")


def test_launchers_set_and_build_hydras_launcher(compose_run):
    classes = {
        "basic": "hydra._internal.core_plugins.basic_launcher.BasicLauncher",
        "joblib": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        "slurm": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "submitit_local": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher",
    }
    assert set(classes) == {option for group, option in OPTIONS if group == "launcher"}

    def build(*overrides):  # as Hydra builds its launcher: the class of _target_, given the other keys
        params = OmegaConf.to_container(compose_run(*overrides, hydra_node=True).hydra.launcher, resolve=True)
        return get_class(params.pop("_target_"))(**params)

    for option, target in classes.items():
        launcher = build(f"launcher={option}")
        assert f"{type(launcher).__module__}.{type(launcher).__name__}" == target
    slurm = ["launcher=slurm", "launcher.partition=gpu", "launcher.time_min=600", "launcher.gpus_per_node=4"]
    params = build(*slurm).params
    assert (params["partition"], params["timeout_min"], params["gpus_per_node"]) == ("gpu", 600, 4)
    assert params["max_num_timeout"] > 0  # requeued after a time-out; submitit always requeues on preemption


# Each bad override and the fragments its one-line message must contain: the key, the value, what is allowed.
BAD_OVERRIDES = [
    (["trainer.strategy=sometimes"], ["trainer.strategy=sometimes", "must be one of auto, single, ddp, fsdp"]),
    (["trainer.reshard_after_forward=sometimes"], ["trainer.reshard_after_forward=sometimes", "true or false"]),
    (["trainer.activation_checkpointing=2"], ["trainer.activation_checkpointing=2", "true or false"]),
    (["trainer.init_device=cuda"], ["trainer.init_device=cuda", "must be one of cpu, meta"]),
    (["trainer.expert_parallel_size=0"], ["trainer.expert_parallel_size=0", "must be a positive integer, or null"]),
    (["moe.num_experts=0"], ["moe.num_experts=0", "positive integer"]),
    (["moe.slots_per_expert=-1"], ["moe.slots_per_expert=-1", "positive integer"]),
    (["moe.num_experts=abc"], ["moe.num_experts=abc", "positive integer"]),
    (["moe.layers=[2,9]"], ["moe.layers=[2,9]", "9 is not a block of this model", "model.depth=4", "0..3"]),
    (["moe.layers=[]"], ["moe.layers=[]", "moe=dense"]),
    (["moe.layers=[1,1]"], ["moe.layers=[1,1]", "twice"]),
    (["moe.placement=first"], ["moe.placement=first", "none, last_half, every_other, all"]),
    (["moe.router=top2"], ["moe.router=top2", "soft"]),
    (["moe.dispatch=hard"], ["moe.dispatch=hard", "soft", "uniform", "identity"]),
    (["moe.dispatch=identity", "moe.num_experts=8"], ["moe.num_experts=8", "identity", "16 tokens"]),
    (["routing=identity", "experts_slots=8x4"], ["moe.num_experts=8", "identity", "16 tokens", "8 * 4 = 32"]),
    (["moe.dispatch=identity", "+model.patch_drop_rate=0.5"],  # was: the layer's ValueError at step 1, a traceback
     ["model.patch_drop_rate=0.5", "drops tokens in training", "identity routing"]),
    (["routing=tokens_choice", "moe.k=17"], ["moe.k=17", "at most moe.num_experts=16"]),
    (["moe.k=0"], ["moe.k=0", "positive integer"]),
    (["moe.capacity_factor=0"], ["moe.capacity_factor=0", "number > 0, or null"]),
    (["moe.batch_priority=yes_please"], ["moe.batch_priority=yes_please", "true or false"]),
    (["moe.noise_std=-1"], ["moe.noise_std=-1", "number >= 0"]),
    (["moe.aux_loss_weight=-0.01"], ["moe.aux_loss_weight=-0.01", "number >= 0"]),
    (
        ["routing=experts_choice", "moe.combine=uniform"],
        ["moe.combine=uniform", "moe.router=experts_choice", "moe.combine=soft"],
    ),
    (["moe.normalize=maybe"], ["moe.normalize=maybe", "true or false"]),
    (["trainer.batch_size=5000"], ["trainer.batch_size=5000", "1257 training examples", "at most 1257"]),
    (["trainer.batch_size=0"], ["trainer.batch_size=0", "positive integer"]),
    (["trainer.max_epochs=0"], ["trainer.max_epochs=0", "positive integer"]),
    (["trainer.max_steps=-5"], ["trainer.max_steps=-5", "positive integer, or null"]),
    (["trainer.label_smoothing=1.5"], ["trainer.label_smoothing=1.5", "[0, 1)"]),
    (["trainer.precision=fp8"], ["trainer.precision=fp8", "fp32, bf16, fp16"]),
    (["trainer.device=tpu"], ["trainer.device=tpu", "auto, cpu, cuda"]),
    (["trainer.log_every=0"], ["trainer.log_every=0", "positive integer"]),
    (["trainer.resume=/nonexistent/last.pt"], ["trainer.resume=/nonexistent/last.pt", "no such file or directory"]),
    (["+trainer.epochs=3"], ["trainer.epochs=3", "not a key of the trainer group"]),
    (["model.patch_size=3"], ["model.patch_size=3", "divide", "data.img_size=8"]),
    (["model.num_heads=5"], ["model.num_heads=5", "model.embed_dim=64"]),
    (["model.depth=0"], ["model.depth=0", "positive integer"]),
    (["model.img_size=32"], ["model.img_size=32", "data.img_size=8"]),
    (["+model.wings=2"], ["model.wings=2", "VisionTransformer"]),
    (["+model.act_layer=relu"], ["model.act_layer=relu", "takes a class", "set it in code"]),  # was: "not a key"
    (["optimizer.lr=0"], ["optimizer.lr=0", "number > 0"]),
    (["optimizer.lr=fast"], ["optimizer.lr=fast", "number > 0"]),
    (["optimizer.weight_decay=-1"], ["optimizer.weight_decay=-1", "number >= 0"]),
    (["+optimizer.momentum_typo=0.9"], ["optimizer.momentum_typo=0.9", "torch.optim.AdamW"]),
    (["optimizer=adamw_bf16", "optimizer.state_dtype=fp16"], ["optimizer.state_dtype=fp16", "float32, bfloat16"]),
    (["optimizer=adamw_bf16", "optimizer.write_expert_copies=maybe"],
     ["optimizer.write_expert_copies=maybe", "true or false"]),
    (["scheduler.warmup_steps=-1"], ["scheduler.warmup_steps=-1", "integer >= 0"]),
    (["scheduler=rsqrt", "scheduler.warmup_steps=0"], ["scheduler.timescale=null", "warmup_steps"]),
    (["logger.mode=loud"], ["logger.mode=loud", "auto, online, offline, disabled"]),
    (["seed=-1"], ["seed=-1", "2**32"]),
    (["data.test_size=5"], ["data.test_size=5"]),  # the data group's own check, through check_config
    (["logger.tags=['']"], ["logger.tags=['']: must be a list of non-empty strings"]),  # was shown as [], the default
    # an argument added to the optimizer, checked as its default in the signature is (was: a truthy string trained
    # with AMSGrad on; a torch traceback for capturable), and the partial the trainer calls (was: instantiate's error)
    (["+optimizer.amsgrad=abc"], ["optimizer.amsgrad=abc: must be true or false (torch.optim.AdamW's amsgrad)"]),
    (["+optimizer.capturable=abc"], ["optimizer.capturable=abc: must be true or false"]),
    (["+optimizer.maximize=1"], ["optimizer.maximize=1: must be true or false"]),
    (["optimizer._partial_=false"], ["optimizer._partial_=false: must stay true (the trainer calls torch.optim.AdamW "
                                     "with the model's parameter groups)"]),
    (["scheduler._partial_=abc"], ["scheduler._partial_=abc: must stay true", "the optimizer and the run's steps"]),
]


@pytest.fixture(scope="module")
def default_run(compose_run):
    return compose_run()


def with_overrides(compose_run, base, overrides):
    """``base`` with ``key=value`` overrides merged as YAML values (fast); group choices go through Hydra."""
    if any("." not in override.split("=")[0] for override in overrides):
        return compose_run(*overrides)
    cfg = base.copy()
    OmegaConf.set_struct(cfg, False)
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist([override.lstrip("+") for override in overrides]))


@pytest.mark.parametrize("overrides,fragments", BAD_OVERRIDES, ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_values_stop_with_one_line_naming_key_and_value(compose_run, default_run, overrides, fragments):
    cfg = with_overrides(compose_run, default_run, overrides)
    with pytest.raises(ConfigError) as raised:
        check_config(cfg)
    message = str(raised.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_a_run_directory_given_as_a_checkpoint_names_the_checkpoint_in_it(compose_run, tmp_path):
    # was: "no such checkpoint file", though the directory exists and holds last.pt
    run_dir, empty = tmp_path / "run", tmp_path / "empty"
    run_dir.mkdir()
    empty.mkdir()
    (run_dir / "last.pt").write_bytes(b"")
    (run_dir / "best.pt").write_bytes(b"")  # a run directory holds both: its last.pt is the one to start from
    expected = {
        # was: "...; to continue that run instead, set hydra.run.dir=<run>, or null"
        f"trainer.resume={run_dir}": f"trainer.resume={run_dir}: a run directory, not a checkpoint: to start a new "
        f"run from it, name one of its checkpoints (trainer.resume={run_dir / 'last.pt'}); to continue that run, set "
        f"hydra.run.dir={run_dir} instead",
        f"model.upcycle_from={run_dir}": f"model.upcycle_from={run_dir}: a run directory, not a checkpoint; name one "
        f"of its checkpoints ({run_dir / 'last.pt'}), or null",
        f"trainer.resume={empty}": f"trainer.resume={empty}: a directory holding no checkpoint; name another run's "
        "checkpoint (its last.pt, best.pt or last.dcp) to start from, or null to start afresh",
    }
    for override, message in expected.items():
        with pytest.raises(ConfigError) as raised:
            check_config(compose_run(override))
        assert str(raised.value) == message


@pytest.mark.parametrize(
    "overrides,processes,message",
    [
        (["trainer.strategy=ddp"], None, "trainer.strategy=ddp: needs a torchrun launch"),
        (["trainer.strategy=fsdp"], None, "trainer.strategy=fsdp: needs a torchrun launch"),
        (
            ["trainer.strategy=fsdp", "trainer.precision=fp16"], 2,
            "trainer.precision=fp16: trainer.strategy=fsdp trains in fp32 or bf16 (no GradScaler)",
        ),
        (["moe.expert_parallel=true"], None, "moe.expert_parallel=true: needs a distributed launch"),
        (["trainer.strategy=single"], 2, "trainer.strategy=single: trains in one process, but 2 are launched"),
        (
            ["trainer.batch_size=63"], 2,
            "trainer.batch_size=63: the global batch must be divisible by the 2 processes (WORLD_SIZE=2)",
        ),
        (
            ["moe.expert_parallel=true", "moe.num_experts=5"], 2,
            "moe.num_experts=5: expert parallelism needs it divisible by the 2 processes",
        ),
        (["moe.expert_parallel=true", "moe=dense"], 2, "moe.expert_parallel=true: needs MoE layers"),
        (
            ["moe.expert_parallel=true", "trainer.precision=fp16"], 2,
            "trainer.precision=fp16: a loss-scaled step may skip on some ranks only under expert parallelism",
        ),
        (["trainer.expert_parallel_size=2"], None, "trainer.expert_parallel_size=2: needs a distributed launch"),
        (
            ["trainer.expert_parallel_size=4"], 2,
            "trainer.expert_parallel_size=4: must divide the 2 processes (WORLD_SIZE=2) into expert groups",
        ),
        (["trainer.expert_parallel_size=3"], 4, "trainer.expert_parallel_size=3: must divide the 4 processes"),
        (
            ["trainer.expert_parallel_size=2", "moe.num_experts=5"], 4,
            "moe.num_experts=5: expert parallelism needs it divisible by the 2 ranks of an expert group "
            "(trainer.expert_parallel_size=2)",
        ),
        (
            ["moe.expert_parallel=true", "moe.num_experts=6"], 4,
            "moe.num_experts=6: expert parallelism needs it divisible by the 4 processes",
        ),
    ],
)
def test_bad_launches_stop_with_one_line(compose_run, overrides, processes, message):
    """The config against the launch: ``processes`` ranks started by torchrun, or None: the process runs alone."""
    with pytest.raises(ConfigError) as raised:
        check_launch(compose_run(*overrides), torchrun=processes is not None, world_size=processes or 1)
    assert str(raised.value).startswith(message) and "\n" not in str(raised.value)


def test_good_launches_pass(compose_run):
    check_launch(compose_run(), torchrun=False, world_size=1)
    check_launch(compose_run("trainer.strategy=single"), torchrun=True, world_size=1)
    check_launch(compose_run("moe.expert_parallel=true", "moe.num_experts=4"), torchrun=True, world_size=2)
    check_launch(compose_run("trainer.expert_parallel_size=2", "moe.num_experts=4"), torchrun=True, world_size=4)


def test_the_default_run_and_each_bad_value_differ_only_by_it(default_run):
    check_config(default_run)  # so each failure above is caused by its override alone


@pytest.mark.parametrize(
    "override,fragments",
    [
        ("moe=first_half", ["moe/first_half", "Available options", "last_half"]),
        ("model=vit_gigantic", ["model/vit_gigantic", "vit_small"]),
        ("moe.num_expert=4", ["moe.num_expert"]),
    ],
)
def test_unknown_options_and_keys_are_named_by_hydra(compose_run, override, fragments):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as raised:
        compose_run(override)
    for fragment in fragments:
        assert fragment in str(raised.value)


@pytest.mark.slow
def test_cli_prints_one_line_and_exits_nonzero_before_loading_anything(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "softmoe.train", "moe.num_experts=0", f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "error: moe.num_experts=0: must be a positive integer"
    assert "Traceback" not in result.stdout + result.stderr
    assert list(tmp_path.iterdir()) == []  # no run directory was made: the checks run before Hydra makes one


MODEL_NAME_REFUSED = ("error: model.name=vit_small: labels the run, but model=vit_micro builds it; pick the model "
                      "with model=vit_small (and leave model.name alone)\n")


@pytest.mark.slow
def test_a_refused_run_in_the_default_layout_leaves_no_empty_date_folder(tmp_path):
    (tmp_path / "outputs" / "runs" / "2020-01-01" / "12-00-00").mkdir(parents=True)  # an earlier run's, kept
    # refused by the train command itself, which alone knows Hydra's choice of model (it trained vit_micro as
    # "vit_small"); moe.num_experts=0 above is refused by the config's checks
    command = [sys.executable, "-m", "softmoe.train", "model.name=vit_small"]
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, MODEL_NAME_REFUSED)
    assert [path.name for path in (tmp_path / "outputs" / "runs").iterdir()] == ["2020-01-01"]


@pytest.mark.slow
def test_a_refused_run_removes_the_folders_it_made_and_only_those(tmp_path):
    # was: an empty outputs/debug/<date>/ (debug=default), an empty outputs/runs/ (the default layout). A value the
    # config's checks refuse makes no folder (they run before Hydra: test_sweep_check.py); model.name is refused by
    # the run once Hydra made its folders
    def refused(cwd, *overrides):
        result = run_forked("softmoe.train", [*overrides, "model.name=vit_small"], cwd, timeout=120)
        assert (result.returncode, result.stderr) == (2, MODEL_NAME_REFUSED)

    refused(tmp_path)  # outputs/runs/<date>/<time>: every folder of it was new
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "outputs" / "debug").mkdir(parents=True)  # the user's, empty: kept; its new <date>/ is not
    refused(tmp_path, "debug=default")
    assert [path.relative_to(tmp_path) for path in tmp_path.rglob("*")] == [Path("outputs"), Path("outputs/debug")]


# `python -c` runs the train command with a date resolver standing in for a clock that passes midnight between the
# command's checks (which compose the config before Hydra starts) and Hydra's own run: the first config it resolves
# in (the checks') is "today", every later one (Hydra's) "tomorrow". No test waits for midnight.
TRAIN_ACROSS_MIDNIGHT = """
import runpy
from omegaconf import OmegaConf
first = []
def day(_root_):
    first.append(id(_root_)) if not first else None
    return "today" if id(_root_) == first[0] else "tomorrow"
OmegaConf.register_new_resolver("day", day)
runpy.run_module("softmoe.train", run_name="__main__")
"""


@pytest.mark.slow
def test_a_refused_run_removes_the_folder_hydra_made_though_the_path_resolved_before_hydra_differs(tmp_path):
    # The command resolves the run directory before Hydra starts (its checks), and Hydra resolves it again: a run
    # started just before midnight looked at today's outputs/runs/<date>/, there already, so it removed nothing
    # but the run directory and left tomorrow's <date>/, which Hydra made, empty.
    (tmp_path / "today").mkdir()  # today's folder, there already
    command = [sys.executable, "-c", TRAIN_ACROSS_MIDNIGHT, f"hydra.run.dir={tmp_path}/${{day:}}/run",
               "model.name=vit_small"]  # refused once Hydra made the run directory (above)
    result = subprocess.run(command, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                            text=True, timeout=120)
    assert (result.returncode, result.stderr) == (2, MODEL_NAME_REFUSED)
    assert list(tmp_path.iterdir()) == [tmp_path / "today"]  # was: and an empty <tmp>/tomorrow/, which Hydra made


@pytest.mark.slow
def test_the_checks_resolve_the_job_name_as_hydras_run_does(tmp_path):
    """``${hydra.job.name}`` in the run directory: the checks looked at <dir>/app/ (the compose API's default name)
    while Hydra ran in <dir>/train/, so a run directory with another experiment's checkpoint was not refused."""
    run_dir = f"hydra.run.dir={tmp_path}/${{hydra.job.name}}/run"
    assert output_dir([run_dir], "train") == ("hydra.run.dir", tmp_path / "train" / "run")
    assert output_dir(["-m", f"hydra.sweep.dir={tmp_path}/${{hydra.job.name}}"], "train")[1] == tmp_path / "train"
    # each command is named after its config, as the checks assume
    commands = {path.stem: re.findall(r'^@hydra\.main\(.*config_name="(\w+)"', path.read_text(), re.MULTILINE)
                for path in (ROOT / "softmoe").glob("*.py")}
    assert commands["train"] == ["train"] and all(names in ([], [stem]) for stem, names in commands.items())


def test_plain_resolves_interpolations_and_leaves_out_hydras_node():
    cfg = OmegaConf.create({"data": {"img_size": 8}, "model": {"img_size": "${data.img_size}"}, "hydra": {"job": {}}})
    assert plain(cfg) == {"data": {"img_size": 8}, "model": {"img_size": 8}}
    assert plain(cfg.model) == {"img_size": 8}  # a section resolves against its root
    with pytest.raises(ConfigError, match=r"^model.img_size: Interpolation key 'data.size' not found"):
        plain(OmegaConf.create({"data": {}, "model": {"img_size": "${data.size}"}}))


def test_one_section_checker_names_the_missing_the_bad_and_the_unknown_key():
    rules = {"depth": positive_int}
    with pytest.raises(ConfigError, match=r"^model.depth: missing; every key of conf/model/\*.yaml is needed$"):
        check_section("model", {}, rules)
    check_section("model", {}, rules, required=None)  # only the keys present
    with pytest.raises(ConfigError, match=r"^model.depth=true: must be a positive integer$"):
        check_section("model", {"depth": True}, rules)  # a bool is not an int
    with pytest.raises(ConfigError, match=r"^model.dept=4: not a key of the model group; did you mean model.depth\?$"):
        check_known("model", {"dept": 4, "_target_": "x"}, rules, "not a key of the model group")
    with pytest.raises(ConfigError, match=r"^model.wings=2: not a key of the model group$"):  # nothing close
        check_known("model", {"wings": 2}, rules, "not a key of the model group")


SWEPT_GROUPS = [  # (experiment, a config group its sweep sets, each swept option)
    (path.stem, group, option)
    for path in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))
    for group, options in (OmegaConf.load(path).get("hydra", {}).get("sweeper", {}).get("params", {}) or {}).items()
    if group in GROUPS
    for option in str(options).split(",")
]


def test_some_study_sweeps_a_config_group():  # else the test below checks nothing
    assert len({experiment for experiment, _, _ in SWEPT_GROUPS}) >= 2


@pytest.mark.parametrize("experiment,group,option", SWEPT_GROUPS, ids=[f"{e}:{g}={o}" for e, g, o in SWEPT_GROUPS])
def test_a_studys_swept_group_reaches_the_run_config(compose_run, experiment, group, option):
    # an experiment's own keys come after the groups: setting a key the swept group sets would void the sweep
    cfg = compose_run(f"experiment={experiment}", f"{group}={option}")
    path = Path(CONF_DIR) / group / f"{option}.yaml"
    header = [line.split()[-1] for line in path.read_text().splitlines() if line.startswith("# @package")]
    package = header[0] if header else group
    section = cfg if package == "_global_" else OmegaConf.select(cfg, package)
    keys = {key: value for key, value in OmegaConf.to_container(OmegaConf.load(path)).items() if key != "defaults"}
    assert keys, f"{path} sets no key of its own: nothing to check"
    for key, value in keys.items():
        assert section[key] == value, f"experiment={experiment} {group}={option}: {key}={section[key]}, not {value}"


def test_a_target_that_does_not_import_is_one_line_without_hydras_own_log(compose_run, caplog):
    with pytest.raises(ConfigError) as raised:
        check_config(compose_run("optimizer._target_=torch.optim.Bogus"))
    assert str(raised.value) == "optimizer._target_=torch.optim.Bogus: must name an importable class or function"
    assert [record.getMessage() for record in caplog.records if record.name == "hydra.utils"] == []  # was 3 lines
    assert not logging.getLogger("hydra.utils").disabled  # silenced for that call only


def test_a_value_close_to_an_allowed_one_is_named():
    from softmoe.harness.rules import one_of

    rule = one_of("soft", "tokens_choice", "experts_choice")
    assert rule("token_choice", {}) == "must be one of soft, tokens_choice, experts_choice; did you mean tokens_choice?"
    assert rule("sparse", {}) == "must be one of soft, tokens_choice, experts_choice"  # nothing close: no guess
    assert rule(3, {}) == "must be one of soft, tokens_choice, experts_choice"  # not a string: no guess
    with pytest.raises(ConfigError, match=r"^trainer.precision=bf61: must be one of fp32, bf16, fp16; did you mean "
                                          r"bf16\?$"):
        check_section("trainer", {"precision": "bf61"}, TRAINER_RULES, required=None)


STUDIES_WITH_A_SWEEP_DIR = [path.stem for path in sorted((Path(CONF_DIR) / "experiment").glob("*.yaml"))
                            if "dir" in (OmegaConf.load(path).get("hydra", {}).get("sweep", {}) or {})]


def test_some_study_fixes_its_sweep_directory():  # else the test below checks nothing
    assert "upcycling_dense_cpu" in STUDIES_WITH_A_SWEEP_DIR


@pytest.mark.parametrize("experiment", STUDIES_WITH_A_SWEEP_DIR)
def test_a_smoke_run_of_a_study_writes_below_outputs_debug_not_into_the_study(compose_run, experiment):
    """Was: ``debug=default`` moved a single run's directory only, so a study's smoke run wrote its 10-step
    checkpoints into the study's own directory, where the real study's jobs then refused their run directories and
    its next stage upcycled from them."""
    hydra = compose_run(f"experiment={experiment}", "debug=default", hydra_node=True).hydra
    study = compose_run(f"experiment={experiment}", hydra_node=True).hydra.sweep.dir
    assert hydra.sweep.dir.startswith("outputs/debug/multiruns/") and not study.startswith("outputs/debug/")
    assert hydra.run.dir.startswith("outputs/debug/")
