"""The GPU suite (``python -m softmoe.benchmark --suite gpu``): its floor arithmetic, exactly, and its whole code
path at tiny sizes on CPU. No timings are asserted: on a GPU its figures are the report's, not a test's."""

import json
import os

import pytest
import torch
from torch import nn

from softmoe import SoftMoE
from softmoe.bench.cli import main, parse_args
from softmoe.bench.floors import expert_bank_cases
from softmoe.bench.step_floor import ADAMW_BYTES_PER_PARAM, ParameterCounts, parameter_counts, step_floor
from softmoe.bench.model import build_benchmark_model
from softmoe.bench.shapes import LAYER_SHAPES, MODEL_SHAPES


def _toy_model():
    # Linear(8, 8): 72 parameters, cast; SoftMoE: Φ 8·2·1 = 16 cast, scale 1 not, experts 2·(8·16 + 16 + 16·8 + 8)
    # = 560 cast, of which 512 weights
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), SoftMoE(8, 16, num_experts=2, slots_per_expert=1))


@pytest.mark.parametrize("fp32_grads, gradient_cast", [(True, 72 + 16 + 48), (False, 72 + 16 + 560)])
def test_parameters_are_counted_by_how_a_bf16_step_touches_them(fp32_grads, gradient_cast):
    counts = parameter_counts(_toy_model(), expert_grads_written_in_float32=fp32_grads)
    assert counts == ParameterCounts(total=72 + 16 + 16 + 1 + 560, cast_for_matmuls=72 + 16 + 560,
                                     gradient_cast=gradient_cast, experts=560, expert_weights=512)


def test_the_step_floor_adds_the_traffic_at_bandwidth_to_the_flops_at_the_matmul_rate():
    counts = ParameterCounts(total=1000, cast_for_matmuls=800, gradient_cast=300, experts=500, expert_weights=400)
    floor = step_floor(counts, flops=4_000, matmul_rate=2_000.0, bandwidth=10_000.0)
    assert (floor.optimizer_bytes, floor.weight_copy_bytes, floor.gradient_cast_bytes) == (28_000, 4_800, 1_800)
    assert floor.traffic_bytes == 34_600
    assert floor.matmul_s == 2.0 and floor.traffic_s == pytest.approx(3.46) and floor.seconds == pytest.approx(5.46)


def test_soft_moe_s16_adamw_moves_the_26_gb_the_issue_counts():
    """Issue 18: Soft MoE S/16's fp32 AdamW moves about 26 GB per step; B/16's 3.7 B parameters about 100 GB."""
    for shape, params_billion, adamw_gb in (("vit_s16", 0.92, 26), ("vit_b16", 3.7, 100)):
        model = build_benchmark_model(MODEL_SHAPES[shape], "soft_moe", "meta")
        counts = parameter_counts(model, expert_grads_written_in_float32=True)
        assert counts.total / 1e9 == pytest.approx(params_billion, rel=0.03)
        assert ADAMW_BYTES_PER_PARAM * counts.total / 1e9 == pytest.approx(adamw_gb, rel=0.05)
        assert counts.experts > 0.95 * counts.total


