"""The measurement scripts under experiments/ run, report what their READMEs say they report, and those READMEs
quote them: each script at the smallest size that still exercises its code. A script that times runs in its own
process (torchrun where the study runs torchrun): its threads and allocator settings are process-wide. One that only
counts or tabulates, and every --help and refused option, runs in the test's process, as ``__main__``.

No timings are asserted: the numbers live in each study's folder with the machine they came from.
"""

import json
import os
import shutil
import sys

import pytest
import torch

from processes import REPO, run_from, run_here
from softmoe import SoftMoEVisionTransformer

SCALE_OUT = os.path.join(REPO, "experiments", "scale_out")


def torchrun(script, processes, *arguments):
    """``script`` at ``processes`` gloo ranks on this host, one thread each, as the study's run scripts start it."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               script, *arguments]
    return run_from(REPO, command, env={"OMP_NUM_THREADS": "1"})


def json_lines(path):
    with open(path) as file:
        return [json.loads(line) for line in file if line.strip()]


@pytest.mark.slow
def test_the_cpu_inference_script_times_both_models_and_each_block_part(tmp_path):
    """experiments/throughput/cpu_inference.py --blocks: where the two models' inference times differ."""
    script = os.path.join(REPO, "experiments", "throughput", "cpu_inference.py")
    command = [sys.executable, script, "--shape", "tiny", "--batch", "2", "--rounds", "2", "--threads", "1",
               "--allocator", "tuned", "--blocks"]
    result = json.loads(run_from(tmp_path, command).stdout)
    assert result["soft_moe_over_dense"] > 0 and result["allocator"] == "tuned" and result["threads"] == 1
    blocks = result["blocks"]
    assert blocks["moe_blocks"] == [1]  # the tiny shape's one Soft MoE block
    for kind in ("dense", "soft_moe"):  # the 2 blocks' attention and MLP, each timed
        assert sorted(blocks["median_s"][kind]) == ["0.attn", "0.mlp", "1.attn", "1.mlp"]
        assert all(seconds > 0 for seconds in blocks["median_s"][kind].values())
    assert blocks["moe_layer_over_dense_mlp"] > 0 and blocks["attention_soft_moe_over_dense"] > 0


@pytest.mark.slow
def test_the_cpu_inference_script_times_the_packed_models_beside_the_unpacked(tmp_path, monkeypatch, capsys):
    """cpu_inference.py --packed: Soft MoE with its experts packed for oneDNN, and both models with every Linear
    packed too; the script checks each against its unpacked model's output before timing it."""
    script = os.path.join(REPO, "experiments", "throughput", "cpu_inference.py")
    command = [sys.executable, script, "--shape", "tiny", "--batch", "2", "--rounds", "2", "--threads", "1",
               "--packed"]
    result = json.loads(run_from(tmp_path, command).stdout)
    assert result["packed_banks"] == "1 of 1"  # the tiny shape: 2 images x 2 slots = 4 rows per expert
    assert set(result["seconds"]) == {"dense", "soft_moe", "soft_moe_packed", "dense_all_packed",
                                      "soft_moe_all_packed"}
    assert all(ratio["wall"] > 0 and ratio["cpu"] > 0 for ratio in result["packed"].values())
    assert len(result["packed"]) == 4
    assert run_here(monkeypatch, script, *command[2:], "--blocks") == 2  # refused as it parses its options
    assert "--blocks and --packed time different things" in capsys.readouterr().err


@pytest.mark.slow
def test_the_compiled_copies_script_times_both_soft_moe_settings_beside_dense(tmp_path):
    """experiments/throughput/compiled_copies.py: compiled autocast inference, copies read against cast in graph."""
    script = os.path.join(REPO, "experiments", "throughput", "compiled_copies.py")
    command = [sys.executable, script, "--shape", "tiny", "--batch", "2", "--rounds", "2", "--backend", "aot_eager",
               "--out", str(tmp_path / "result.json")]
    result = json.loads(run_from(tmp_path, command).stdout)
    assert result == json.loads((tmp_path / "result.json").read_text())
    assert set(result["seconds"]) == {"dense", "soft_moe_reads_copies", "soft_moe_casts_in_graph"}
    assert min(result["seconds"].values()) > 0 and result["casts_in_graph_over_reads_copies"] > 0
    assert set(result["soft_moe_over_dense"]) == {"soft_moe_reads_copies", "soft_moe_casts_in_graph"}
    assert result["backend"] == "aot_eager" and result["machine"]["cpu"]


@pytest.mark.slow
def test_the_expert_gemm_script_reports_each_case_and_both_floors_of_the_streamed_product(tmp_path):
    script = os.path.join(REPO, "experiments", "throughput", "expert_gemm_residency.py")
    command = [sys.executable, script, "--threads", "1", "--rounds", "1", "--experts", "4"]
    result = json.loads(run_from(tmp_path, command).stdout)
    assert sorted(result["gflop_per_s"]) == ["loop", "resident", "streamed", "tall"]
    assert min(result["gflop_per_s"].values()) > 0 and result["weight_read_gb_per_s"] > 0
    assert result["streamed_ms"] > 0 and sorted(result["floors_ms"]) == ["flops_at_tall_rate", "read_weights"]
    assert result["experts"] == 4


