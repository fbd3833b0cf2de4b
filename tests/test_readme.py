"""The README's examples run as written and compute what they say, and so do the reference implementation's
(with our import name)."""

import contextlib
import re
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch

from softmoe import BatchedMlp, SoftMoE, SoftMoEVisionTransformer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_README = Path(__file__).with_name("fixtures") / "reference-README.md"  # soft_moe_pytorch's README, verbatim


def code_blocks(path, language):
    return re.findall(rf"```{language}[ \t]*\n(.*?)```", path.read_text(), flags=re.S)


def moe_blocks(net):
    return [index for index, block in enumerate(net.blocks) if isinstance(block.mlp, SoftMoE)]


def check_vit(ns):
    assert ns["preds"].shape == (2, 10) and moe_blocks(ns["net"]) == [3, 4, 5]  # "blocks 3..depth-1"


def check_factories(ns):
    assert isinstance(ns["net"], SoftMoEVisionTransformer) and len(ns["net"].blocks) == 8
    # no moe_layer_index: the factories put the MoE layers in the last half of the depth given
    assert ns["net"].num_experts == 8 and moe_blocks(ns["net"]) == [4, 5, 6, 7]
    sizes = ("base", "huge", "large", "small", "tiny")
    assert [name for name in timm.list_models("soft_moe_*") if not name.startswith("test_")] == [
        f"soft_moe_vit_{size}" for size in sizes
    ]
    assert ns["data_config"]["input_size"] == (3, 224, 224) and ns["cfg"]["num_classes"] == 1000


def check_features(ns):
    assert [tuple(m.shape) for m in ns["maps"]] == [(2, 64, 10, 10)] * 3  # three NCHW feature maps
    assert ns["net"].moe_layer_index == [3, 4] and len(ns["intermediates"]) == 2


def check_export(ns):
    assert ns["explanation"].graph_count == 1 and ns["explanation"].graph_break_count == 0
    assert ns["exported"].module()(ns["images"]).shape == (2, 10)


def check_timm_upcycle(ns):
    assert isinstance(ns["net"], SoftMoEVisionTransformer) and ns["net"].head.out_features == 10
    assert 0.8e-3 < ns["noise"].std() < 1.2e-3  # the configured noise around each block's dense MLP


def check_bf16_moments(ns):
    assert ns["moments"] == {torch.bfloat16} and len(ns["optimizer"].state) == len(list(ns["net"].parameters()))


def check_layer(ns):
    assert ns["y"].shape == (4, 50, 64) and tuple(ns["layer"].phi.shape) == (64, 8, 2)
    assert moe_blocks(ns["vit"]) == [0, 1]  # every block


def check_tune_allocator(ns):
    import platform

    # what the call returned is not kept by the example; calling it again must agree with the platform
    assert ns["softmoe"].tune_allocator() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def check_cpu_packing(ns):
    assert ns["banks"] == 2
    torch.testing.assert_close(ns["packed"], ns["unpacked"], rtol=1e-5, atol=1e-5)
    assert all(bank.cpu_packing is None for bank in ns["net"].modules() if isinstance(bank, BatchedMlp))


def check_wrapper(ns):
    assert ns["y"].shape == (1, 16, 128)  # the TransformerEncoderLayer experts keep the width
    assert ns["layer"].num_experts == 16 and ns["layer"].slots_per_expert == 1
    layer, x = ns["layer"].eval(), torch.rand(3, 16, 128)  # eval: no dropout
    with warnings.catch_warnings():  # torch: vmap runs eval's fast path through its per-example fallback
        warnings.filterwarnings("ignore", "There is a performance drop")
        torch.testing.assert_close(layer(x)[:1], layer(x[:1]))  # batch_first=True: no expert attends across examples


def check_routing(ns):
    record, stats = ns["routing"]["blocks.3.mlp"], ns["stats"]
    assert sorted(ns["routing"]) == ["blocks.2.mlp", "blocks.3.mlp"]
    assert record.dispatch.shape == record.combine.shape == (4, 17, 8, 1)  # 16 patches and the class token
    torch.testing.assert_close(stats["expert_utilisation"].sum(), torch.tensor(1.0))  # "sums to 1"
    assert 1 <= stats["effective_experts"] <= 8 and 0 < stats["dispatch_entropy"] <= 1
    assert ns["similarity"].shape == (8, 8)


def check_upcycle(ns):
    dense, moe = ns["dense"], ns["moe"]
    torch.testing.assert_close(moe.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)  # copied
    experts = moe.blocks[2].mlp.experts.fc1_weight  # [n, d, hidden]: each expert its block's dense MLP, plus noise
    dense_fc1 = dense.blocks[2].mlp.fc1.weight.T.expand_as(experts)
    assert (experts - dense_fc1).abs().max() < 0.01 and not torch.equal(experts[0], experts[1])


README_COMMANDS = [line.split("  #")[0].strip() for block in code_blocks(ROOT / "README.md", "bash")
                   for line in block.strip().splitlines()]
