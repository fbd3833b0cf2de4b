"""The benchmark command runs and reports every section; its baseline and its FLOP model are right.

No timings are asserted here: the numbers live in experiments/throughput/ with the machine they came from.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from softmoe import SoftMoE
from softmoe.benchmark import LAYER_SHAPES, TARGETS, SeedLoopSoftMoE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    # A fresh process: the memory probe retunes glibc's allocator for the rest of the process.
    out = tmp_path_factory.mktemp("benchmark") / "results.json"
    command = [sys.executable, "-m", "softmoe.benchmark", "--tiny", "--threads", "1", "--profile", "--profile-model", "--out", str(out)]
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(out.read_text()), completed.stdout


def test_tiny_run_reports_every_section(tiny_results):
    results, stdout = tiny_results
    assert {"command", "machine", "config", "layer", "layer_memory", "model", "model_memory", "compile",
            "memory_method", "targets", "profile", "wall_s"} <= set(results)
    assert results["machine"]["torch"] == torch.__version__ and results["machine"]["cpu"]
    cells = {(row["dtype"], row["pass"]) for row in results["layer"]}
    assert cells == {(dtype, p) for dtype in ("float32", "bfloat16") for p in ("forward", "forward_backward")}
    for row in results["layer"]:
        assert row["soft_moe_s"] > 0 and row["seed_loop_s"] > 0 and row["floor_s"] > 0
        assert row["floor_s"] == max(row["compute_floor_s"], row["memory_floor_s"])
        assert row["soft_moe_over_floor_cpu_time"] > 0 and row["seed_loop_over_soft_moe_cpu_time"] > 0
        assert row["ceilings"]["gemm_flops_per_s"] > 0 and row["ceilings"]["copy_bytes_per_s"] > 0
    assert {row["impl"] for row in results["layer_memory"]} == {"soft_moe", "seed_loop"}
    for row in results["layer_memory"]:
        assert row["required_bytes"] == 2 * row["param_bytes"] + row["required_saved_bytes"]
        assert row["saved_activation_bytes"] > 0
    model = results["model"]
    for ratios in (model["soft_moe_over_dense"], model["soft_moe_over_dense_cpu_time"]):
        assert set(ratios) == {"inference", "forward_backward", "train_step", "optimizer"}
    for name in ("dense", "soft_moe"):
        timings = model["models"][name]
        assert 0 < timings["optimizer_share_of_step"] < 1 and timings["flops_per_image"]["forward"] > 0
        assert set(results["model_memory"][name]) >= {"param_bytes", "optimizer_state_bytes", "train_step_peak_bytes"}
    assert results["compile"] == {"skipped": "pass --compile"}
    assert "aten::bmm" in results["profile"]
    profile = results["model_profile"]
    for name in ("dense", "soft_moe"):
        parts = profile[name]
        whole, changed, rest = parts["whole model"], parts["changed MLPs"], parts["everything else (same in both)"]
        # the profile's FLOPs are the model's FLOPs, split without loss into the parts it reports
        forward_flops = model["models"][name]["flops_per_image"]["forward"] * results["config"]["model_batch"]
        assert whole["gflop"] * 1e9 == pytest.approx(forward_flops)
        assert changed["gflop"] + rest["gflop"] == pytest.approx(whole["gflop"])
        assert 0 < changed["seconds"] < whole["seconds"] and changed["gflop"] > 0
    experts = profile["soft_moe"]["  experts"]
    routing = profile["soft_moe"]["  routing (logits, softmaxes, dispatch, combine)"]
    assert 0 < experts["seconds"] < profile["soft_moe"]["changed MLPs"]["seconds"] and routing["gflop"] > 0
    assert "model inference profile" in stdout
    assert set(results["targets"]) == set(TARGETS)
    assert "target model_train_step_over_dense" in stdout and "wrote" in stdout


def test_seed_loop_baseline_computes_the_same_function():
    torch.manual_seed(0)
    layer = SoftMoE(8, 16, num_experts=3, slots_per_expert=2).double()
    layer.scale.data.fill_(1.5)
    seed = SeedLoopSoftMoE.from_soft_moe(layer)
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    y_seed = seed(x)
    (grad_seed,) = torch.autograd.grad(y_seed.square().sum(), x)
    torch.testing.assert_close(y_seed, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_seed, grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_floor_flops_are_what_torch_counts(backward):
    shape = LAYER_SHAPES["tiny"]
    layer = SoftMoE(shape.dim, shape.hidden, num_experts=shape.num_experts, slots_per_expert=shape.slots_per_expert)
    x = torch.randn(shape.batch, shape.tokens, shape.dim, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        y = layer(x)
        if backward:
            y.backward(torch.randn_like(y))
    assert counter.get_total_flops() == shape.flops(backward)
