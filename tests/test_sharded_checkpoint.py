"""Sharded checkpoints (DCP) that reshard: saved on 4 gloo ranks (FSDP + expert parallelism, 2 x 2), resumed on 2
(FSDP + 2 expert ranks) and then on 1 process; a one-process checkpoint resumed on 4 FSDP ranks. Every resumed run
continues with the losses of an uninterrupted one-process run on the same global batches (float32 tolerance).
And: kill -9 during a sharded save leaves a checkpoint to resume from; of a checkpoint in both formats (a run that
changed strategy), the newer is read; a damaged one names its file, and a run falls back to last.prev.dcp.
"""

import json
import os
import signal
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from test_expert_parallel import assert_passed_on_every_rank, fork_server, run_scenarios
from test_fsdp import FP32, tiny_vit

from softmoe.harness import fsdp, sharded_checkpoint
from softmoe.harness.checkpoint import FORMAT_VERSION, save_checkpoint
from softmoe.harness.context import RunContext
from softmoe.harness.runs import checkpoint_path
from softmoe.parallel import expert_data_mesh, to_expert_parallel
from softmoe.upcycle import load_state_dict as upcycle_source

GLOBAL_BATCH = 8
STEPS = 6  # 2 on 4 ranks, 2 on 2 ranks, 2 on 1 process
SHARED = {}  # set before the ranks start (run_scenarios hands it to them): the directories they read and write


def batch(step):
    generator = torch.Generator().manual_seed(100 + step)
    images = torch.randn(GLOBAL_BATCH, 3, 8, 8, generator=generator)
    return images, torch.randint(0, 3, (GLOBAL_BATCH,), generator=generator)


def optimizer_for(model):
    return torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)


