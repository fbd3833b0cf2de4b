"""Telemetry helpers: W&B mode resolution, metrics.jsonl truncation on resume, routing summaries and maps."""

import json
import logging
import math
import os
import threading
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from conftest import wandb_closed_records
from softmoe import SoftMoEVisionTransformer, capture_routing, moe_layers
from softmoe.harness.distributed import Distributed
from softmoe.harness.figures import plot_dispatch_maps, render
from softmoe.harness.telemetry import (
    RankZeroTelemetry,
    Telemetry,
    dispatch_maps,
    distribution_summary,
    offline_run_dir,
    offline_run_dirs,
    resolve_wandb_mode,
    routing_metrics,
    truncate_after,
    wait_for_free_offline_dir,
)
from softmoe.harness.wandb_files import wait_for_exit_record
from test_expert_parallel import free_port, start_two_ranks


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    empty = tmp_path / "netrc"
    empty.write_text("")
    monkeypatch.setenv("NETRC", str(empty))
    return empty


def test_auto_mode_is_offline_without_credentials_and_online_with_them(no_credentials, monkeypatch):
    assert resolve_wandb_mode("auto") == ("offline", "no W&B credentials found")
    no_credentials.write_text("machine api.wandb.ai\n  login user\n  password 0123456789\n")
    assert resolve_wandb_mode("auto")[0] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto") == ("disabled", "WANDB_MODE")
    assert resolve_wandb_mode("offline") == ("offline", "logger.mode=offline")  # an explicit mode beats WANDB_MODE


def test_resume_drops_the_metrics_logged_after_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "epoch": 1}) + "\n" for s in (5, 10, 10, 15, 20)))
    truncate_after(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10, 10]


def test_resume_drops_damaged_bytes_with_a_warning_instead_of_failing(tmp_path, caplog):
    # was: a UnicodeDecodeError traceback after "resuming from ..." (bytes that are not UTF-8 appended to the file)
    path = tmp_path / "metrics.jsonl"
    events = "".join(json.dumps({"step": s, "epoch": 1}) + "\n" for s in (5, 10, 15))
    path.write_bytes(events.encode() + b"\xff\xfe garbage\n\x80\x81" + b'{"step": 7}\n' + b'{"step": 9, "ep')
    with caplog.at_level(logging.WARNING, logger="softmoe.harness.telemetry"):
        truncate_after(path, 10)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [5, 10]
    assert f"{path}: dropped 2 lines holding no event (damaged bytes?)" in caplog.text  # (and a torn last line)


def test_an_offline_attempt_waits_for_a_second_in_which_no_attempt_of_its_run_started(tmp_path):
    started = time.time()
    taken = offline_run_dir(tmp_path, "run1", started)
    assert taken.name == time.strftime("offline-run-%Y%m%d_%H%M%S-run1", time.localtime(started))  # W&B's name
    taken.mkdir()  # an attempt of run1 started this second
    wait_for_free_offline_dir(tmp_path, "run1")
    assert math.floor(time.time()) > math.floor(started)
    assert not offline_run_dir(tmp_path, "run1", time.time()).exists()


@pytest.mark.slow  # W&B starts its service process
def test_attempts_of_a_run_resumed_within_one_second_keep_their_own_offline_directories(tmp_path):
    logger = {"backend": "wandb", "mode": "offline", "project": "softmoe", "entity": None, "group": None,
              "name": None, "tags": [], "log_images": False}

    def attempt(run_id, steps):  # what train() does with its telemetry: resume, log, commit at a checkpoint, finish
        telemetry = Telemetry(tmp_path, logger, {"seed": 0}, resume_step=steps[0] - 1, run_id=run_id)
        sent, send = [], telemetry.wandb.log  # the real W&B run's log, its steps recorded on the way
        telemetry.wandb.log = lambda values, step: (sent.append(step), send(values, step=step))
        for step in steps:  # a checkpoint after each step: each commit sends only what was logged since the last
            telemetry.log(step, 1, {"train/loss": 1.0 / step})
            telemetry.commit()
        assert sent == steps  # was not seen: W&B drops a step sent again, so its file reads the same
        command = telemetry.sync_command
        telemetry.finish()
        return telemetry.run_id, command

    run_id, _ = attempt(None, [1, 2])  # starts W&B's service: later attempts start within a fraction of a second
    time.sleep(1.01 - time.time() % 1)  # so the next two start early in one second: preempted and resumed at once
    attempt(run_id, [3, 4])
    _, command = attempt(run_id, [5, 6])
    parts = offline_run_dirs(tmp_path / "wandb", run_id)
    assert parts == sorted((tmp_path / "wandb").glob("offline-run-*")) and len(parts) == 3  # one each, no "-1"
    assert command == "wandb sync " + " ".join(str(part) for part in parts)
    logged = []
    for part in parts:
        records = wandb_closed_records(part / f"run-{run_id}.wandb")
        logged.append([r.history.step.num for r in records if r.WhichOneof("record_type") == "history"])
    assert logged == [[1, 2], [3, 4], [5, 6]]