@pytest.mark.slow  # a whole suite run: about a minute on 2 loaded cores
def test_the_suite_runs_every_section_at_tiny_sizes_on_cpu(tmp_path, capsys):
    out = tmp_path / "suite.json"
    threads = torch.get_num_threads()
    try:  # --threads 1: the suite ran on torch's default threads whatever it said
        main(["--suite", "gpu", "--tiny", "--device", "cpu", "--suite-compile", "eager", "--threads", "1", "--out",
              str(out)])
    finally:
        torch.set_num_threads(threads)
    results = json.loads(out.read_text())
    captured = capsys.readouterr()
    stdout = captured.out
    assert results["machine"]["torch_threads"] == 1
    # tiny sizes mean nothing: no target is met or not (the last line said "9 targets, 0 met")
    assert ": met" not in stdout and "NOT met" not in stdout and ", no verdicts; " in stdout.splitlines()[-3]
    # each section printed as it was measured (stderr), so a run cut short still shows what it measured
    progress = [line for line in captured.err.splitlines() if line.startswith("[suite] ")]
    for first_words in ("[suite] layer tiny", "[suite] models tiny", "[suite] inference images/s",
                        "[suite] optimizer step", "[suite] profile"):
        assert any(line.startswith(first_words) for line in progress), (first_words, progress)
    assert results["failed"] == [] and "partial" not in results
    assert results["suite"] == "gpu" and results["peak"]["matmul_bf16_flops_per_s"] > 0
    (layer,) = results["layers"]
    for key in ("eager_forward_backward_over_matmuls", "compiled_forward_over_mlp", "matmuls_forward_fraction_of_peak"):
        assert layer[key] > 0
    # the experts through bmm and torch._grouped_mm side by side (torch 2.14 runs grouped_mm on CPU too)
    assert layer["experts_bmm_s"] > 0 and layer["experts_grouped_mm_over_bmm"] > 0
    assert "experts tiny fc1 + fc2 forward: torch.bmm " in stdout and "x bmm's time)" in stdout
    # the host's share: the same calls at toy sizes, so a layer time near it is the host's, not the device's
    assert all(layer[f"{impl}_{pass_name}_per_call_floor_s"] > 0 for impl in ("eager", "mlp")
               for pass_name in ("forward", "forward_backward"))
    assert "per-call floor beside tiny (the same calls at toy sizes, eager): forward layer " in stdout
    (model,) = results["models"]
    assert set(model["step"]) == {f"{kind}/{variant}" for kind in ("dense", "soft_moe")
                                  for variant in ("eager", "compiled")}
    for metric in ("inference_eager", "inference_compiled", "inference_bf16"):
        assert model[f"{metric}_soft_moe_over_dense"] > 0
    assert model["floor"]["soft_moe"]["parameters"]["experts"] > 0 and model["floor"]["soft_moe"]["flops"] > 0
    assert results["huge"]["soft_moe_speedup"] > 0
    # AdamW and the copies' refresh: torch fused + the banks' recast against softmoe's AdamW writing the copies
    optimizer = results["optimizer"]
    assert optimizer["compiled"] and set(optimizer["over_float32_fused"]) == {"float32_writes_copies", "bf16_state"}
    assert all(ratio > 0 for ratio in optimizer["over_float32_fused"].values())
    count, copied = optimizer["parameters"], optimizer["expert_weights_copied"]
    assert 0 < copied < count
    assert {name: step["bytes"] for name, step in optimizer["steps"].items()} == {
        "float32_fused": 28 * count + 6 * copied, "float32_writes_copies": 28 * count + 2 * copied,
        "bf16_state": 20 * count + 2 * copied}
    assert "softmoe AdamW {} moments, writes the copies" not in stdout and "softmoe AdamW compiled)" in stdout
    # where the time goes: the layer eager and "compiled" (backend eager here), both models' training steps
    cases = {case["what"]: case for case in results["profile"]["cases"]}
    assert list(cases) == ["layer tiny eager fwd+bwd", "layer tiny compiled fwd+bwd",
                           "tiny dense training step eager", "tiny soft_moe training step eager"]
    for what, case in cases.items():
        assert case["clock"] == "cpu" and sum(case["shares"].values()) == pytest.approx(1.0)
        assert case["shares"]["matmuls"] > 0 and "aten::" in case["table"]
        assert any(line.startswith(f"[suite] profile {what}: ") for line in progress)
    assert cases["tiny soft_moe training step eager"]["shares"]["optimizer"] > 0
    assert cases["layer tiny eager fwd+bwd"]["shares"]["softmaxes"] > 0
    names = [t["name"] for t in results["targets"]]
    assert len(names) == 8 + 4 + 3 + 1 and all(t["met"] is None for t in results["targets"])
    for name in names:
        assert name in stdout
    assert "NOT met" not in stdout and results["skipped"] == []