def train_steps(model, optimizer, steps, clip):
    """Steps ``steps`` (their global batches; this rank's share of each); the global mean losses."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    share = GLOBAL_BATCH // world_size
    losses = []
    for step in steps:
        images, labels = batch(step)
        mine = slice(rank * share, (rank + 1) * share)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images[mine]), labels[mine])
        loss.backward()
        clip(model)
        optimizer.step()
        loss = loss.detach()
        if dist.is_initialized():
            dist.all_reduce(loss)
        losses.append(loss.item() / world_size)
    return losses


def sharded_model(expert_parallel_size):
    model, mesh = tiny_vit(seed=dist.get_rank()), None
    if expert_parallel_size:
        mesh = expert_data_mesh("cpu", expert_parallel_size)
        model = to_expert_parallel(model, mesh["expert"].get_group(), data_group=mesh["data"].get_group())
    return fsdp.shard_model(model, "cpu", expert_mesh=mesh), mesh


def clip_sharded(model):
    return fsdp.clip_grad_norm_(model, 0.05)


def clip_single(model):
    return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)


def run_on(world_size, results_dir, scenario):
    results_dir.mkdir()
    results = run_scenarios(results_dir, world_size, {scenario.__name__: scenario}, shared=SHARED)
    assert_passed_on_every_rank(results, scenario.__name__, world_size)


def _write_losses(name, losses):
    if dist.get_rank() == 0:
        with open(os.path.join(SHARED["dir"], name), "w") as file:
            json.dump(losses, file)


def four_ranks_resume_a_one_process_checkpoint_and_save_their_own(rank):
    _four_ranks_resume_a_one_process_checkpoint()
    _four_ranks_fsdp_and_two_by_two_experts_save()


def _four_ranks_fsdp_and_two_by_two_experts_save():
    model, mesh = sharded_model(expert_parallel_size=2)
    optimizer = optimizer_for(model)
    losses = train_steps(model, optimizer, [0], clip_sharded)
    sharded_checkpoint.save(SHARED["dir"], "last.pt", model, optimizer, mesh, {"format": FORMAT_VERSION, "step": 1},
                            keep_previous=True)
    losses += train_steps(model, optimizer, [1], clip_sharded)
    sharded_checkpoint.save(SHARED["dir"], "last.pt", model, optimizer, mesh, {"format": FORMAT_VERSION, "step": 2},
                            keep_previous=True)
    _write_losses("losses_4.json", losses)


def two_ranks_resume_with_two_expert_ranks(rank):
    model, mesh = sharded_model(expert_parallel_size=2)
    optimizer = optimizer_for(model)
    path = sharded_checkpoint.find(SHARED["dir"])
    assert path.name == "last.dcp" and sharded_checkpoint.read_train_state(path)["step"] == 2
    sharded_checkpoint.load(path, model, optimizer, mesh)
    losses = train_steps(model, optimizer, [2, 3], clip_sharded)
    sharded_checkpoint.save(SHARED["dir"], "last.pt", model, optimizer, mesh, {"format": FORMAT_VERSION, "step": 4},
                            keep_previous=True)
    _write_losses("losses_2.json", losses)


def _four_ranks_resume_a_one_process_checkpoint():
    model, mesh = sharded_model(expert_parallel_size=4)  # every rank one expert of each layer, and FSDP
    optimizer = optimizer_for(model)
    saved = torch.load(os.path.join(SHARED["dir"], "single.pt"), weights_only=True)
    sharded_checkpoint.load_full(model, optimizer, mesh, saved["model"], saved["optimizer"])
    _write_losses("losses_1_to_4.json", train_steps(model, optimizer, [2, 3], clip_sharded))


@pytest.mark.slow
def test_resharding_4_to_2_to_1_and_1_to_4_continues_the_uninterrupted_losses(tmp_path):
    SHARED["dir"] = str(tmp_path)
    reference = tiny_vit(seed=0)
    reference_optimizer = optimizer_for(reference)
    expected = train_steps(reference, reference_optimizer, range(STEPS), clip_single)

    # a one-process checkpoint at step 2 (last.pt's model and optimizer state), for 1 -> 4
    one = tiny_vit(seed=0)
    one_optimizer = optimizer_for(one)
    train_steps(one, one_optimizer, [0, 1], clip_single)
    torch.save({"model": one.state_dict(), "optimizer": one_optimizer.state_dict()}, tmp_path / "single.pt")

    run_on(4, tmp_path / "r4", four_ranks_resume_a_one_process_checkpoint_and_save_their_own)
    assert sorted(p.name for p in tmp_path.glob("*.dcp")) == ["last.dcp", "last.prev.dcp"]
    run_on(2, tmp_path / "r2", two_ranks_resume_with_two_expert_ranks)

    single = tiny_vit(seed=3)  # another initialisation: every weight must come from the checkpoint
    optimizer = optimizer_for(single)
    path = sharded_checkpoint.find(tmp_path)
    sharded_checkpoint.load(path, single, optimizer, None)
    whole = sharded_checkpoint.read_model(path)  # the model alone, on one CPU: evaluation, upcycling, export
    assert whole.keys() == single.state_dict().keys()
    assert all(torch.equal(value, whole[key]) for key, value in upcycle_source(path).items())
    resumed_at_1 = train_steps(single, optimizer, [4, 5], clip_single)

    losses = [*json.load(open(tmp_path / "losses_4.json")), *json.load(open(tmp_path / "losses_2.json")), *resumed_at_1]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(expected), **FP32)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(single.state_dict()[key], value, rtol=1e-4, atol=2e-5, msg=lambda m: f"{key}: {m}")

    # 1 -> 4: the one-process checkpoint resumed by 4 ranks (FSDP, and every rank an expert group)
    torch.testing.assert_close(torch.tensor(json.load(open(tmp_path / "losses_1_to_4.json"))),
                               torch.tensor(expected[2:4]), **FP32)


def _save_forever(run_dir):
    """A process saving a large sharded checkpoint over and over (step 1, 2, ...) until it is killed."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])  # 16 MiB of weights
    optimizer = optimizer_for(model)
    model(torch.randn(2, 1024)).sum().backward()
    optimizer.step()
    for step in range(1, 1000):
        with torch.no_grad():
            model[0].bias.fill_(step)
        sharded_checkpoint.save(run_dir, "last.pt", model, optimizer, None, {"format": FORMAT_VERSION, "step": step},
                                keep_previous=True)


@pytest.mark.slow
def test_kill_9_during_a_sharded_save_leaves_a_checkpoint_to_resume_from(tmp_path):
    saver = fork_server().Process(target=_save_forever, args=(str(tmp_path),))  # it runs a backward: no plain fork
    saver.start()
    temporary = tmp_path / ".last.dcp.tmp"
    deadline = time.monotonic() + 60
    try:  # once the first save is complete, kill the process in the middle of another one (each takes ~0.7 s)
        while True:
            assert saver.is_alive(), f"the saving process ended (exit code {saver.exitcode}) before its second save"
            assert time.monotonic() < deadline, "the saving process never started its second save"
            if sharded_checkpoint.find(tmp_path) and temporary.exists():
                os.kill(saver.pid, signal.SIGSTOP)  # held mid-save, however loaded the machine (was: a 0.25 s
                if temporary.exists():  # sleep, in which a save could end: CI's failure at a095023)
                    break
                os.kill(saver.pid, signal.SIGCONT)  # that save ended between the look and the stop: the next one
            time.sleep(0.001)
    finally:
        os.kill(saver.pid, signal.SIGKILL)
        saver.join()
    assert temporary.exists()  # killed during a save: its unfinished directory is left behind
    assert saver.exitcode == -signal.SIGKILL

    path = sharded_checkpoint.find(tmp_path)
    step = sharded_checkpoint.read_train_state(path)["step"]
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(4)])
    optimizer = optimizer_for(model)
    sharded_checkpoint.load(path, model, optimizer, None)
    assert (model[0].bias == step).all()
    assert optimizer.state_dict()["state"][0]["step"] == 1  # the Adam moments came back too

    # the next save clears the killed one's leftovers; so does a crash between its two renames
    sharded_checkpoint.save(tmp_path, "last.pt", model, optimizer, None, {"format": FORMAT_VERSION, "step": 99},
                            keep_previous=True)
    assert not temporary.exists()
    (tmp_path / "last.prev.dcp").rename(tmp_path / "gone")
    (tmp_path / "last.dcp").rename(tmp_path / "last.prev.dcp")  # the moment between the renames
    assert sharded_checkpoint.find(tmp_path) == tmp_path / "last.prev.dcp"
    assert sharded_checkpoint.read_train_state(tmp_path / "last.prev.dcp")["step"] == 99