# The README keeps the first examples; the rest moved to docs/ (issue 22), checked alike.
EXAMPLE_FILES = {
    "README.md": [check_vit, check_layer, check_wrapper, check_routing, check_upcycle],
    "docs/library.md": [check_factories, check_features, check_export, check_timm_upcycle, check_cpu_packing,
                        check_bf16_moments],
    "docs/benchmarks.md": [check_tune_allocator],
}
README_EXAMPLES = [block for name in EXAMPLE_FILES for block in code_blocks(ROOT / name, "python")]
README_CHECKS = [check for checks in EXAMPLE_FILES.values() for check in checks]


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_every_readme_example_has_its_check(name):
    assert len(code_blocks(ROOT / name, "python")) == len(EXAMPLE_FILES[name])


@pytest.mark.parametrize("index", range(len(README_EXAMPLES)))
def test_readme_example_runs_and_computes_what_it_says(index):
    namespace = {"__name__": "readme_example"}
    exec(compile(README_EXAMPLES[index], f"README.md example {index}", "exec"), namespace)
    README_CHECKS[index](namespace)


# The reference README's examples, checked for what each says: shapes, and the blocks that get an MoE layer.
REFERENCE_EXAMPLES = code_blocks(REFERENCE_README, "python")
REFERENCE_CHECKS = [
    lambda ns: ns["preds"].shape == (1, 1000) and moe_blocks(ns["net"]) == list(range(6, 12)),
    lambda ns: (ns["net"].num_experts, ns["net"].slots_per_expert, ns["net"].patch_embed.img_size)
    == (64, 2, (128, 128)),
    lambda ns: moe_blocks(ns["net"]) == list(range(6, 12)),  # "Blocks 6-12": the 0-indexed blocks 6..11
    lambda ns: moe_blocks(ns["net"]) == [0, 2, 4],
    lambda ns: ns["y"].shape == (1, 16, 128),
]


def test_the_reference_readme_has_five_examples():
    assert len(REFERENCE_EXAMPLES) == len(REFERENCE_CHECKS) == 5


