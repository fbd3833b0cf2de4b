"""The benchmark command runs and reports every section; its baseline and its FLOP model are right.

No timings are asserted here: the numbers live in experiments/throughput/ with the machine they came from.
"""

import json
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from processes import REPO, run_from
from softmoe import SoftMoE
from softmoe.bench.floors import attainable_cases
from softmoe.cpu_packing import packing_available
from softmoe.bench.reference import ReferenceLoopSoftMoE
from softmoe.bench.report import TARGETS
from softmoe.bench.shapes import LAYER_SHAPES


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    # A fresh process: the memory probe retunes glibc's allocator for the rest of the process.
    out = tmp_path_factory.mktemp("benchmark") / "results.json"
    command = [sys.executable, "-m", "softmoe.benchmark", "--tiny", "--threads", "1", "--profile", "--profile-model",
               "--model-bf16", "yes", "--out", str(out)]
    completed = run_from(REPO, command)
    return json.loads(out.read_text()), completed.stdout


@pytest.mark.slow  # a benchmark process
def test_tiny_run_reports_every_section(tiny_results):
    results, stdout = tiny_results
    assert {"command", "machine", "config", "allocator", "layer", "layer_memory", "model", "model_memory", "compile",
            "memory_method", "targets", "profile", "wall_s"} <= set(results)
    assert results["machine"]["torch"] == torch.__version__ and results["machine"]["cpu"]
    assert "cpu_flags" in results["machine"] and "cpu_native_bf16" in results["machine"]
    cells = {(row["dtype"], row["pass"]) for row in results["layer"]}
    assert cells == {(dtype, p) for dtype in ("float32", "bfloat16") for p in ("forward", "forward_backward")}
    for row in results["layer"]:
        assert row["soft_moe_s"] > 0 and row["reference_loop_s"] > 0 and row["attainable_s"] > 0
        assert row["soft_moe_over_attainable_cpu_time"] > 0 and row["reference_loop_over_soft_moe_cpu_time"] > 0
        assert row["weight_roofline_s"] > 0 and row["ceilings"]["copy_bytes_per_s"] > 0
        assert row["ceilings"][f"gemm_{row['dtype']}_flops_per_s"] > 0
    fp32, bf16 = (next(r for r in results["layer"] if r["dtype"] == d and r["pass"] == "forward_backward")
                  for d in ("float32", "bfloat16"))
    if results["allocator"]["tune_allocator_applied"]:  # glibc: the allocator settings side by side
        assert fp32["soft_moe@env_variables_s"] > 0 and fp32["soft_moe@glibc_defaults_s"] > 0
        for variant in ("env_variables", "glibc_defaults"):  # each round's time, as the layer's own are kept
            assert len(fp32[f"soft_moe@{variant}_seconds"]) == len(fp32["soft_moe_seconds"])
        assert fp32["soft_moe_over_soft_moe@glibc_defaults"] > 0  # against the layer of its own rounds
    assert bf16["soft_moe@cast_per_step_s"] > 0 and bf16["float32_over_cast_per_step"] > 0
    assert {row["impl"] for row in results["layer_memory"]} == {"soft_moe", "reference_loop"}
    for row in results["layer_memory"]:
        assert row["required_bytes"] == 2 * row["param_bytes"] + row["required_saved_bytes"]
        assert row["saved_activation_bytes"] > 0
    model = results["model"]
    for ratios in (model["soft_moe_over_dense"], model["soft_moe_over_dense_cpu_time"]):
        assert set(ratios) == {"inference", "forward_backward", "train_step", "optimizer"}
    for metric in ("inference", "forward_backward"):
        assert results["model_bf16"][metric]["float32_over_bf16"] > 0
    assert "float32 / bf16 autocast" in stdout
    # the inference targets come from rounds of their own, with the kernel's and the host's share of each call
    alone = model["inference_only"]
    kinds = {"dense", "soft_moe", "soft_moe_packed"} if packing_available() else {"dense", "soft_moe"}
    assert set(alone["seconds"]) == set(alone["round_seconds"]) == kinds and alone["rounds"] == 1
    for counter in ("page_faults", "system_s", "host_steal_s"):
        assert all(len(values) == 1 and min(values) >= 0 for values in alone[f"{counter}_per_round"].values())
    assert results["targets"]["model_inference_over_dense"]["value"] == alone["soft_moe_over_dense"]
    assert "inference only, in rounds of its own (1; the inference targets)" in stdout
    if packing_available():  # the expert banks packed for oneDNN, beside both models
        assert alone["banks"] == alone["banks_packed"] == 1
        assert alone["soft_moe_packed_over_dense"] > 0 and alone["soft_moe_packed_over_soft_moe"] > 0
        assert results["targets"]["model_inference_packed_over_dense"]["value"] == alone["soft_moe_packed_over_dense"]
        assert "1 of 1 expert banks ran packed" in stdout
    for name in ("dense", "soft_moe"):
        timings = model["models"][name]
        assert 0 < timings["optimizer_share_of_step"] < 1 and timings["flops_per_image"]["forward"] > 0
        assert set(results["model_memory"][name]) >= {"param_bytes", "optimizer_state_bytes", "train_step_peak_bytes"}
        # the kernel's share of each round, beside its times: a count and seconds per timed round
        rounds = len(timings["seconds"]["train_step"])
        faults, system, steal = (timings[f"forward_backward_{counter}"] for counter in
                                 ("page_faults", "system_s", "host_steal_s"))
        assert len(faults) == len(system) == len(steal) == rounds and all(isinstance(n, int) for n in faults)
        assert min(faults) >= 0 and min(system) >= 0 and min(steal) >= 0
    assert "fwd+bwd page faults per round (system seconds; host steal seconds): dense " in stdout
    assert results["compile"] == {"skipped": "pass --compile"}
    assert len(results["profile"]) == 3 and all("aten::bmm" in table for table in results["profile"][:2])
    assert results["profile"][2].startswith("reference_loop") and "aten::addmm" in results["profile"][2]
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
    # every CPU target is a line of the report; the GPU-only one is not measured here
    cpu_targets = set(TARGETS) - {"layer_bf16_fraction_of_matmul_rate"}
    if not packing_available():
        cpu_targets.discard("model_inference_packed_over_dense")
    if not results["allocator"]["tune_allocator_applied"]:
        cpu_targets.discard("layer_forward_backward_default_env_over_env_variables")
    assert set(results["targets"]) == cpu_targets
    for name in cpu_targets:
        assert f"target {name}:" in stdout
    assert "wrote" in stdout