@pytest.mark.slow  # W&B starts its service process
def test_waiting_for_a_runs_exit_record_sees_a_file_still_being_written(tmp_path):
    logger = {"backend": "wandb", "mode": "offline", "project": "softmoe", "entity": None, "group": None,
              "name": None, "tags": [], "log_images": False}
    (tmp_path / "run").mkdir()
    telemetry = Telemetry(tmp_path / "run", logger, {"seed": 0}, resume_step=0)
    telemetry.log(1, 1, {"train/loss": 1.0})
    telemetry.commit()
    telemetry.finish()  # returns with the file closed (wandb_closed_records asserts it)
    (written,) = (tmp_path / "run").glob("wandb/offline-run-*/run-*.wandb")
    whole = written.read_bytes()
    assert wandb_closed_records(written)

    writing = tmp_path / "offline-run-x" / written.name
    writing.parent.mkdir()
    writing.write_bytes(whole[:-1])  # its last record, the exit record, not yet whole
    assert not wait_for_exit_record(writing.parent, timeout_s=0.3)
    started = time.monotonic()  # before the timer starts: the wait below lasts at least its 0.5 s
    threading.Timer(0.5, writing.write_bytes, [whole]).start()  # W&B's service finishing the file
    assert wait_for_exit_record(writing.parent, timeout_s=30)
    assert 0.4 < time.monotonic() - started < 30


