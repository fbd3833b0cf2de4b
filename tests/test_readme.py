"""The README's examples run as written and compute what they say, and so do the reference implementation's
(with our import name)."""

import re
from pathlib import Path

import pytest
import timm
import torch

from softmoe import SoftMoE, SoftMoEVisionTransformer

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


def check_layer(ns):
    assert ns["y"].shape == (4, 50, 64) and tuple(ns["layer"].phi.shape) == (64, 8, 2)
    assert moe_blocks(ns["vit"]) == [0, 1]  # every block


def check_tune_allocator(ns):
    import platform

    # what the call returned is not kept by the example; calling it again must agree with the platform
    assert ns["softmoe"].tune_allocator() is (platform.system() == "Linux" and platform.libc_ver()[0] == "glibc")


def check_wrapper(ns):
    assert ns["y"].shape == (1, 16, 128)  # the TransformerEncoderLayer experts keep the width
    assert ns["layer"].num_experts == 16 and ns["layer"].slots_per_expert == 1


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


README_EXAMPLES = code_blocks(ROOT / "README.md", "python")
README_CHECKS = [
    check_vit, check_factories, check_features, check_export, check_layer, check_tune_allocator, check_wrapper,
    check_routing, check_upcycle, check_timm_upcycle,
]


def test_every_readme_example_has_its_check():
    assert len(README_EXAMPLES) == len(README_CHECKS)


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
    with torch.device("meta"):
        for i, example in enumerate(REFERENCE_EXAMPLES[: index + 1]):
            source = example.replace("soft_moe_pytorch", "softmoe")
            exec(compile(source, f"reference README example {i}", "exec"), namespace)
    assert REFERENCE_CHECKS[index](namespace)


def test_ci_runs_exactly_the_readme_test_command():
    commands = [block.strip() for block in code_blocks(ROOT / "README.md", "bash")]
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    assert "pip install -r requirements.txt && python -m softmoe.train" in commands