@pytest.mark.slow
def test_the_expert_gemm_kernel_script_checks_each_kernel_against_bmm_and_times_it(tmp_path):
    """expert_gemm_kernels.py at 2 experts, without its inductor case (a 10 s compile; its committed runs have it)."""
    script = os.path.join(REPO, "experiments", "throughput", "expert_gemm_kernels.py")
    command = [sys.executable, script, "--threads", "1", "--rounds", "1", "--experts", "2", "--no-compile"]
    result = json.loads(run_from(tmp_path, command).stdout)
    available = {"mkl_packed": torch.backends.mkl.is_available(), "onednn": torch.backends.mkldnn.is_available()}
    kernels = {"bmm", *(name for name, here in available.items() if here)}
    kernels |= {"onednn_packed"} if available["onednn"] else set()
    assert set(result["ms"]) == set(result["over_bmm"]) == set(result["max_abs_error_vs_bmm"]) == kernels
    assert result["over_bmm"]["bmm"] == 1.0 and min(result["gflop_per_s"].values()) > 0
    assert max(result["max_abs_error_vs_bmm"].values()) < 1e-4 and result["inductor_compile_s"] is None


def test_the_optimizer_state_readme_tables_are_what_state_bytes_prints(monkeypatch, capsys):
    """experiments/optimizer_state/README.md quotes the script's tables (counted on the meta device, exact)."""
    script = os.path.join(REPO, "experiments", "optimizer_state", "state_bytes.py")
    assert run_here(monkeypatch, script) == 0
    stdout = capsys.readouterr().out
    with open(os.path.join(REPO, "experiments", "optimizer_state", "README.md")) as f:
        readme = f.read().splitlines()
    printed = [line for line in stdout.splitlines() if line.strip()]
    assert len(printed) == 10 and "| soft_moe_vit_base | 3685.7 M |" in stdout  # 2 tables, 4 + 2 rows
    assert [line for line in printed if line not in readme] == []


@pytest.mark.slow
def test_the_optimizer_step_script_times_all_four_steps_on_the_same_parameters(tmp_path):
    """experiments/optimizer_state/step_time.py at 2 experts (its default is one S/16 bank's 128)."""
    script = os.path.join(REPO, "experiments", "optimizer_state", "step_time.py")
    result = json.loads(run_from(tmp_path, [sys.executable, script, "--experts", "2", "--rounds", "1"]).stdout)
    steps = ["bf16_compiled", "bf16_eager", "torch_for_loop", "torch_fused"]
    assert sorted(result["seconds"]) == steps and sorted(result["over_torch_for_loop"]) == steps
    assert all(seconds > 0 for seconds in result["seconds"].values())
    assert result["over_torch_for_loop"]["torch_for_loop"] == 1.0
    assert result["parameters"] == 2 * (2 * 384 * 1536 + 1536 + 384)  # fc1 and fc2: weights and biases
    # bytes each step must move: float32 moments read and write more than bf16 ones
    assert result["bytes_per_step"]["float32_moments"] > result["bytes_per_step"]["bf16_moments"] > 0
    assert result["machine"] and len(result["load_average"]) == 2


def test_the_scale_out_readme_tables_are_what_report_writes_from_the_committed_results(tmp_path, monkeypatch):
    """report.py, run on a copy of the folder, leaves its README as it is: the tables are the JSON lines'."""
    folder = shutil.copytree(SCALE_OUT, tmp_path / "scale_out")
    monkeypatch.chdir(folder)
    assert run_here(monkeypatch, folder / "report.py") == 0
    with open(os.path.join(SCALE_OUT, "README.md")) as original:
        assert (folder / "README.md").read_text() == original.read()


@pytest.mark.slow
def test_the_scale_out_script_shards_every_parameter_of_fsdp_with_expert_parallelism_exactly_once(tmp_path):
    """measure.py's most involved layout, FSDP + EP, at 2 ranks (one replica of 2 expert ranks) for 1 step: one row
    per rank, and the ranks' parameters, gradients and AdamW state add up to the whole model's, each exactly once."""
    out = tmp_path / "results.jsonl"
    torchrun(os.path.join(SCALE_OUT, "measure.py"), 2, "--layout", "fsdp_ep", "--out", str(out), "--steps", "1",
             "--batch-per-rank", "2")
    rows = json_lines(out)
    assert [(row["layout"], row["rank"], row["world_size"]) for row in rows] == [("fsdp_ep", 0, 2), ("fsdp_ep", 1, 2)]
    sys.path.insert(0, SCALE_OUT)
    try:
        from measure import MODEL
    finally:
        sys.path.remove(SCALE_OUT)
    with torch.device("meta"):
        parameters = list(SoftMoEVisionTransformer(**MODEL).parameters())
    whole_mib = sum(p.nbytes for p in parameters) / 2**20
    assert sum(row["parameters_mib"] for row in rows) == pytest.approx(whole_mib, rel=1e-12)
    for row in rows:
        assert row["gradients_mib"] == row["parameters_mib"]
        # exp_avg and exp_avg_sq per parameter shard, and the step counters (one float32 each)
        assert row["optimizer_mib"] == pytest.approx(2 * row["parameters_mib"] + len(parameters) * 4 / 2**20)
        assert row["step_seconds"] > 0 and row["peak_rss_mib"] > 0