def test_of_a_checkpoint_in_both_formats_the_newer_one_is_read(tmp_path):
    """A run resumed in its own directory under another strategy leaves ``best.pt`` and ``best.dcp`` side by side: the
    one written last holds the best model (the trainer tests it, evaluate reads it)."""
    model = torch.nn.Linear(2, 2)
    assert sharded_checkpoint.latest(tmp_path, "best.pt") is None
    save_checkpoint(tmp_path / "best.pt", {"format": FORMAT_VERSION, "step": 1, "model": model.state_dict()})
    assert sharded_checkpoint.latest(tmp_path, "best.pt") == checkpoint_path(tmp_path, "best") == tmp_path / "best.pt"
    sharded_checkpoint.save(tmp_path, "best.pt", model, optimizer_for(model), None, {"format": FORMAT_VERSION},
                            keep_previous=False)
    run = SimpleNamespace(run_dir=tmp_path)  # RunContext.best_model reads nothing else of the run
    for newer, older in (("best.dcp", "best.pt"), ("best.pt", "best.dcp")):
        written = (tmp_path / newer).stat().st_mtime_ns
        os.utime(tmp_path / older, ns=(written - 10**9, written - 10**9))  # a second earlier
        assert sharded_checkpoint.latest(tmp_path, "best.pt") == checkpoint_path(tmp_path, "best") == tmp_path / newer
    assert RunContext.best_model(run).keys() == model.state_dict().keys()  # best.pt's model, for load_state
    os.utime(tmp_path / "best.pt", ns=(written - 2 * 10**9, written - 2 * 10**9))
    assert RunContext.best_model(run) == str(tmp_path / "best.dcp")  # its directory: each rank reads its pieces


def test_of_both_formats_the_later_step_is_read_whatever_the_files_times(tmp_path):
    """A copied run directory (``cp -r``) gives every file the copy's time: a stale step 3 ``last.dcp`` written after
    a step 5 ``last.pt`` was resumed from, and its best evaluated (was by the files' times alone)."""
    model = torch.nn.Linear(2, 2)
    for single_step, sharded_step in ((5, 3), (3, 5)):
        run_dir = tmp_path / f"{single_step}_{sharded_step}"
        run_dir.mkdir()
        for name in ("last.pt", "best.pt"):
            state = {"format": FORMAT_VERSION, "step": single_step, "model": model.state_dict()}
            save_checkpoint(run_dir / name, state)
            sharded_checkpoint.save(run_dir, name, model, optimizer_for(model), None,
                                    {"format": FORMAT_VERSION, "step": sharded_step}, keep_previous=False)
            os.utime(run_dir / name.replace(".pt", ".dcp"), ns=(10**18, 10**18))  # the sharded one "written" last
        later = ".pt" if single_step > sharded_step else ".dcp"
        assert sharded_checkpoint.latest_last(run_dir) == run_dir / f"last{later}"
        assert sharded_checkpoint.latest(run_dir, "best.pt") == run_dir / f"best{later}"


