"""python -m softmoe.evaluate: a run rebuilt from its checkpoint, its validation and test metrics, its routing."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import CONF_DIR, ROOT
from data_fixtures import write_image_tree
from processes import refused_here
from softmoe import evaluate as evaluate_command
from softmoe.evaluate import argument_error, evaluate_run, missing_run_error
from softmoe.harness.errors import ConfigError, MissingDataError
from softmoe.harness.checkpoint import load_checkpoint
from softmoe.harness.overrides import composition_error
from softmoe import SoftMoEVisionTransformer
from softmoe.harness.data import build_datasets, build_loader
from softmoe.harness.loop import evaluate, train
from softmoe.harness.runs import load_run, read_events

QUIET = ["trainer.progress_bar=false"]


@pytest.mark.slow
def test_evaluate_refuses_a_missing_run_dir_without_creating_it(tmp_path):
    missing = tmp_path / "no_such_run"
    command = [sys.executable, "-m", "softmoe.evaluate", f"run_dir={missing}", "checkpoint=last"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert (result.returncode, result.stderr) == (
        2, f"error: run_dir={missing}: no such directory (a training run directory holds best.pt and last.pt)\n")
    assert not missing.exists()


def test_evaluate_refuses_a_run_dir_without_the_checkpoint_and_writes_nothing_there(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert refused_here(monkeypatch, evaluate_command, f"run_dir={empty}", "checkpoint=last") == 2  # started above
    assert capsys.readouterr().err == f"error: run_dir={empty}: holds no last.pt (is it a training run directory?)\n"
    assert list(empty.iterdir()) == []


def test_evaluate_without_a_run_dir_says_so_and_leaves_hydras_flags_to_hydra():
    assert missing_run_error([]) == missing_run_error(["checkpoint=last"]) == (
        "run_dir: missing; name the training run directory to evaluate: "
        "python -m softmoe.evaluate run_dir=outputs/runs/<date>/<time>")
    assert missing_run_error(["--help"]) is None and missing_run_error(["--cfg", "job"]) is None


@pytest.mark.parametrize("empty", ["run_dir=", "run_dir=''"])
def test_an_empty_run_dir_is_refused_in_one_line(tmp_path, monkeypatch, capsys, empty):
    """was: "run_dir=.: holds no best.pt", or, in a run directory, that run evaluated into /evaluate."""
    monkeypatch.chdir(tmp_path)
    assert refused_here(monkeypatch, evaluate_command, empty, "checkpoint=last") == 2
    assert capsys.readouterr().err == (
        "error: run_dir=: empty (an unset shell variable?); name the training run directory to evaluate: "
        "python -m softmoe.evaluate run_dir=outputs/runs/<date>/<time>\n")
    assert list(tmp_path.iterdir()) == []


BAD_ARGUMENTS = [  # were: a torch traceback, the run's own batch size (0 or ...), true, tracebacks
    (["batch_size=abc"], "batch_size=abc: must be a positive integer, or null"),
    (["batch_size=0"], "batch_size=0: must be a positive integer, or null"),
    (["save_routing=true", "routing_examples=0"], "routing_examples=0: must be a positive integer"),
    (["save_routing=maybe"], "save_routing=maybe: must be true or false"),
    (["images=some"], "images=some: must be one of run, all"),
    (["device=foo"], "device=foo: must be auto, cpu, cuda, cuda:<index> or mps"),
    (["device=meta"], "device=meta: must be auto, cpu, cuda, cuda:<index> or mps"),
    *([] if torch.cuda.is_available() else
      [(["device=cuda"], "device=cuda: CUDA is not available on this machine; use auto or cpu")]),
]


@pytest.mark.parametrize("arguments,message", BAD_ARGUMENTS, ids=[" ".join(a) for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_is_refused_in_one_line_before_anything_loads(tmp_path, arguments, message):
    run_dir = tmp_path / "run"  # holds nothing: the refusal comes before any file is read
    assert argument_error([f"run_dir={run_dir}", *arguments]) == message  # the command line, before Hydra starts
    composed = {key: yaml.safe_load(value) for key, value in (a.split("=", 1) for a in arguments)}
    with pytest.raises(ConfigError) as raised:  # evaluate_run, as the command and the notebooks call it
        evaluate_run(run_dir, tmp_path / "evaluate", **composed)
    assert str(raised.value) == message and list(tmp_path.iterdir()) == []


def test_a_run_without_best_pt_is_pointed_to_checkpoint_last(tmp_path):
    from softmoe.harness.checkpoint import save_checkpoint
    from softmoe.harness.console import next_steps

    # a data.val_size=0 run writes no best.pt; it printed `evaluate run_dir=...`, which then failed
    save_checkpoint(tmp_path / "last.pt", {"format": 1, "step": 2})
    assert missing_run_error([f"run_dir={tmp_path}"]) == (
        f"run_dir={tmp_path}: holds no best.pt, only last.pt: no validation selected a model (data.val_size=0, or a "
        "run stopped before its first validation); set checkpoint=last")
    assert missing_run_error([f"run_dir={tmp_path}", "checkpoint=last"]) is None
    assert next_steps(tmp_path)[0].startswith(f"python -m softmoe.evaluate run_dir={tmp_path} checkpoint=last ")
    # the routing notebook loads best.pt unless SOFTMOE_CHECKPOINT says otherwise (was: the printed command failed)
    notebook = next_steps(tmp_path)[1]
    assert f" && SOFTMOE_CHECKPOINT=last SOFTMOE_RUN_DIR={tmp_path.resolve()} jupyter execute " in notebook
    save_checkpoint(tmp_path / "best.pt", {"format": 1, "step": 2})
    assert next_steps(tmp_path)[0].startswith(f"python -m softmoe.evaluate run_dir={tmp_path}        # best.pt's")
    assert f" && SOFTMOE_RUN_DIR={tmp_path.resolve()} jupyter execute " in next_steps(tmp_path)[1]
    # a dense ViT's run is not sent to the routing notebook, which refuses it (was: the printed command failed)
    assert [step.split()[2] for step in next_steps(tmp_path, routed=False)] == ["softmoe.evaluate", "softmoe.collect"]


def test_a_file_where_the_results_folder_goes_is_named_once(tmp_path):
    from softmoe.harness.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "last.pt", {"format": 1, "step": 2})
    (tmp_path / "evaluate").write_text("")  # was: "but <run_dir>/evaluate <run_dir>/evaluate is a file"
    assert missing_run_error([f"run_dir={tmp_path}", "checkpoint=last"]) == (
        f"run_dir={tmp_path}: its results go to {tmp_path / 'evaluate'}, but {tmp_path / 'evaluate'} is a file; copy "
        "the run to a folder that takes files, or give hydra.run.dir=<a folder for the results>")


def test_a_run_on_a_read_only_disk_is_one_line_or_evaluated_into_another_folder(tmp_path):
    """Was: Hydra's traceback on making <run_dir>/evaluate."""
    import subprocess

    from softmoe.harness.checkpoint import save_checkpoint

    run_dir = tmp_path / "disk" / "run"
    run_dir.mkdir(parents=True)
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(run_dir)], capture_output=True).returncode == 0
    save_checkpoint(run_dir / "last.pt", {"format": 1, "step": 2})
    if mounted:  # root writes through permissions: a read-only file system instead
        subprocess.run(["mount", "-o", "remount,ro", str(run_dir)], check=True)
    else:
        run_dir.chmod(0o555)
    try:
        problem = missing_run_error([f"run_dir={run_dir}", "checkpoint=last"])
        if not mounted and os.access(run_dir, os.W_OK):
            pytest.skip("this user writes through permissions and may mount nothing")
        assert problem.startswith(f"run_dir={run_dir}: its results go to {run_dir / 'evaluate'}, but no folder can be "
                                  f"made in {run_dir} (")
        assert problem.endswith("); copy the run to a folder that takes files, or give hydra.run.dir=<a folder for "
                                "the results>")
        elsewhere = tmp_path / "results"
        assert missing_run_error([f"run_dir={run_dir}", "checkpoint=last", f"hydra.run.dir={elsewhere}"]) is None
    finally:
        if mounted:
            subprocess.run(["umount", str(run_dir)], check=True)
        else:
            run_dir.chmod(0o755)


