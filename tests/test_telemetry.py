"""Telemetry helpers: W&B mode resolution, metrics.jsonl truncation on resume, routing summaries and maps."""

import json
import math

import numpy as np
import pytest
import torch

from softmoe import SoftMoEVisionTransformer, capture_routing
from softmoe.harness.telemetry import (
    dispatch_maps,
    distribution_summary,
    resolve_wandb_mode,
    routing_metrics,
    truncate_after,
)


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


def test_distribution_summary():
    balanced = distribution_summary("u", torch.full((4,), 0.25))
    assert balanced == pytest.approx({"u_min": 0.25, "u_max": 0.25, "u_entropy": 1.0})
    collapsed = distribution_summary("u", torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert collapsed == pytest.approx({"u_min": 0.0, "u_max": 1.0, "u_entropy": 0.0})
    half = distribution_summary("u", torch.tensor([0.5, 0.5, 0.0, 0.0]))
    assert half["u_entropy"] == pytest.approx(math.log(2) / math.log(4))


def test_routing_metrics_and_dispatch_maps_cover_every_moe_block():
    model = SoftMoEVisionTransformer(
        num_experts=4, slots_per_expert=2, moe_layer_index=[0, 2], img_size=8, patch_size=2, embed_dim=16, depth=3, num_heads=2
    )
    images = torch.randn(5, 3, 8, 8)
    with capture_routing(model) as records:
        model(images)
    scalars, distributions = routing_metrics(model, records)
    assert sorted(distributions) == [f"routing/block{b}/{n}" for b in (0, 2) for n in ("expert_utilisation", "slot_utilisation")]
    assert distributions["routing/block2/slot_utilisation"].shape == (8,)
    assert scalars["routing/block0/router_scale"] == 1.0  # initialised to 1
    assert len(scalars) == 2 * 6
    mosaic = dispatch_maps(images[0], records, model, slots=3)
    zoom = 8  # 8-pixel images are drawn 64 pixels tall
    assert mosaic.dtype == np.uint8
    assert mosaic.shape == (2 * 10 * zoom, 4 * 10 * zoom, 3)  # 2 blocks x (image + 3 slots), 1-pixel frames