@pytest.mark.parametrize("index", range(len(REFERENCE_EXAMPLES)))
def test_reference_readme_example_runs_with_our_import_name(index):
    # A reader runs the examples in order (later ones use earlier imports). Their defaults build models
    # of up to 27 B parameters: run them on the meta device (shapes, no memory).
    namespace = {"__name__": "reference_example"}
    # Its last example builds nn.TransformerEncoderLayer experts without batch_first=True: they would attend across
    # the batch, which the wrapper warns about (this README passes batch_first=True)
    warns = pytest.warns(UserWarning, match="batch_first=False") if index == 4 else contextlib.nullcontext()
    with torch.device("meta"), warns:
        for i, example in enumerate(REFERENCE_EXAMPLES[: index + 1]):
            source = example.replace("soft_moe_pytorch", "softmoe")
            exec(compile(source, f"reference README example {i}", "exec"), namespace)
    assert REFERENCE_CHECKS[index](namespace)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(c for c in README_COMMANDS if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "pip install -r requirements.txt && python -m softmoe.train" in README_COMMANDS


# ----------------------------------------------------------------------------- every command of the README runs

# What the test does not run, and why; any other command must run.
NOT_RUN = {
    "python3 -m venv .venv && source .venv/bin/activate": "sets up the user's shell; the suite runs inside one",
    "pip install -r requirements.txt": "installs; the suite runs with it installed",
    "pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu && pip install "
    "-r requirements.txt": "needs download.pytorch.org, which this machine cannot reach (the README says so)",
    "pip install -r requirements.txt && python -m pytest -q -n auto --maxprocesses=8 --dist loadfile":
        "the suite itself",
    'python -m pytest -q -m "not slow"': "the suite itself",
}
# Appended to every training command: a few steps, no W&B; the command's own overrides are kept and composed.
SHORT = [
    "trainer.max_steps=3", "trainer.log_every=1", "trainer.eval_batches=1", "logger=none", "trainer.progress_bar=false"
]
RUN_DIR = "outputs/runs/<date>/<time>"


def test_the_readme_lists_only_commands_this_test_runs_or_names_why_not():
    assert set(NOT_RUN) <= set(README_COMMANDS)
    run = [command for command in README_COMMANDS if command not in NOT_RUN]
    assert all(c.startswith(("python -m softmoe.", "pip install -r requirements.txt && python -m softmoe.", "cp "))
               for c in run), run
    assert len(run) >= 8


@pytest.fixture(scope="module")
def readme_workdir(tmp_path_factory):
    """A folder to run the README's commands in as a user would in the repository: ``notebooks/`` beside them,
    ``outputs/`` and ``my_images/`` written there."""
    from data_fixtures import write_image_tree

    work = tmp_path_factory.mktemp("readme")
    (work / "notebooks").symlink_to(ROOT / "notebooks")
    write_image_tree(work / "path" / "to" / "my_images", train={"a": 40, "b": 40}, val={"a": 10, "b": 10}, size=32)
    return work


def run_readme_command(command: str, work: Path, extra: list[str] = ()) -> str:
    import os
    import shlex
    import subprocess

    command = command.replace("pip install -r requirements.txt && ", "").replace(" /tmp/", f" {work}/")
    if command.startswith("python -m softmoe.train"):
        command += " " + " ".join([*SHORT, *extra])
    command = command.replace("python -m", f"{shlex.quote(sys.executable)} -m", 1)
    # the README's commands run in its activated environment: its console scripts (jupyter) come first on PATH,
    # even when the suite itself was started by the interpreter's full path
    path = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": path}
    result = subprocess.run(["bash", "-c", command], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def quick_start_run(readme_workdir):
    """The quick start, shortened: its run directory, relative to the working folder, for the next steps."""
    (command,) = [c for c in README_COMMANDS if c.endswith("python -m softmoe.train")]
    before = set((readme_workdir / "outputs" / "runs").glob("*/*"))  # the README's other runs share the folder
    output = run_readme_command(command, readme_workdir)
    assert "final dispatch entropy (1 = uniform): block 2 " in output and "next:" in output
    (run_dir,) = set((readme_workdir / "outputs" / "runs").glob("*/*")) - before
    return str(run_dir.relative_to(readme_workdir))


TRAINING = [c for c in README_COMMANDS if c.startswith("python -m softmoe.train") and c not in NOT_RUN]


@pytest.mark.slow
@pytest.mark.parametrize("command", TRAINING)
def test_every_training_command_of_the_readme_runs(readme_workdir, command):
    extra = [f"hydra.sweep.dir=sweep_{abs(hash(command))}"] if " -m " in command.replace("python -m", "") else []
    output = run_readme_command(command, readme_workdir, extra)
    assert "done: test accuracy" in output


NEXT_STEPS = [c for c in README_COMMANDS if RUN_DIR in c]


def test_the_readme_lists_the_next_steps_a_run_prints_in_their_order(tmp_path, monkeypatch):
    """The README's next steps are the commands the run prints under ``next:``, in the printed order (was: collect
    before the notebook); each runs (below), and a real run prints them (tests/test_stop_messages.py)."""
    from softmoe.harness.checkpoint import save_checkpoint
    from softmoe.harness.console import ROUTING_NOTEBOOK, next_steps

    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "outputs" / "runs" / "day" / "time"
    run_dir.mkdir(parents=True)
    save_checkpoint(run_dir / "best.pt", {"format": 1, "step": 1})  # the quick start's run selects a best.pt
    printed = []
    for step in next_steps(run_dir):
        step = step.split("  #")[0].replace(str(ROOT / ROUTING_NOTEBOOK), ROUTING_NOTEBOOK)
        step = step.replace(str(run_dir.resolve()), f"$PWD/{RUN_DIR}").replace("outputs/runs/day/time", RUN_DIR)
        printed.append(" ".join(step.split()))
    assert printed == [" ".join(command.split()) for command in NEXT_STEPS]


@pytest.mark.slow
@pytest.mark.parametrize("command", NEXT_STEPS)
def test_every_next_step_of_the_readme_runs_on_the_quick_start_run(readme_workdir, quick_start_run, command):
    run_readme_command(command.replace(RUN_DIR, quick_start_run), readme_workdir)


def test_the_readme_is_for_newcomers_in_the_order_they_need():
    text = (ROOT / "README.md").read_text()
    headings = [line for line in text.splitlines() if line.startswith("## ")]
    newcomer = ["## Set up", "## Install", "## Quick start", "## Your own images", "## The library by example",
                "## Config groups", "## Studies", "## Links"]
    assert headings[:8] == newcomer
    assert len(text.splitlines()) <= 310 and "AMD EPYC Zen 3 (family 25 model 1, AVX2" in text  # "about 300"
    for name in ("scale_out", "reliability", "benchmarks", "cpu_history", "training", "library"):
        assert f"(docs/{name}.md)" in text and (ROOT / "docs" / f"{name}.md").is_file()
    assert "could not try the CPU-only install" in text


def test_the_config_groups_table_names_every_option_of_each_group():
    """Each row of the README's config-group table names every ``conf/<group>/*.yaml`` option, and no other."""
    rows = re.findall(r"^\| `(\w+)` \| (.*?) \|", (ROOT / "README.md").read_text(), flags=re.M)
    groups = {group: set(re.findall(r"`(\w+)`", options))
              for group, options in rows if (ROOT / "conf" / group).is_dir()}
    assert len(groups) >= 14
    for group, named in groups.items():
        options = {path.stem for path in (ROOT / "conf" / group).glob("*.yaml")}
        assert named == options, f"{group}: missing {sorted(options - named)}, not options {sorted(named - options)}"
