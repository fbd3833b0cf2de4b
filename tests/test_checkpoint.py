"""Checkpoints are written atomically and read without executing code; RNG states and data order round-trip."""

import os
import random
import warnings

import numpy as np
import pytest
import torch

from softmoe.harness import checkpoint
from softmoe.harness.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from softmoe.harness.sampler import ResumableSampler


def state(value):
    return {"format": checkpoint.FORMAT_VERSION, "step": value, "weights": torch.full((3,), float(value))}


def test_a_failed_write_leaves_the_previous_checkpoint_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, state(1))

    def crash_midway(obj, file):
        file.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, state(2))
    assert load_checkpoint(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_the_partial_checkpoints_of_killed_writers_are_removed_by_the_next_save(tmp_path):
    """A kill (SIGKILL, or a second Ctrl-C) during a save left ``.last.pt.<pid>.tmp`` forever, a model's size each."""
    stale = [".last.pt.4242.tmp", ".best.pt.4243.tmp", ".last.prev.pt.4244.tmp"]
    kept = [".notes.tmp", "last.pt.tmp", ".last.dcp.tmp"]  # not a killed writer's checkpoint
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"\x00" * 1000)
    save_checkpoint(tmp_path / "last.pt", state(1), keep_previous=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.pt", *kept])
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1


def test_loading_refuses_a_pickle_that_would_run_code(tmp_path):
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "last.pt"
    torch.save({"format": checkpoint.FORMAT_VERSION, "model": Payload()}, path)  # a real checkpoint file, poisoned
    with pytest.raises(CheckpointError, match="not a readable checkpoint \\(it holds Python objects"):
        load_checkpoint(path)
    assert not marker.exists()


# torch.load's zip reader: "failed finding central directory" for 100 bytes and 100 KB, but an OSError "[Errno 22]
# Invalid argument" for a file cut to a few KB (was reported as such)
@pytest.mark.parametrize("kept", [100, 5_000, 20_000, 100_000])
def test_a_truncated_checkpoint_is_reported_with_its_path(tmp_path, kept):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {**state(1), "weights": torch.ones(250_000)})  # 1 MB
    path.write_bytes(path.read_bytes()[:kept])
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint \\(truncated or damaged"):
        load_checkpoint(path)


@pytest.mark.parametrize("content", [b"not a checkpoint", b"root:x:0:0:root:/root:/bin/bash\n"],
                         ids=["bytes", "a text file"])  # torch.load: a pickle error, "list index out of range"
def test_bytes_torch_save_did_not_write_are_not_taken_for_a_pickle_of_python_objects(tmp_path, content):
    path = tmp_path / "last.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{path}: not a readable checkpoint \\(not a file torch.save wrote\\)$"):
        load_checkpoint(path)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    def draws():
        return random.random(), np.random.rand(), torch.rand(()).item(), np.random.randn()

    np.random.randn()  # leave numpy with a cached Gaussian, part of its state
    save_checkpoint(tmp_path / "rng.pt", {"format": checkpoint.FORMAT_VERSION, "rng": rng_state()})
    expected = draws()
    set_rng_state(load_checkpoint(tmp_path / "rng.pt")["rng"])
    assert draws() == expected


def test_the_sampler_resumes_an_epoch_where_it_stopped():
    sampler = ResumableSampler(20, seed=3)
    sampler.set_epoch(2)
    whole = list(sampler)
    sampler.set_epoch(2, skip=8)
    assert list(sampler) == whole[8:] and len(sampler) == 12
    assert sorted(whole) == list(range(20))
    # epoch e's order is drawn from seed + e: the order every run so far trained on (its figures depend on it)
    assert whole == torch.randperm(20, generator=torch.Generator().manual_seed(3 + 2)).tolist()
    sampler.set_epoch(3)
    assert list(sampler) != whole


def exportable(path):
    path.parent.mkdir()
    save_checkpoint(path, {**state(3), "model": {"weight": torch.ones(2)}, "config": "{}"})
    return path