def test_a_full_disk_under_the_results_is_one_line_before_hydra_writes(tmp_path):
    """Was: Hydra's traceback from writing its .hydra/ there (OSError: No space left on device)."""
    import subprocess

    from softmoe.harness.checkpoint import save_checkpoint

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(run_dir)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs a small file system of its own (root mounts a tmpfs)")
    try:
        save_checkpoint(run_dir / "last.pt", {"format": 1, "step": 2})
        problem = missing_run_error([f"run_dir={run_dir}", "checkpoint=last"])
        assert problem.startswith(f"{run_dir / 'evaluate'}: its disk is full (")
        assert problem.endswith("KiB free, where evaluate writes up to 16 MiB); free some space, or give "
                                "hydra.run.dir=<a folder for the results> on another disk")
        elsewhere = tmp_path / "results"
        assert missing_run_error([f"run_dir={run_dir}", "checkpoint=last", f"hydra.run.dir={elsewhere}"]) is None
    finally:
        subprocess.run(["umount", str(run_dir)], check=True)


def test_an_fsdp_run_is_pointed_to_its_best_dcp_not_best_pt(tmp_path):
    from softmoe.harness.console import next_steps
    from softmoe.harness.state import Summary

    (tmp_path / "best.dcp").mkdir()  # trainer.strategy=fsdp writes the sharded best.dcp/ and no best.pt
    (tmp_path / "best.dcp" / ".metadata").write_bytes(b"")
    (tmp_path / "best.dcp" / "train_state.pt").write_bytes(b"")
    assert next_steps(tmp_path)[0].startswith(f"python -m softmoe.evaluate run_dir={tmp_path}        # best.dcp's")
    summary = Summary(0.5, 1.0, 0.5, 0.5, 1, 0.25, 3, str(tmp_path), None)
    assert summary.describe() == (
        "test accuracy 50.00% (final model), 25.00% (best.dcp: best validation accuracy 50.00% at epoch 1)")