@pytest.mark.parametrize("name, category", [
    ("aten::bmm", "matmuls"), ("aten::_grouped_mm", "matmuls"), ("triton_tem_fused_mm_0", "matmuls"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"), ("aten::_to_copy", "copies and casts"),
    ("aten::_softmax_backward_data", "softmaxes"), ("aten::linalg_vector_norm", "norms and reductions"),
    ("aten::_fused_adamw_", "optimizer"), ("aten::_foreach_mul_", "optimizer"),
    ("triton_per_fused__softmax_0", "compiled (fused) kernels"),
    ("## Call CompiledFxGraph fx3a ##", "compiled (fused) kernels"),
    ("aten::gelu_backward", "other aten ops (elementwise)"),
    ("autograd::engine::evaluate_function: BmmBackward0", "framework (autograd, Python)")])
def test_profiled_ops_fall_into_the_categories_of_issue_18s_profile(name, category):
    from softmoe.bench.profiling import op_category

    assert op_category(name) == category


def test_a_profile_splits_self_time_by_category_without_counting_nested_ops_twice():
    from softmoe.bench.profiling import profile_calls

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    profile = profile_calls(lambda: torch.softmax(torch.matmul(a, b), dim=-1).to(torch.float64), torch.device("cpu"),
                            iterations=2)
    # aten::matmul's own time is only its call into aten::mm: the product is counted once, as a matmul
    assert set(profile["shares"]) >= {"matmuls", "softmaxes", "copies and casts"}
    assert sum(profile["ms"].values()) == pytest.approx(profile["ms_per_iteration"])
    assert sum(profile["shares"].values()) == pytest.approx(1.0) and "aten::mm" in profile["table"]


def test_fresh_process_allocator_runs_time_the_layer_and_pair_ratios_by_round():
    from softmoe.bench.fresh_process import child, summarize

    run = child("opted_out", "tiny", calls=2, threads=1)
    assert len(run["seconds"]) == len(run["cpu_seconds"]) == 2 and min(run["seconds"]) > 0
    def rounds(*per_round):  # (seconds, cpu_seconds) of each round's process
        return [{"seconds": seconds, "cpu_seconds": cpu} for seconds, cpu in per_round]

    fake = {"library_default": rounds(([2.0, 2.2, 9.0], [1.0]), ([3.0], [1.0])),
            "tune_allocator": rounds(([2.0], [1.0]), ([2.0], [2.0])),
            "opted_out": rounds(([4.0], [2.0]), ([2.0], [2.0]))}
    summary = summarize(fake)
    assert summary["median_s"] == {"library_default": 2.6, "tune_allocator": 2.0, "opted_out": 3.0}
    assert summary["library_default_over_tune_allocator"] == pytest.approx((1.1 + 1.5) / 2)
    assert summary["opted_out_over_tune_allocator_cpu_time"] == pytest.approx((2.0 + 1.0) / 2)


def test_the_expert_gemms_through_grouped_mm_compute_what_bmm_computes():
    """The suite times the same product both ways: torch._grouped_mm's batched form against two bmm calls."""
    cases, missing = expert_bank_cases(LAYER_SHAPES["tiny"], torch.device("cpu"), torch.float32)
    assert not missing, missing  # torch 2.14 runs it on CPU
    torch.testing.assert_close(cases["experts_grouped_mm"](), cases["experts_bmm"]())


@pytest.mark.parametrize(
    "arguments, message",
    [(["--threads", "0"], "--threads must be >= 1, got 0"),
     (["--suite", "gpu", "--tiny", "--suite-rounds", "0"], "--suite-rounds must be >= 1, got 0"),
     (["--suite", "gpu", "--tiny", "--suite-budget-s", "-1"], "--suite-budget-s must be >= 0, got -1.0"),
     (["--device", "gpu"], "--device must be a torch device (cpu, cuda, cuda:1, ...), got 'gpu'"),
     (["--device", "meta"], "--device meta: the benchmark measures cpu, cuda or mps, not meta"),  # was: a traceback
     (["--suite", "gpu", "--device", "cpu"], "--suite gpu measures a CUDA GPU at full size, not --device cpu; add "
                                             "--tiny to check the command on this device"),
     # were: accepted, --tiny's values (or the default GEMM and copy sizes) replacing them
     (["--tiny", "--warmup", "-1"], "--warmup must be >= 0, got -1"),
     (["--tiny", "--model-warmup", "-1"], "--model-warmup must be >= 0, got -1"),
     (["--tiny", "--model-batch", "0"], "--model-batch must be >= 1, got 0"),
     (["--gemm-size", "0"], "--gemm-size must be >= 1, got 0"),
     (["--tiny", "--copy-mib", "0"], "--copy-mib must be >= 1, got 0"),
     # were: nan accepted (no budget at all); a backend typo failed every compiled section after the others ran
     (["--suite", "gpu", "--tiny", "--suite-budget-s", "nan"], "--suite-budget-s must be >= 0, got nan"),
     (["--suite", "gpu", "--tiny", "--suite-compile", "inductr"],
      "--suite-compile inductr: not a torch.compile backend (did you mean inductor?); use inductor (the default), "
      "eager, aot_eager, another of torch._dynamo.list_backends(), or none (eager only)")],
    ids=["threads", "suite_rounds", "suite_budget", "device", "meta", "full_suite_on_a_cpu", "tiny_warmup",
         "tiny_model_warmup", "tiny_model_batch", "gemm_size", "tiny_copy_mib", "nan_budget", "compile_backend"],
)
def test_bad_arguments_stop_the_command_with_one_line_naming_them(capsys, arguments, message):
    with pytest.raises(SystemExit) as exit_status:
        parse_args(arguments)
    assert exit_status.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"python -m softmoe.benchmark: error: {message}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where torch sees no GPU")