def test_to_safetensors_writes_the_model_and_refuses_to_replace_a_checkpoint_in_one_line(tmp_path, capsys):
    from safetensors.torch import load_file

    from softmoe.to_safetensors import main as to_safetensors

    last, other = exportable(tmp_path / "run" / "last.pt"), exportable(tmp_path / "copy" / "last.pt")
    kept = last.read_bytes(), other.read_bytes()
    (tmp_path / "read-only").mkdir(mode=0o500)
    refused = {
        # was: both overwrote a training checkpoint with a .safetensors file; that run could no longer resume
        (last, last): f"output {last}: is the checkpoint itself; name a new .safetensors file, e.g. model.safetensors",
        (last, other): f"output {other}: an existing file that is not a .safetensors file, which this would replace; "
                       "name a new file, or a .safetensors file to overwrite",
        # were: a SafetensorError traceback, once the checkpoint was read
        (last, tmp_path / "no" / "m.safetensors"): f"output {tmp_path / 'no' / 'm.safetensors'}: its folder "
                                                   f"{tmp_path / 'no'} does not exist",
        (last, tmp_path): f"output {tmp_path}: a directory; name the .safetensors file to write, e.g. "
                          f"{tmp_path / 'model.safetensors'}",
        (last.parent, tmp_path / "m.safetensors"): f"checkpoint {last.parent}: a directory, not a checkpoint; name a "
                                                   "run's best.pt or last.pt (or a sharded best.dcp or last.dcp "
                                                   "directory)",
    }
    if os.geteuid() != 0:  # root writes anywhere
        refused[last, tmp_path / "read-only" / "m.safetensors"] = (
            f"output {tmp_path / 'read-only' / 'm.safetensors'}: its folder {tmp_path / 'read-only'} is not writable")
    for (source, output), message in refused.items():
        assert to_safetensors([str(source), str(output)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"
    assert (last.read_bytes(), other.read_bytes()) == kept and not (tmp_path / "no").exists()
    for _ in range(2):  # a .safetensors file is replaced
        assert to_safetensors([str(last), str(tmp_path / "model.safetensors")]) == 0
    assert torch.equal(load_file(tmp_path / "model.safetensors")["weight"], torch.ones(2))
    # was: "not a softmoe checkpoint of format 1"
    assert to_safetensors([str(tmp_path / "model.safetensors"), str(tmp_path / "again.safetensors")]) == 2
    assert capsys.readouterr().err == (f"error: checkpoint {tmp_path / 'model.safetensors'}: a .safetensors file, an "
                                       "export already; name the training checkpoint it came from (a run's best.pt "
                                       "or last.pt)\n")


def test_to_safetensors_refuses_named_arguments_with_the_positional_command(tmp_path, capsys, monkeypatch):
    # was: "checkpoint=checkpoint=last.pt: no such file or directory"; and output=m.safetensors wrote a file of
    # that name. The help and errors name "checkpoint" and "output", positional arguments, not keys as evaluate takes
    from softmoe.to_safetensors import main as to_safetensors

    monkeypatch.chdir(tmp_path)
    exportable(tmp_path / "run" / "last.pt")
    usage = "python -m softmoe.to_safetensors run/last.pt m.safetensors"
    for argv in (["checkpoint=run/last.pt", "m.safetensors"], ["run/last.pt", "output=m.safetensors"],
                 ["checkpoint=run/last.pt", "output=m.safetensors"]):
        assert to_safetensors(argv) == 2
        named = next(arg for arg in argv if "=" in arg)
        assert capsys.readouterr().err == (f"error: {named}: this command takes its two paths in order, without "
                                           f"names: {usage}\n")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    assert to_safetensors(["run/last.pt", "m.safetensors"]) == 0


def test_to_safetensors_into_a_folder_that_takes_no_files_is_one_line(tmp_path, capsys, monkeypatch):
    # was: a SafetensorError traceback (exit status 1) after the checkpoint was read; root passes os.access
    from safetensors import SafetensorError

    from softmoe import to_safetensors

    last = exportable(tmp_path / "run" / "last.pt")
    if os.path.isdir("/proc") and os.geteuid() == 0:  # others are refused by the folder check first
        assert to_safetensors.main([str(last), "/proc/m.safetensors"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: output /proc/m.safetensors: could not be written (I/O error: No such file")
        assert err.endswith("; name a .safetensors file in a folder you can write to\n") and err.count("\n") == 1

    def disk_full(tensors, path, metadata):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(to_safetensors, "save_file", disk_full)
    assert to_safetensors.main([str(last), str(tmp_path / "m.safetensors")]) == 2
    assert capsys.readouterr().err == (f"error: output {tmp_path / 'm.safetensors'}: could not be written (I/O error: "
                                       "No space left on device (os error 28)); name a .safetensors file in a folder "
                                       "you can write to\n")


def test_each_unusable_trainer_resume_says_what_is_wrong_and_what_to_do_instead(compose_run, tmp_path):
    # were: "<file>: not a softmoe checkpoint of format 1" without the key or what to name; "resume with the same
    # model or start a new run directory" for trainer.resume, which already starts a new run directory; a
    # .safetensors export read as a checkpoint; "no such checkpoint file, or null"
    import json

    from softmoe.harness.config import check_config
    from softmoe.harness.errors import ConfigError, OtherExperimentError
    from softmoe.harness.resume import resume_checkpoint
    from softmoe.harness.rules import plain

    config = plain(compose_run())
    good = tmp_path / "other" / "last.pt"
    good.parent.mkdir()
    save_checkpoint(good, {**state(3), "config": json.dumps(config)})
    weights, text = tmp_path / "dense.pth", tmp_path / "config.yaml"
    torch.save({"weight": torch.ones(2)}, weights)
    text.write_text("seed: 0\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    instead = "name a run's last.pt, best.pt or last.dcp to start from, or null to start afresh"
    expected = {
        text: f"trainer.resume={text}: not a readable checkpoint (not a file torch.save wrote); {instead}",
        weights: f"trainer.resume={weights}: not a softmoe checkpoint of format 1; {instead}; to start an MoE model "
                 "from a dense ViT's weights, set model.upcycle_from to the file instead",
    }
    for path, message in expected.items():
        with pytest.raises(CheckpointError) as raised:
            resume_checkpoint(run_dir, str(path), config)
        assert str(raised.value) == message
    deeper = {**config, "model": {**config["model"], "depth": config["model"]["depth"] + 1}}
    depth, saved = deeper["model"]["depth"], config["model"]["depth"]
    with pytest.raises(CheckpointError) as raised:
        resume_checkpoint(run_dir, str(good), deeper)
    assert str(raised.value) == (
        f"model.depth={depth}: trainer.resume's checkpoint {good} was saved with model.depth={saved}, another model, "
        f"whose weights this one cannot take; start from it with model.depth={saved}, or set trainer.resume=null to "
        "train afresh")
    with pytest.raises(OtherExperimentError) as raised:  # the run directory's own checkpoint
        resume_checkpoint(good.parent, None, deeper)
    assert str(raised.value) == (
        f"model.depth={depth}: this run directory's checkpoint {good} was saved with model.depth={saved}, and a run "
        f"directory resumes only the experiment it holds; rerun with model.depth={saved}, or give this run a new run "
        "directory (a new hydra.run.dir, or hydra.sweep.dir for a sweep)")
    with pytest.raises(OtherExperimentError) as raised:  # another seed is another run, not this one continued
        resume_checkpoint(good.parent, None, {**config, "seed": 1})
    assert str(raised.value).startswith(f"seed=1: this run directory's checkpoint {good} was saved with seed=0, ")
    # the setting the user typed, not a key it set (both named model.img_size or model.depth, and their suggestion,
    # pasted, failed: model.img_size must equal data.img_size; model.depth=4 alone is not vit_micro)
    for overrides, now, before in ((["data=synthetic"], "data=synthetic", "data=digits"),
                                   (["data.img_size=16"], "data.img_size=16", "data.img_size=8"),
                                   (["model=vit_tiny", "model.patch_size=2"], "model=vit_tiny", "model=vit_micro"),
                                   (["moe=every_other"], "moe=every_other", "moe=last_half")):
        other = plain(compose_run(*overrides))
        with pytest.raises(CheckpointError) as raised:
            resume_checkpoint(run_dir, str(good), other)
        assert str(raised.value).startswith(f"{now}: trainer.resume's checkpoint {good} was saved with {before}, "
                                            f"another model, whose weights this one cannot take; start from it with "
                                            f"{before}, or"), overrides
        with pytest.raises(OtherExperimentError) as raised:
            resume_checkpoint(good.parent, None, other)
        assert str(raised.value).startswith(f"{now}: this run directory's checkpoint {good} was saved with {before}, "
                                            f"and a run directory resumes only the experiment it holds; rerun with "
                                            f"{before}, or"), overrides
    export = tmp_path / "model.safetensors"
    export.write_bytes(b"{}")
    with pytest.raises(ConfigError) as raised:  # refused before anything is read or built
        check_config(compose_run(f"trainer.resume={export}"))
    assert str(raised.value) == (
        f"trainer.resume={export}: an export of a model's weights (python -m softmoe.to_safetensors), not a training "
        "checkpoint: name the last.pt or best.pt it was exported from, or null to start afresh")
    # no path at all: was a TypeError traceback (Path(3)); an empty one was read as the working directory
    for value, shown in ((3, "3"), ("''", "")):
        with pytest.raises(ConfigError) as raised:
            check_config(compose_run(f"trainer.resume={value}"))
        assert str(raised.value) == (
            f"trainer.resume={shown}: no such file or directory; name another run's checkpoint (its last.pt, best.pt "
            "or last.dcp) to start from, or null to start afresh")


# Which checkpoint a rerun continues from, and the run lengths it refuses: fast checks of the rules the end-to-end
# tests of test_train.py and test_reliability.py exercise through whole runs.


def test_a_bare_tensor_named_by_trainer_resume_is_refused_without_a_torch_warning(compose_run, tmp_path):
    # was: "Using a non-tuple sequence for multidimensional indexing" from indexing the tensor by "config" first
    from softmoe.harness.resume import saved_config_only

    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with warnings.catch_warnings(record=True) as warned:  # recorded: as an error it would be caught as a refusal
        warnings.simplefilter("always")
        assert saved_config_only(path) is None
    assert [str(warning.message) for warning in warned] == []


def test_a_run_directorys_own_last_pt_wins_over_trainer_resume_and_a_damaged_one_falls_back(tmp_path, caplog):
    from softmoe.harness.resume import past_the_runs_end

    run_dir, other = tmp_path / "run", tmp_path / "other" / "last.pt"
    run_dir.mkdir()
    assert checkpoint.resume_path(run_dir, None) is None
    assert checkpoint.resume_path(run_dir, str(other)) == other  # a new run directory starts from trainer.resume
    save_checkpoint(run_dir / "last.prev.pt", state(1))
    assert checkpoint.resume_path(run_dir, str(other)) == run_dir / "last.pt"  # a rerun resumes itself
    save_checkpoint(run_dir / "last.pt", state(2))
    assert checkpoint.resume_path(run_dir, str(other)) == run_dir / "last.pt"
    (run_dir / "last.pt").write_bytes((run_dir / "last.pt").read_bytes()[:500])  # cut short by a crash
    loaded, path = checkpoint.load_resume_checkpoint(run_dir / "last.pt")
    assert path == run_dir / "last.prev.pt" and loaded["step"] == 1
    assert "resuming from the checkpoint before it" in caplog.text
    assert past_the_runs_end("a/last.pt", 9, 10) is None  # one step left to train
    assert past_the_runs_end("a/last.pt", 10, 10).startswith("trainer.resume=a/last.pt: that checkpoint is at step "
                                                              "10, already this run's 10 steps;")


@pytest.mark.parametrize("saved, now, refused", [
    ({"max_epochs": 30, "max_steps": None}, {"max_epochs": 20, "max_steps": None},
     "trainer.max_epochs=20: this run directory's checkpoint {path} is of a run of trainer.max_epochs=30, which is "
     "not shortened in place"),
    ({"max_epochs": 30, "max_steps": None}, {"max_epochs": 40, "max_steps": None},
     "trainer.max_epochs=40: this run directory's checkpoint {path} is of a run of trainer.max_epochs=30, which is "
     "not lengthened in place"),
    ({"max_epochs": 30, "max_steps": 45}, {"max_epochs": 3, "max_steps": 45}, None),  # max_epochs unused: same run
    ({"max_epochs": 30, "max_steps": None}, {"max_epochs": 30, "max_steps": 45},
     "trainer.max_steps=45: this run directory's checkpoint {path} is of a run of trainer.max_epochs=30 "
     "trainer.max_steps=null, which is not re-measured in steps in place"),
], ids=["shortened", "lengthened", "max_epochs_unused", "re-measured"])
def test_a_run_directory_keeps_its_length(compose_run, tmp_path, saved, now, refused):
    import json

    from softmoe.harness.errors import OtherExperimentError
    from softmoe.harness.rules import plain

    config = plain(compose_run())
    path = tmp_path / "last.pt"
    before = {**config, "trainer": {**config["trainer"], **saved}}
    after = {**config, "trainer": {**config["trainer"], **now}}
    if refused is None:
        checkpoint.check_same_experiment({"config": json.dumps(before)}, after, path)
        return
    with pytest.raises(OtherExperimentError) as raised:
        checkpoint.check_same_experiment({"config": json.dumps(before)}, after, path)
    assert str(raised.value).startswith(refused.format(path=path))


def test_damaged_bytes_that_begin_like_another_pickle_protocol_are_one_error_and_no_torch_warning(tmp_path):
    """Bytes beginning with pickle's protocol opcode (1 in 256 of random damage) made torch warn in two lines about
    a protocol it did not write, beside the error that says the file is unreadable."""
    from softmoe.upcycle import UnreadableCheckpointError, load_state_dict

    damaged = tmp_path / "last.pt"
    damaged.write_bytes(b"\x80\x9e" + random.Random(0).randbytes(4094))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with pytest.raises(Exception):
            torch.load(damaged, weights_only=True)
        assert any("Detected pickle protocol" in str(warning.message) for warning in seen)  # torch's own, here
        seen.clear()
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(damaged)
        with pytest.raises(UnreadableCheckpointError):
            load_state_dict(damaged)
        assert [str(warning.message) for warning in seen] == []