def test_a_sweep_directory_is_named_as_one_with_the_runs_to_evaluate(tmp_path):
    """Was: "holds no best.pt (is it a training run directory?)"."""
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    for job in (0, 1, 2, 3, 5):  # a Hydra sweep's job directories; job 4 has not started
        (tmp_path / str(job) / ".hydra").mkdir(parents=True)
    assert missing_run_error([f"run_dir={tmp_path}"]) == (
        f"run_dir={tmp_path}: a sweep directory; evaluate one of its runs: run_dir={tmp_path / '0'} (runs 0-3, 5)")
    (tmp_path / "seed0").mkdir()  # an experiment's own hydra.sweep.subdir
    (tmp_path / "seed0" / "metrics.jsonl").write_text("")
    assert missing_run_error([f"run_dir={tmp_path}", "checkpoint=last"]) == (
        f"run_dir={tmp_path}: a sweep directory; evaluate one of its runs: run_dir={tmp_path / '0'} (runs 0, 1, 2, 3, "
        "5, seed0)")


EVALUATE_KEYS = "run_dir, checkpoint, device, batch_size, images, data_dir, data_root, save_routing, routing_examples"


def test_a_group_of_trains_config_is_refused_in_one_line_naming_evaluates_keys(tmp_path):
    """Was: "Could not override 'experiment'. No match in the defaults list." (evaluate composes no group)."""
    for argument in ("experiment=digits_dense", "+experiment=digits_dense", "model=vit_mega"):
        assert composition_error([f"run_dir={tmp_path}", argument], "evaluate") == (
            f"{argument}: not a config group of evaluate; its keys: {EVALUATE_KEYS}")
    assert composition_error(["experiment=digits_dense"], "train") is None  # train's own group


