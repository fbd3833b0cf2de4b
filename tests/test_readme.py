"""The README's examples run as written, and so do the reference implementation's (with our import name)."""

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SEED_README = Path(__file__).with_name("fixtures") / "seed-README.md"  # the soft_moe_pytorch README, verbatim


def code_blocks(path, language):
    return re.findall(rf"```{language}[ \t]*\n(.*?)```", path.read_text(), flags=re.S)


README_EXAMPLES = code_blocks(ROOT / "README.md", "python")
SEED_EXAMPLES = code_blocks(SEED_README, "python")


def test_readme_has_examples():
    assert len(README_EXAMPLES) >= 5 and len(SEED_EXAMPLES) == 5


@pytest.mark.parametrize("index", range(len(README_EXAMPLES)))
def test_readme_example_runs(index):
    exec(compile(README_EXAMPLES[index], f"README.md example {index}", "exec"), {"__name__": "readme_example"})


@pytest.mark.parametrize("index", range(len(SEED_EXAMPLES)))
def test_reference_readme_example_runs_with_our_import_name(index):
    # A reader runs the examples in order (later ones use earlier imports). Their defaults build models
    # of up to 27 B parameters: run them on the meta device (shapes, no memory).
    namespace = {"__name__": "seed_example"}
    with torch.device("meta"):
        for i, example in enumerate(SEED_EXAMPLES[: index + 1]):
            source = example.replace("soft_moe_pytorch", "softmoe")
            exec(compile(source, f"seed README example {i}", "exec"), namespace)
    if "preds" in namespace:
        assert namespace["preds"].shape == (1, 1000)
    if "y" in namespace:
        assert namespace["y"].shape[:2] == (1, 16)


def test_ci_runs_exactly_the_readme_test_command():
    commands = [block.strip() for block in code_blocks(ROOT / "README.md", "bash")]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "pip install -r requirements.txt && python -m softmoe.train" in commands