def test_distribution_summary():
    balanced = distribution_summary("u", torch.full((4,), 0.25))
    assert balanced == pytest.approx({"u_min": 0.25, "u_max": 0.25, "u_entropy": 1.0})
    collapsed = distribution_summary("u", torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert collapsed == pytest.approx({"u_min": 0.0, "u_max": 1.0, "u_entropy": 0.0})
    half = distribution_summary("u", torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert half["u_entropy"] == pytest.approx(math.log(2) / math.log(4))


def routed_tiny_vit(batch):
    """A 3-block Soft MoE ViT (MoE in blocks 0 and 2, 4 experts x 2 slots), a batch and its recorded routing."""
    model = SoftMoEVisionTransformer(
        num_experts=4, slots_per_expert=2, moe_layer_index=[0, 2], img_size=8, patch_size=2, embed_dim=16, depth=3,
        num_heads=2,
    )
    images = torch.randn(batch, 3, 8, 8)
    with capture_routing(model) as records:
        model(images)
    return model, images, records


def test_routing_metrics_and_dispatch_maps_cover_every_moe_block():
    model, images, records = routed_tiny_vit(5)
    scalars, distributions = routing_metrics(model, records)
    names = ("expert_utilisation", "slot_utilisation")
    assert sorted(distributions) == [f"routing/block{b}/{n}" for b in (0, 2) for n in names]
    assert distributions["routing/block2/slot_utilisation"].shape == (8,)
    assert scalars["routing/block0/router_scale"] == 1.0  # initialised to 1
    assert len(scalars) == 2 * 6
    mosaic = dispatch_maps(images[0], records, model, slots=3)
    assert mosaic.dtype == np.uint8 and mosaic.ndim == 3 and mosaic.shape[2] == 3


def test_wandb_dispatch_maps_are_the_notebooks_figure_on_one_labelled_colour_scale():
    model, images, records = routed_tiny_vit(2)
    figure = plot_dispatch_maps(images[:1], records, model, num_slots=3)
    assert np.array_equal(dispatch_maps(images[0], records, model, slots=3), render(figure))  # what W&B receives
    maps = [image for ax in figure.axes for image in ax.get_images() if image.get_cmap().name == "inferno"]
    assert len(maps) == 2 * 3 and len({image.get_clim() for image in maps}) == 1  # 2 blocks x 3 slots, one scale
    colorbar = figure.axes[-1]
    assert colorbar.get_ylabel() == "dispatch weight"
    assert [text.get_text() for text in colorbar.texts] == ["uniform 1/m = 1/17"]  # 16 patches and the class token
    assert [ax.get_title() for ax in figure.axes[1:4]] == ["e0 s0", "e2 s0", "e3 s1"]  # slots spread over all n·p


def test_logged_routing_statistics_match_a_float64_recomputation_from_the_captured_weights():
    """Each block's logged numbers recomputed in numpy float64 from the weights the forward pass recorded (the
    dispatch entropy is over tokens per slot, the combine entropy over all n·p slots per token, never swapped), and
    the learnt router scale read from its layer."""
    model, _, records = routed_tiny_vit(5)
    with torch.no_grad():
        for index, layer in enumerate(moe_layers(model).values()):
            layer.scale.fill_(2.5 + index)  # as training leaves the learnt logit scale: not its initial 1
    scalars, distributions = routing_metrics(model, records)
    assert [scalars[f"routing/block{b}/router_scale"] for b in (0, 2)] == [2.5, 3.5]
    for name, record in records.items():
        prefix = f"routing/block{name.split('.')[1]}/"
        dispatch, combine = (w.detach().double().numpy() for w in (record.dispatch, record.combine))
        b, m, n, p = dispatch.shape  # [b, m, n, p]
        dispatch, combine = dispatch.reshape(b, m, n * p), combine.reshape(b, m, n * p)
        per_slot = -(dispatch * np.log(dispatch)).sum(axis=1) / np.log(m)  # [b, n·p]
        per_token = -(combine * np.log(combine)).sum(axis=2) / np.log(n * p)  # [b, m]
        slot_shares = combine.sum(axis=(0, 1)) / combine.sum()  # [n·p]
        expert_shares = slot_shares.reshape(n, p).sum(axis=1)  # [n]
        assert scalars[prefix + "dispatch_entropy"] == pytest.approx(per_slot.mean(), rel=1e-9)
        assert scalars[prefix + "combine_entropy"] == pytest.approx(per_token.mean(), rel=1e-9)
        assert scalars[prefix + "dispatch_max"] == pytest.approx(dispatch.max(axis=1).mean(), rel=1e-9)
        assert scalars[prefix + "combine_max"] == pytest.approx(combine.max(axis=2).mean(), rel=1e-9)
        effective = np.exp(-(expert_shares * np.log(expert_shares)).sum())
        assert scalars[prefix + "effective_experts"] == pytest.approx(effective, rel=1e-9)
        np.testing.assert_allclose(distributions[prefix + "slot_utilisation"].double().numpy(), slot_shares, rtol=1e-6)
        np.testing.assert_allclose(distributions[prefix + "expert_utilisation"].double().numpy(), expert_shares,
                                   rtol=1e-6)
        assert scalars[prefix + "dispatch_entropy"] != pytest.approx(scalars[prefix + "combine_entropy"])


def _log_one_event_on_rank(rank, run_dir, port):
    """Rank ``rank`` of 2 (gloo, CPU) logs its own numbers at step 7, as every rank of a data-parallel run does."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        writer = Telemetry(run_dir, {"backend": "none"}, {}) if rank == 0 else None
        telemetry = RankZeroTelemetry(writer, Distributed(rank=rank, world_size=2, data_parallel=True))
        shares = torch.tensor([1.0, 0.0]) if rank == 0 else torch.tensor([0.0, 1.0])  # each rank one slot
        experts = torch.tensor([1.0, 0.0, 0.0]) if rank == 0 else torch.tensor([0.0, 1.0, 0.0])  # one expert each
        scalars = {"train/loss": 1.0 + rank, "train/throughput": 100.0 * (rank + 1),
                   "routing/block0/effective_experts": 1.0}  # each rank's: exp(entropy) of its own utilisation
        distributions = {"routing/block0/slot_utilisation": shares, "routing/block0/expert_utilisation": experts}
        telemetry.log(7, 2, scalars, distributions)
        telemetry.finish()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # starts two processes
def test_rank_zero_logs_the_mean_over_ranks_and_the_summed_throughput(tmp_path):
    """Two ranks' numbers, as rank 0 writes them: losses and distributions averaged, images per second summed (the
    whole job's rate), and the effective experts of the averaged utilisation (2: the whole batch used two experts;
    was the ranks' mean, 1)."""
    start_two_ranks(_log_one_event_on_rank, tmp_path, free_port())
    (event,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert event == pytest.approx({
        "step": 7, "epoch": 2, "train/loss": 1.5, "train/throughput": 300.0,
        "routing/block0/slot_utilisation_min": 0.5, "routing/block0/slot_utilisation_max": 0.5,
        "routing/block0/slot_utilisation_entropy": 1.0, "routing/block0/expert_utilisation_min": 0.0,
        "routing/block0/expert_utilisation_max": 0.5,
        "routing/block0/expert_utilisation_entropy": math.log(2) / math.log(3),
        "routing/block0/effective_experts": 2.0,
    })