@pytest.mark.slow  # a benchmark process
def test_tiny_run_gives_no_verdicts_and_writes_nothing_without_out(tmp_path):
    """--tiny numbers mean nothing, so no target is called met or not; without --out the run writes no
    file, in particular not the tracked experiments/throughput/results.json."""
    command = [sys.executable, "-m", "softmoe.benchmark", "--tiny", "--threads", "1", "--no-model"]
    completed = run_from(tmp_path, command)
    assert list(tmp_path.iterdir()) == []
    assert ": met" not in completed.stdout and "NOT met" not in completed.stdout and "wrote" not in completed.stdout
    assert "target reference_loop_over_layer_forward_backward:" in completed.stdout


def test_reference_loop_baseline_computes_the_same_function():
    torch.manual_seed(0)
    layer = SoftMoE(8, 16, num_experts=3, slots_per_expert=2).double()
    layer.scale.data.fill_(1.5)
    reference = ReferenceLoopSoftMoE.from_soft_moe(layer)
    x = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    y_reference = reference(x)
    (grad_reference,) = torch.autograd.grad(y_reference.square().sum(), x)
    torch.testing.assert_close(y_reference, y, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_reference, grad, rtol=1e-10, atol=1e-12)


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


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "forward_backward"])
def test_attainable_matmuls_are_the_layers_own_products(backward):
    """The attainable time's bare matmuls do exactly the FLOPs torch counts for the layer, in 5 forward
    and 15 forward+backward products."""
    shape = LAYER_SHAPES["tiny"]
    cases, flops = attainable_cases(shape, torch.device("cpu"), torch.float32)
    pass_name = "forward_backward" if backward else "forward"
    with FlopCounterMode(display=False) as counter:
        cases[pass_name]()
    assert counter.get_total_flops() == flops[pass_name] == shape.flops(backward)
    assert sum(counter.get_flop_counts()["Global"].values()) == shape.flops(backward)