def test_a_sharded_checkpoints_train_state_named_as_a_checkpoint_is_one_line(tmp_path, compose_run, capsys):
    """train_state.pt is in a checkpoint's format, without the model: trainer.resume ended in a TypeError traceback
    (exit 1, its run directory left behind), to_safetensors in an AttributeError."""
    from softmoe import to_safetensors
    from softmoe.harness.config import ConfigError, check_config

    state = save_twice(tmp_path) / sharded_checkpoint.TRAIN_STATE
    why = (f"the train state (its step, RNG and config; the model is in the shards beside it) of the sharded "
           f"checkpoint {state.parent}: name the directory itself, {state.parent}")
    with pytest.raises(ConfigError) as raised:
        check_config(compose_run(f"trainer.resume={state}"))
    assert str(raised.value) == f"trainer.resume={state}: {why}"
    assert to_safetensors.main([str(state), str(tmp_path / "model.safetensors")]) == 2
    assert capsys.readouterr().err == f"error: checkpoint {state}: {why}\n"
    # a checkpoint of its own in such a folder is read as one (the first version of this rule refused it)
    (state.parent / "model.pt").write_bytes((tmp_path / "best.pt").read_bytes())
    assert sharded_checkpoint.train_state_not_a_checkpoint(state.parent / "model.pt") is None
    # its index and its shards (were: "truncated or damaged", "not a file torch.save wrote")
    for part, what in ((".metadata", "the index of the shards"), ("__0_0.distcp", "one shard of the model")):
        assert to_safetensors.main([str(state.parent / part), str(tmp_path / "model.safetensors")]) == 2
        assert capsys.readouterr().err == (f"error: checkpoint {state.parent / part}: {what} of the sharded checkpoint "
                                           f"{state.parent}: name the directory itself, {state.parent}\n")


def save_twice(run_dir):
    """A run directory's last.dcp (step 2) and the last.prev.dcp (step 1) kept beside it, and best.pt."""
    model = torch.nn.Linear(2, 2)
    optimizer = optimizer_for(model)
    for step in (1, 2):
        sharded_checkpoint.save(run_dir, "last.pt", model, optimizer, None, {"format": FORMAT_VERSION, "step": step,
                                "config": "{}"}, keep_previous=True)
    save_checkpoint(run_dir / "best.pt", {"format": FORMAT_VERSION, "step": 1, "model": model.state_dict()})
    return run_dir / "last.dcp"


DAMAGES = {  # what is done to last.dcp, and what the message says of it
    "a shard deleted": (lambda path: (path / "__0_0.distcp").unlink(),
                        "__0_0.distcp: missing (.metadata lists 1 shard file the saving ranks wrote)"),
    "a shard truncated": (lambda path: os.truncate(path / "__0_0.distcp", 10),
                          "__0_0.distcp: truncated (10 bytes, where .metadata records {size})"),
    "the index deleted": (lambda path: (path / ".metadata").unlink(), ".metadata: missing (DCP's index of the shards)"),
    "the index truncated": (lambda path: os.truncate(path / ".metadata", 10), ".metadata: unreadable ("),
    "the train state deleted": (lambda path: (path / "train_state.pt").unlink(),
                                "train_state.pt: missing (rank 0's step, RNG and config)"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_sharded_checkpoint_names_the_file_what_is_wrong_and_what_to_do(tmp_path, damage, caplog):
    # were: a FileNotFoundError or EOFError traceback from inside DCP; and a last.dcp without its .metadata was
    # skipped as if absent, so the rerun started again at step 0 in the run's own directory
    from softmoe.harness.resume import sharded_resume_checkpoint

    last = save_twice(tmp_path)
    size = (last / "__0_0.distcp").stat().st_size
    damage_it, what = DAMAGES[damage]
    damage_it(last)
    what = f"{last}/{what.format(size=size)}"
    with pytest.raises(sharded_checkpoint.CheckpointError) as error:  # to_safetensors, which takes any path
        sharded_checkpoint.read_checkpoint(last)
    assert str(error.value).startswith(what)
    assert str(error.value).endswith("; restore the file from a copy of last.dcp, or name another of the run's "
                                     "checkpoints (best.pt, last.prev.dcp)")
    with pytest.raises(sharded_checkpoint.CheckpointError) as error:  # evaluate's checkpoint=last: best or last only
        sharded_checkpoint.read_checkpoint(checkpoint_path(tmp_path, "last"))  # (was: last.prev.dcp, which it refuses)
    assert str(error.value).startswith(what)
    assert str(error.value).endswith("; restore the file from a copy of last.dcp, or set checkpoint=best")
    # the run continues from last.prev.dcp, as from the last.prev.pt beside a damaged last.pt
    assert sharded_checkpoint.find(tmp_path) == last
    checkpoint, start_from = sharded_resume_checkpoint(last, tmp_path)
    assert (start_from, checkpoint["step"]) == (tmp_path / "last.prev.dcp", 1)
    assert f"; resuming from the checkpoint before it, {tmp_path / 'last.prev.dcp'}" in caplog.text
    (tmp_path / "last.prev.dcp" / "__0_0.distcp").unlink()
    with pytest.raises(sharded_checkpoint.CheckpointError) as error:
        sharded_resume_checkpoint(last, tmp_path)
    assert str(error.value).startswith(what)
    assert str(error.value).endswith("; the run cannot continue from last.dcp: restore the file from a copy, or "
                                     "start a new run directory (a new hydra.run.dir) with "
                                     f"trainer.resume={tmp_path / 'best.pt'}")