def test_a_cuda_device_where_torch_sees_none_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda"])
    assert capsys.readouterr().err.endswith("error: --device cuda: torch sees no CUDA GPU here\n")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the refusal where torch sees no MPS device")
def test_an_mps_device_where_torch_sees_none_is_refused(capsys):
    with pytest.raises(SystemExit):  # was: a traceback from deep inside the first section
        parse_args(["--device", "mps"])
    assert capsys.readouterr().err.endswith("error: --device mps: torch sees no MPS device (Apple's GPU) here\n")


def test_an_out_that_cannot_be_written_is_refused_before_anything_is_measured(tmp_path, capsys):
    # was: every section measured, then IsADirectoryError, and <out>.tmp left beside it
    (tmp_path / "a file").write_text("")
    for out, problem in [(tmp_path, f"a directory; name the JSON file to write, e.g. {tmp_path / 'bench.json'}"),
                         (tmp_path / "a file" / "bench.json", f"cannot be written ({tmp_path / 'a file'} is a file)")]:
        with pytest.raises(SystemExit) as exit_status:
            parse_args(["--tiny", "--out", str(out)])
        assert exit_status.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"python -m softmoe.benchmark: error: --out {out}: {problem}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a file"]
    assert parse_args(["--tiny", "--out", str(tmp_path / "new" / "bench.json")]).out  # its folder is made when written
    if os.path.isdir("/proc") and os.geteuid() == 0:  # was: measured, then a traceback: root passes os.access
        with pytest.raises(SystemExit):
            parse_args(["--tiny", "--out", "/proc/bench.json"])
        assert capsys.readouterr().err.splitlines()[-1] == (
            "python -m softmoe.benchmark: error: --out /proc/bench.json: cannot be written (/proc takes no new file: "
            "No such file or directory)")


