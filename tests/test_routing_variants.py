"""Routing variants from the config: every conf/routing preset trains, sparse routers add and log their auxiliary
loss and routing statistics, and every value each experiment sweeps composes into a valid run."""

import re
from pathlib import Path

import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import CONF_DIR
from softmoe import SoftMoE, capture_routing, moe_layers
from softmoe.harness.config import check_config
from softmoe.harness.loop import dispatch_panel, train
from softmoe.harness.model import build_model
from softmoe.harness.runs import read_events
from softmoe.sparse import ExpertsChoiceMoE, TokensChoiceMoE

ROUTINGS = sorted(path.stem for path in (Path(CONF_DIR) / "routing").glob("*.yaml"))
EXPERIMENTS = sorted(path.stem for path in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
TINY_RUN = ["trainer.max_steps=2", "trainer.log_every=1", "trainer.batch_size=32", "trainer.eval_batches=1"]
QUIET = ["logger=none", "trainer.progress_bar=false"]
LAYER_CLASS = {"tokens_choice": TokensChoiceMoE, "experts_choice": ExpertsChoiceMoE, "dense": None}  # the rest: SoftMoE


def read_metrics(run_dir):
    return read_events(run_dir)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_every_routing_preset_builds_its_layers(compose_run, routing):
    cfg = compose_run(f"routing={routing}")
    model = build_model(cfg.model, cfg.moe)
    layers = moe_layers(model)
    expected = LAYER_CLASS.get(routing, SoftMoE)
    assert [type(layer) for layer in layers.values()] == ([expected] * 2 if expected else [])
    if expected is SoftMoE:
        modes = {(layer.dispatch_mode, layer.combine_mode) for layer in layers.values()}
        assert modes == {(cfg.moe.dispatch, cfg.moe.combine)}
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("router", ["soft", "tokens_choice", "experts_choice"])
def test_each_router_trains_and_logs_its_routing(compose_run, tmp_path, router):
    assert train(compose_run(f"routing={router}", *TINY_RUN, *QUIET), tmp_path).steps == 2
    train_events = [event for event in read_metrics(tmp_path) if "train/loss" in event]
    assert len(train_events) == 2
    sparse = router != "soft"
    for event in train_events:
        assert ("train/aux_loss" in event) == sparse
        for block in (2, 3):
            assert f"routing/block{block}/router_scale" in event
            assert (f"routing/block{block}/dropped_fraction" in event) == sparse
            if sparse:
                assert 0 <= event[f"routing/block{block}/dropped_fraction"] <= 1
                assert 0 < event[f"routing/block{block}/expert_load_entropy"] <= 1
                load = f"routing/block{block}/expert_load"
                assert 0 <= event[f"{load}_min"] <= 1 / 16 <= event[f"{load}_max"]
    if router == "tokens_choice":  # V-MoE's importance + load losses, > 0 unless perfectly balanced
        assert all(event["train/aux_loss"] > 0 for event in train_events)
    if router == "experts_choice":  # needs no auxiliary loss
        assert all(event["train/aux_loss"] == 0 for event in train_events)


@pytest.mark.slow
def test_a_sparse_layer_with_a_capacity_factor_records_its_routing_at_that_capacity(compose_run, tmp_path):
    # capacity ceil(1.5 * 16 tokens / 16 experts) = 2 != slots_per_expert: was recorded by no capture, so no routing
    # statistics, no dispatch maps, and the routing notebook failed on a KeyError
    cfg = compose_run("routing=experts_choice", "moe.capacity_factor=1.5", *TINY_RUN, *QUIET)
    train(cfg, tmp_path)
    event = next(event for event in read_metrics(tmp_path) if "train/loss" in event)
    assert 0 <= event["routing/block2/dispatch_entropy"] <= 1
    assert 0 <= event["routing/block2/dropped_fraction"] < 1
    assert event["routing/block2/expert_load_entropy"] == pytest.approx(1)  # every expert full by construction
    model = build_model(cfg.model, cfg.moe)
    with capture_routing(model) as records:
        model(torch.zeros(3, 1, 8, 8))
    assert records["blocks.2.mlp"].dispatch.shape == (3, 16, 16, 2)  # [b, m, n, capacity]
    assert dispatch_panel(model, torch.zeros(1, 8, 8), torch.device("cpu")) is not None


@pytest.mark.slow
def test_aux_loss_weight_changes_the_router_update(compose_run, tmp_path):
    routers = []
    for weight in (0, 100):
        cfg = compose_run("routing=tokens_choice", f"moe.aux_loss_weight={weight}", "trainer.max_steps=1", *QUIET)
        train(cfg, tmp_path / str(weight))
        weights = torch.load(tmp_path / str(weight) / "last.pt", weights_only=True)["model"]
        routers.append(weights["blocks.3.mlp.router_weight"])
    assert not torch.allclose(*routers)


def swept_values(sweeper_params):
    """Each ``key=value`` one sweep's parameters expand to, read with Hydra's own override parser."""
    parser = OverridesParser.create()
    for key, values in sweeper_params.items():
        override = parser.parse_override(f"{key}={values}")
        if override.is_sweep_override():
            yield from (f"{key}={value}" for value in override.sweep_string_iterator())
        else:  # a single value, written back as an override would (null, not Python's None)
            yield f"{key}={override.get_value_element_as_str()}"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_an_experiment_that_sweeps_runs_as_a_sweep_with_or_without_dash_m(compose_run, experiment):
    cfg = compose_run(f"experiment={experiment}", hydra_node=True)
    sweeps = bool(cfg.hydra.sweeper.get("params"))
    assert sweeps == (str(cfg.hydra.mode) == "RunMode.MULTIRUN"), "a sweep file needs hydra.mode: MULTIRUN"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_header_gives_its_command_result_and_run_time(experiment):
    header = [line for line in (Path(CONF_DIR) / "experiment" / f"{experiment}.yaml").read_text().splitlines()
              if line.startswith("#")]
    labels = [line.split(":")[0][2:] for line in header if re.match(r"# (Run|Measured|Time): ", line)]
    assert labels == ["Run", "Measured", "Time"], f"{experiment}.yaml: a header with # Run:, # Measured:, # Time:"
    start, end = (next(i for i, line in enumerate(header) if line.startswith(f"# {label}:")) for label in labels[:2])
    assert any(f"experiment={experiment}" in line for line in header[start:end])  # the Run lines name the file


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_value_an_experiment_sweeps_composes_passes_the_checks_and_builds(compose_run, experiment):
    base = compose_run(f"experiment={experiment}", hydra_node=True)
    for override in swept_values(base.hydra.sweeper.params or {}):
        if "." in override.split("=")[0] or override.startswith("seed="):  # a value: merged, as Hydra would
            cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([override]))
        else:  # a group choice: composed
            cfg = compose_run(f"experiment={experiment}", override)
        if cfg.model.get("upcycle_from"):  # a later stage reads an earlier stage's checkpoint, absent until it ran
            cfg.model.upcycle_from = None
        check_config(cfg)
        with torch.device("meta"):
            build_model(cfg.model, cfg.moe)