@pytest.mark.slow
def test_the_model_build_script_on_meta_lays_the_model_out_over_the_ranks_exactly_once(tmp_path):
    """measure_init.py --init-device meta at 2 ranks, 4 experts per MoE block (the README's runs: 32): each rank
    holds its pieces, which add up to the whole model. (What a rank's memory grows by is tests/test_meta_init.py's
    exact meter; RSS at this size would be the allocator's noise.)"""
    out = tmp_path / "init.jsonl"
    torchrun(os.path.join(SCALE_OUT, "measure_init.py"), 2, "--init-device", "meta", "--out", str(out),
             "--num-experts", "4")
    rows = json_lines(out)
    assert [(row["init_device"], row["rank"]) for row in rows] == [("meta", 0), ("meta", 1)]
    model_mib = rows[0]["model_mib"]
    assert 0 < rows[0]["pieces_mib"] < model_mib
    assert sum(row["pieces_mib"] for row in rows) == pytest.approx(model_mib, rel=1e-12)
    assert all(row["build_seconds"] > 0 and row["peak_rss_mib"] >= row["rss_before_build_mib"] for row in rows)


@pytest.mark.parametrize("script", [("scale_out", "report.py"), ("optimizer_state", "state_bytes.py")])
def test_scripts_without_options_answer_help_and_change_nothing(script, monkeypatch, capsys):
    """was: both ignored --help and ran; report.py rewrote the README's tables."""
    readme = os.path.join(REPO, "experiments", script[0], "README.md")
    with open(readme, "rb") as file:
        before = file.read()
    monkeypatch.chdir(REPO)
    assert run_here(monkeypatch, os.path.join(REPO, "experiments", *script), "--help") == 0
    assert capsys.readouterr().out.startswith(f"usage: {script[1]} [-h]")
    with open(readme, "rb") as file:
        assert file.read() == before


@pytest.mark.parametrize("script, arguments, message", [
    # were: a StatisticsError, an IndexError, set_num_threads' RuntimeError, or a run of empty batches that exited 0
    (("throughput", "cpu_inference.py"), ["--rounds", "0"], "argument --rounds: must be >= 1, got 0"),
    (("throughput", "compiled_copies.py"), ["--batch", "0"], "argument --batch: must be >= 1, got 0"),
    (("throughput", "expert_gemm_kernels.py"), ["--threads", "0"], "argument --threads: must be >= 1, got 0"),
    (("throughput", "expert_gemm_residency.py"), ["--rounds", "-1"], "argument --rounds: must be >= 1, got -1"),
    (("optimizer_state", "step_time.py"), ["--experts", "0"], "argument --experts: must be >= 1, got 0"),
    (("optimizer_state", "step_time.py"), ["--rounds", "x"], "argument --rounds: must be an integer >= 1, got 'x'"),
    (("scale_out", "measure.py"), ["--layout", "ddp", "--out", "x.jsonl", "--steps", "0"],
     "argument --steps: must be >= 1, got 0"),
    (("scale_out", "measure_init.py"), ["--init-device", "meta", "--out", "x.jsonl", "--num-experts", "0"],
     "argument --num-experts: must be >= 1, got 0"),
    (("throughput", "compiled_copies.py"), ["--backend", "aot_eagr"],
     "--backend aot_eagr: not a torch.compile backend (did you mean aot_eager?); use inductor (the default), eager, "
     "aot_eager, another of torch._dynamo.list_backends()"),
], ids=["cpu_inference", "compiled_copies", "gemm_kernels", "gemm_residency", "step_time", "step_time_text",
        "measure", "measure_init", "compile_backend"])
def test_a_bad_count_or_backend_is_refused_in_one_line_before_anything_runs(script, arguments, message, monkeypatch,
                                                                      capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(os.path.join(REPO, "experiments", script[0]))  # measure_init imports measure
    threads = torch.get_num_threads()
    assert run_here(monkeypatch, os.path.join(REPO, "experiments", *script), *arguments) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"{script[1]}: error: {message}"
    assert torch.get_num_threads() == threads and list(tmp_path.iterdir()) == []