def test_an_out_naming_a_file_of_another_kind_and_more_threads_than_cpus_are_refused(tmp_path, capsys):
    # was: a checkpoint named by mistake became the benchmark's JSON; --threads 100000 a segfault with no message
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"weights")
    cpus = os.cpu_count()
    for argv, problem in [
        (["--out", str(checkpoint)], f"--out {checkpoint}: an existing file that is not a .json file, which this "
                                     "would replace; name a .json file"),
        (["--threads", str(cpus + 1)], f"--threads {cpus + 1}: more than this machine's {cpus} CPUs; threads beyond "
                                       "the cores take turns, which times the operating system (and some thousands "
                                       "abort the process)"),
    ]:
        with pytest.raises(SystemExit):
            parse_args(["--tiny", *argv])
        assert capsys.readouterr().err.splitlines()[-1] == f"python -m softmoe.benchmark: error: {problem}"
    assert checkpoint.read_bytes() == b"weights"
    earlier = tmp_path / "bench.json"
    earlier.write_text("{}")  # an earlier result: rewritten, as before
    assert parse_args(["--tiny", "--out", str(earlier), "--threads", str(cpus)]).out == str(earlier)


def test_a_section_that_fails_is_listed_and_the_others_are_still_measured_and_saved(tmp_path):
    """On a lent GPU, one section out of memory (B/16 on an 80 GB card) must not cost the figures of the rest."""
    from softmoe.bench.cli import _suite_progress
    from softmoe.bench.suite import Suite, SuiteConfig, required_section
    from softmoe.bench.suite_report import format_suite, suite_targets

    args = parse_args(["--suite", "gpu", "--tiny", "--device", "cpu", "--suite-compile", "none"])
    suite = Suite(SuiteConfig.from_args(args), torch.device("cpu"))

    def out_of_memory():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB.\nmore detail")

    assert required_section(suite, "models B/16", out_of_memory) is None
    assert suite.failed == ["models B/16: OutOfMemoryError: CUDA out of memory. Tried to allocate 3.00 GiB."]
    huge = {"dense": "vit_huge_patch14_224", "soft_moe": "soft_moe_vit_base", "batch": 2, "limit": 5.7,
            "images_per_s": {"dense": 1.0, "soft_moe": 6.0}, "soft_moe_speedup": 6.0}
    assert required_section(suite, "huge", lambda: huge) is huge
    results = {"command": "c", "suite": "gpu", "tiny": False, "compile_backend": None, "layers": [], "models": [],
               "machine": {"cpu": "cpu", "torch": torch.__version__, "timm": "t"}, "wall_s": 1.0,
               "peak": {"matmul_bf16_flops_per_s": 1e12, "gemm_size": 8, "copy_bytes_per_s": 1e9},
               "skipped": suite.skipped, "failed": suite.failed, "huge": huge}
    out = tmp_path / "suite.json"
    _suite_progress(str(out))("huge", huge, results)  # the results so far, on disk after each section
    assert json.loads(out.read_text()) == {**results, "partial": True}
    results["targets"] = suite_targets(results)
    report = format_suite(results)
    assert "FAILED, its targets not measured: models B/16: OutOfMemoryError" in report
    assert "1 target, 1 met; 1 section FAILED" in report  # was "1 targets, 1 met; 1 sections FAILED"


def test_a_section_without_a_target_that_fails_is_listed_as_skipped_not_raised():
    from softmoe.bench.suite import optional_section

    class Suite:
        skipped = []

    def broken():
        raise RuntimeError("no kernel for this GPU")

    assert optional_section(Suite, "optimizer", broken) is None
    assert Suite.skipped == ["optimizer section: RuntimeError: no kernel for this GPU"]
    assert optional_section(Suite, "optimizer", lambda: {"steps": {}}) == {"steps": {}}