@pytest.mark.slow
def test_help_shows_evaluates_keys_not_trains_groups():
    result = subprocess.run([sys.executable, "-m", "softmoe.evaluate", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("python -m softmoe.evaluate run_dir=DIR [KEY=VALUE ...]")
    assert "Configuration groups" not in result.stdout and "digits_dense" not in result.stdout
    described = [line.split()[0] for line in result.stdout.split("== What each key means ==\n")[1].splitlines()[:9]]
    assert ", ".join(described) == EVALUATE_KEYS
    assert "\nbatch_size: null\n" in result.stdout  # the defaults, from conf/evaluate.yaml itself


def test_good_arguments_pass_the_check(tmp_path):
    assert argument_error([f"run_dir={tmp_path}", "checkpoint=last", "batch_size=7", "device=cpu",
                           "save_routing=true", "routing_examples=4", f"data_dir={tmp_path}",
                           f"data_root={tmp_path}"]) is None


@pytest.mark.slow
def test_a_folder_where_a_result_file_goes_is_named_in_one_line(compose_run, tmp_path):
    # were: IsADirectoryError's traceback for the JSON, torch's "[enforce fail at inline_container.cc]" for routing.pt
    from softmoe.harness.errors import CheckpointWriteError

    cfg = compose_run("data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=32", "data.test_size=8",
                      "model.depth=2", "trainer.batch_size=16", "trainer.max_steps=2", "logger=none", *QUIET)
    train(cfg, tmp_path / "run")
    results = tmp_path / "results"
    (results / "evaluation_last_step2.json").mkdir(parents=True)
    with pytest.raises(CheckpointWriteError) as raised:
        evaluate_run(tmp_path / "run", results, checkpoint="last")
    assert str(raised.value) == (f"{results / 'evaluation_last_step2.json'}: a folder, where this writes a file; move "
                                 "it away, or give hydra.run.dir=<a folder for the results>")
    (results / "evaluation_last_step2.json").rmdir()
    (results / "routing.pt").mkdir()
    with pytest.raises(CheckpointWriteError, match=r"routing.pt: a folder, where this writes a file"):
        evaluate_run(tmp_path / "run", results, checkpoint="last", save_routing=True)


@pytest.mark.slow
def test_a_run_whose_data_root_moved_is_evaluated_with_data_root(compose_run, tmp_path):
    # was: data_dir ignored (the run's data.root read instead), and the error's remedy named train's data.root, a key
    # evaluate refuses
    images = write_image_tree(tmp_path / "images", train={"a": 8, "b": 8}, val={"a": 2, "b": 2}, size=8)
    cfg = compose_run("data=imagefolder", f"data.root={images}", "data.img_size=8", "model.patch_size=4",
                      "data.num_classes=2", "data.val_size=0.25", "trainer.batch_size=4", "trainer.max_steps=2",
                      "logger=none", *QUIET)
    run_dir = tmp_path / "run"
    train(cfg, run_dir)
    before = evaluate_run(run_dir, tmp_path / "before", checkpoint="last")
    moved = images.rename(tmp_path / "moved")
    with pytest.raises(MissingDataError, match=r"name the folder that holds the files now with data_root=<folder>"):
        evaluate_run(run_dir, tmp_path / "after", checkpoint="last")
    with pytest.raises(ConfigError) as raised:
        evaluate_run(run_dir, tmp_path / "after", checkpoint="last", data_dir=str(tmp_path))
    assert str(raised.value) == (
        f"data_dir={tmp_path}: this run read its data from data.root={images}, not from paths.data_dir; give the "
        "folder that holds its files now as data_root=<folder>")
    after = evaluate_run(run_dir, tmp_path / "after", checkpoint="last", data_root=str(moved))
    assert {key: after[key] for key in ("val/acc", "test/acc", "test/examples")} == \
        {key: before[key] for key in ("val/acc", "test/acc", "test/examples")}


@pytest.mark.slow
def test_evaluate_reloads_a_run_and_saves_its_routing(compose_run, tmp_path):
    # 20 steps: the model tells the 4 images apart (after 5 it gave each the same class, which would hide
    # predictions made for other images)
    cfg = compose_run("trainer.max_steps=20", "trainer.batch_size=128", "logger=none", *QUIET)
    train(cfg, tmp_path)
    result = evaluate_run(tmp_path, tmp_path / "evaluate", checkpoint="last", save_routing=True, routing_examples=4)
    (tested,) = [e for e in read_events(tmp_path) if "test/acc" in e]  # the trainer's own test of the final model
    assert result["test/acc"] == tested["test/acc"] and result["test/loss"] == pytest.approx(tested["test/loss"])
    assert result["val/acc"] == load_checkpoint(tmp_path / "last.pt")["last_eval"]["acc"]
    assert (result["val/examples"], result["test/examples"]) == (180, 360)
    # in batches of 50 (the run's are 500, more than either split): every batch counts, not just the first
    batched = evaluate_run(tmp_path, tmp_path / "batched", checkpoint="last", batch_size=50)
    assert batched["test/acc"] == tested["test/acc"] and batched["test/loss"] == pytest.approx(tested["test/loss"])
    assert batched["val/acc"] == result["val/acc"]
    # the command hands a sweeper over checkpoints the validation accuracy, never the test split's
    assert result["val/acc"] != result["test/acc"]  # the setup holds
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # the config Hydra hands main
        evaluate_cfg = compose("evaluate", [f"run_dir={tmp_path}", "checkpoint=last"], return_hydra_config=True)
    with open_dict(evaluate_cfg):
        evaluate_cfg.hydra.runtime.output_dir = str(tmp_path / "from_main")  # what Hydra sets as the job starts
    HydraConfig.instance().set_config(evaluate_cfg)
    try:
        assert evaluate_command.main(evaluate_cfg) == result["val/acc"]
    finally:
        HydraConfig.instance().cfg = None
    routing = torch.load(tmp_path / "evaluate" / "routing.pt", weights_only=True)
    assert routing["images"].shape == (4, 1, 8, 8) and routing["labels"].shape == (4,)
    # the first validation images (a look inside the model reads no test image), and the model's own predictions
    data = build_datasets(cfg.data, cfg.paths.data_dir)
    val, test = data.val, data.test
    assert torch.equal(routing["images"], torch.stack([val[index][0] for index in range(4)]))
    assert not torch.equal(routing["images"], torch.stack([test[index][0] for index in range(4)]))  # the setup holds
    assert routing["labels"].tolist() == [val[index][1] for index in range(4)]
    with torch.no_grad():
        logits = load_run(tmp_path, "last", device="cpu").model(routing["images"])  # [4, classes]
    assert routing["predictions"].tolist() == [max(range(len(row)), key=lambda k: row[k].item()) for row in logits]
    assert len(set(routing["predictions"].tolist())) > 1  # the setup holds
    assert sorted(routing["dispatch"]) == ["blocks.2.mlp", "blocks.3.mlp"]
    dispatch = routing["dispatch"]["blocks.2.mlp"]  # [batch, tokens, experts, slots_per_expert]
    assert dispatch.shape == (4, 16, 16, 1)
    torch.testing.assert_close(dispatch.sum(dim=1), torch.ones(4, 16, 1))  # a softmax over tokens per slot


@pytest.mark.slow
def test_a_run_that_evaluated_its_first_batches_is_evaluated_on_those_unless_told_all(compose_run, tmp_path, caplog):
    """Was: evaluate read every image, and reported other figures than the run's for the same checkpoint (the
    Fashion-MNIST studies evaluate their first 2,000 test images: trainer.eval_batches=4)."""
    with caplog.at_level(logging.INFO, logger="softmoe.harness.context"):
        summary = train(compose_run("trainer.max_steps=10", "trainer.eval_batch_size=50", "trainer.eval_batches=2",
                                    "logger=none", *QUIET), tmp_path)
    (tested,) = [e for e in read_events(tmp_path) if "test/acc" in e]  # the trainer's test of the final model
    # the run says so too, at its start and in its done line (was: "test accuracy 58.00%" of an unnamed subset)
    subset = ("the first 100 of the 360 test images and 100 of the 180 validation images (trainer.eval_batches=2 x "
              "trainer.eval_batch_size=50; null evaluates them all)")
    assert f"evaluations read {subset}" in caplog.text and summary.describe().endswith(f" on {subset}")
    runs = evaluate_run(tmp_path, tmp_path / "evaluate", checkpoint="last", batch_size=30)  # any batch size
    assert (runs["val/examples"], runs["test/examples"], runs["eval_batches"]) == (100, 100, 2)
    assert runs["test/acc"] == tested["test/acc"] and runs["test/loss"] == pytest.approx(tested["test/loss"])
    assert runs["val/acc"] == load_checkpoint(tmp_path / "last.pt")["last_eval"]["acc"]
    every = evaluate_run(tmp_path, tmp_path / "evaluate", checkpoint="last", images="all")
    assert (every["val/examples"], every["test/examples"], every["eval_batches"]) == (180, 360, None)
    assert Path(every["file"]).name == "evaluation_last_step10_all_images.json" != Path(runs["file"]).name  # both kept
    assert json.loads(Path(runs["file"]).read_text())["test/examples"] == 100
    assert every["test/acc"] != tested["test/acc"]  # the setup holds: the whole split scores otherwise
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # the command says which images it read
        evaluate_cfg = compose("evaluate", [f"run_dir={tmp_path}", "checkpoint=last"], return_hydra_config=True)
    with open_dict(evaluate_cfg):
        evaluate_cfg.hydra.runtime.output_dir = str(tmp_path / "from_main")
    HydraConfig.instance().set_config(evaluate_cfg)
    try:
        with caplog.at_level(logging.INFO, logger="softmoe.evaluate"):
            evaluate_command.main(evaluate_cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert (f"test accuracy {100 * tested['test/acc']:.2f}%, loss {tested['test/loss']:.4f} on 100 images (the first, "
            "as the run evaluated them: trainer.eval_batches=2; images=all for all)") in caplog.text


@pytest.mark.slow
def test_a_second_evaluation_keeps_the_first_one_file_per_checkpoint(compose_run, tmp_path):
    train(compose_run("trainer.max_steps=5", "trainer.batch_size=128", "logger=none", *QUIET), tmp_path)
    best = evaluate_run(tmp_path, tmp_path / "evaluate", checkpoint="best")
    last = evaluate_run(tmp_path, tmp_path / "evaluate", checkpoint="last")
    assert sorted(path.name for path in (tmp_path / "evaluate").iterdir()) == [
        "evaluation_best_step5.json", "evaluation_last_step5.json"
    ]
    assert best["file"] != last["file"] and json.loads(Path(best["file"]).read_text())["checkpoint"].endswith("best.pt")


def test_the_evaluate_config_says_validation_where_the_code_reads_validation_images():
    comments = (ROOT / "conf" / "evaluate.yaml").read_text()
    assert "batch of test images" not in comments and "# test images in routing.pt" not in comments
    assert "a batch of validation images" in comments and "# validation images in routing.pt" in comments


def test_accuracy_and_loss_are_over_examples_not_batches_and_stop_at_max_batches():
    """evaluate() against one float64 pass over the same examples: 11 images in batches of 4 end in a batch of 3,
    which a mean of per-batch means would overweight; ``max_batches=2`` reads the first 8 images, no more."""
    model = SoftMoEVisionTransformer(num_experts=4, slots_per_expert=1, moe_layer_index=[1], img_size=8, patch_size=4,
                                     embed_dim=16, depth=2, num_heads=2, num_classes=3, drop_path_rate=0.5)
    images, labels = torch.randn(11, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 2])
    dataset = torch.utils.data.TensorDataset(images, labels)
    model.eval()
    with torch.no_grad():
        logits = model(images).double()  # [11, classes]
    per_example = torch.nn.functional.cross_entropy(logits, labels, reduction="none")  # [11]
    correct = (logits.argmax(dim=-1) == labels).double()
    assert 0 < correct.sum() < 11  # so that counting the wrong examples would show

    model.train()
    whole = evaluate(model, build_loader(dataset, 4, train=False), torch.device("cpu"))
    assert model.training  # handed back in the mode it came in (drop path on)
    assert whole["loss"] == pytest.approx(per_example.mean().item(), rel=1e-5)
    assert whole["acc"] == pytest.approx(correct.mean().item())
    first_two = evaluate(model, build_loader(dataset, 4, train=False), torch.device("cpu"), max_batches=2)
    assert first_two["loss"] == pytest.approx(per_example[:8].mean().item(), rel=1e-5)
    assert first_two["acc"] == pytest.approx(correct[:8].mean().item())


def test_a_stop_while_a_result_is_written_keeps_the_previous_file_whole(tmp_path):
    """Was written in place: a Ctrl-C or a kill mid-write left a half-written ``routing.pt`` (``torch.load`` refused
    it) or an empty result JSON where the previous one had been."""
    path = tmp_path / "routing.pt"
    torch.save({"step": 1}, path)

    def stopped_halfway(temporary):
        temporary.write_bytes(b"PK\x03\x04 half")
        raise KeyboardInterrupt  # as a Ctrl-C arriving between two writes

    with pytest.raises(KeyboardInterrupt):
        evaluate_command.write_result(path, stopped_halfway)
    assert torch.load(path) == {"step": 1} and list(tmp_path.iterdir()) == [path]  # no temporary left either
    evaluate_command.write_result(path, lambda temporary: torch.save({"step": 2}, temporary))
    assert torch.load(path) == {"step": 2} and list(tmp_path.iterdir()) == [path]
