"""``trainer.init_device=meta``: the model built on the meta device, laid out, and each rank's pieces drawn one whole
parameter at a time (softmoe/harness/meta_init.py).

On one process: every parameter has the default build's distribution; the draws depend on the seed only; a
parameter no init writes, or a resumed run's weights, are never left to chance. On 4 gloo ranks (one fork for every
scenario, see tests/test_expert_parallel.py's ``run_scenarios``): FSDP + 2 x 2 and 1 x 4 expert parallelism start
from the one-process build's weights bit for bit and train to its losses; upcycling gives the same weights on every
layout; and an allocation meter around the build shows no rank held more than its pieces and one whole parameter.
"""

import math
import os
import weakref

import pytest
import torch
import torch.distributed as dist
from test_expert_parallel import assert_passed_on_every_rank, run_scenarios
from test_fsdp import FP32, full_state, train
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from softmoe.harness import fsdp
from softmoe.harness.distributed import Distributed
from softmoe.harness.errors import ConfigError
from softmoe.harness.meta_init import draw_parameter
from softmoe.harness.model import build_model
from softmoe.harness.rules import plain
from softmoe.harness.state import build_state

# A ViT whose parameters are mostly experts, in many tensors of equal size: the whole model (156 KiB) is several
# times one rank's quarter plus its largest parameter (an expert bank, 16 KiB).
SMALL = [
    "model.embed_dim=16", "model.num_heads=2", "model.mlp_ratio=2", "model.drop_path_rate=0.0", "moe=all",
    "moe.num_experts=8", "scheduler=constant", "trainer.init_device=meta",
]
WORLD_SIZE, PER_RANK_BATCH = 4, 2
SHARED = {}  # set before the ranks start (run_scenarios hands it to them): the configs and the one-process results


def configs(compose_run, *overrides):
    return plain(compose_run(*SMALL, *overrides))


def one_process(config):
    """The model ``build_state`` gives one process (no process group needed)."""
    return build_state(config, Distributed(), total_steps=3)[0].model


def batch():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD_SIZE * PER_RANK_BATCH, 1, 8, 8, generator=generator)
    return images, torch.randint(0, 10, (WORLD_SIZE * PER_RANK_BATCH,), generator=generator)


# One process ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides", [["+model.init_values=0.1"], ["moe=dense"], ["routing=tokens_choice"]],
                         ids=["soft_with_layer_scale", "dense", "tokens_choice"])
def test_each_parameter_has_the_default_builds_distribution(compose_run, overrides):
    from scipy.stats import ks_2samp

    config = plain(compose_run(*overrides))  # vit_micro: tensors of up to 262,144 draws
    torch.manual_seed(0)
    default = build_model(config["model"], config["moe"]).state_dict()
    meta = one_process({**config, "trainer": {**config["trainer"], "init_device": "meta"}}).state_dict()
    assert list(meta) == list(default)
    for name, expected in default.items():
        drawn = meta[name]
        if (expected == expected.flatten()[0]).all():  # ones, zeros, the router's scale, layer scale
            assert torch.equal(drawn, expected), name
        else:  # the same distribution: a two-sample Kolmogorov-Smirnov test, its threshold low enough that another
            # CPU's draws are unlikely to fail it, yet every tensor of 1,024 draws or more rejects twice the spread
            assert not torch.equal(drawn, expected), name  # ... and never the default build's numbers
            drawn, expected = drawn.flatten().numpy(), expected.flatten().numpy()
            assert ks_2samp(drawn, expected).pvalue > 1e-6, name
            assert drawn.size < 1024 or ks_2samp(drawn, 2 * expected).pvalue < 1e-6, name


def test_the_draws_depend_on_the_seed_alone_and_leave_the_runs_generators_alone(compose_run):
    config = configs(compose_run)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    first = one_process(config).state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(8)  # the global stream plays no part
    again, other = one_process(config).state_dict(), one_process({**config, "seed": 1}).state_dict()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not any(torch.equal(first[name], other[name]) for name in first if first[name].unique().numel() > 1)


def test_a_parameter_the_init_leaves_unset_stops_the_build_naming_it(compose_run):
    config = configs(compose_run)
    with torch.device("meta"):
        template = build_model(config["model"], config["moe"], upcycle_weights=False)
    template.blocks[0].register_parameter("extra", torch.nn.Parameter(torch.empty(3)))  # nothing initialises it
    with pytest.raises(ConfigError) as raised:
        draw_parameter(template, "blocks.0.extra", torch.device("cpu"), seed=0)
    assert str(raised.value) == (
        "trainer.init_device=meta: the init of SoftMoEVisionTransformer leaves blocks.0.extra (partly) unset, so it "
        "cannot be drawn on its own; use trainer.init_device=cpu"
    )


def test_a_resumed_run_draws_nothing_and_its_checkpoint_writes_every_weight(compose_run):
    config = configs(compose_run)
    model = build_state(config, Distributed(), total_steps=3, resuming=True)[0].model
    assert all(p.isnan().all() for p in model.parameters())  # never random: a weight left unwritten is seen
    saved = one_process(config).state_dict()
    model.load_state_dict(saved)
    assert all(torch.equal(value, saved[name]) for name, value in model.state_dict().items())


@pytest.fixture(scope="module")
def dense_checkpoint(compose_run, tmp_path_factory):
    """A dense ViT of SMALL's architecture, saved as upcycling reads it."""
    config = configs(compose_run, "moe=dense")
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("dense") / "dense.pt"
    torch.save(build_model(config["model"], config["moe"]).state_dict(), path)
    return path


def test_upcycling_copies_the_dense_weights_and_draws_only_the_routers(compose_run, dense_checkpoint):
    config = configs(compose_run, f"model.upcycle_from={dense_checkpoint}", "model.upcycle_noise_std=0.01")
    upcycled, fresh = one_process(config).state_dict(), one_process(configs(compose_run)).state_dict()
    dense = torch.load(dense_checkpoint, weights_only=True)
    for name, value in upcycled.items():
        if name.endswith((".mlp.phi", ".mlp.scale")):  # the routers: meta init's own draws
            assert torch.equal(value, fresh[name]), name
        elif ".mlp.experts." in name:  # each expert: its block's dense MLP, the weights plus their own noise
            source = dense[name.replace(".experts.", ".").replace("_weight", ".weight").replace("_bias", ".bias")]
            if name.endswith("_bias"):
                assert torch.equal(value, source.expand_as(value)), name
            else:
                noise = value - source.T
                assert 0.009 < noise.std() < 0.011 and not torch.equal(noise[0], noise[1]), name
        else:
            assert torch.equal(value, dense[name]), name


def test_a_dense_checkpoint_of_another_dataset_is_fitted_as_the_default_build_fits_it(compose_run, tmp_path):
    """A dense ViT of 16 px RGB images and 100 classes: the meta build resamples and adapts what the default build
    does (softmoe.upcycle.fit_dense_state); the classifier is drawn, as the default build keeps its init."""
    dense = configs(compose_run, "moe=dense", "data.img_size=16", "data.in_chans=3", "data.num_classes=100")
    path = tmp_path / "dense.pt"
    torch.save(build_model(dense["model"], dense["moe"]).state_dict(), path)
    config = configs(compose_run, f"model.upcycle_from={path}")
    meta = one_process(config).state_dict()
    default_config = {**config, "trainer": {**config["trainer"], "init_device": "cpu"}}
    default = build_model(default_config["model"], default_config["moe"]).state_dict()
    assert meta["pos_embed"].shape == (1, 16, 16) and meta["head.weight"].shape == (10, 16)
    for name in ("pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.experts.fc1_weight"):
        assert torch.equal(meta[name], default[name]), name
    assert not torch.equal(meta["head.weight"], default["head.weight"])  # drawn: meta init's own numbers


# Four ranks ----------------------------------------------------------------------------------------------------


class LiveBytes(TorchDispatchMode):
    """The bytes of the storages (on any device but meta) that ops return while active, and their peak: a storage
    counts from the first op that returns it until it is freed (its Python object lives exactly as long)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.counted = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._count(tensor._local_tensor if isinstance(tensor, DTensor) else tensor)
        return out

    def _count(self, tensor):
        storage = None if tensor.is_meta else tensor.untyped_storage()
        if storage is None or id(storage) in self.counted:
            return
        self.counted.add(id(storage))
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, id(storage), storage.nbytes())

    def _free(self, key, nbytes):
        self.live -= nbytes
        self.counted.discard(key)


def _launch(config, expert_parallel_size):
    """The config of a torchrun launch of WORLD_SIZE ranks under FSDP with expert groups of ``expert_parallel_size``,
    and this rank's view of it."""
    os.environ.update(RANK=str(dist.get_rank()), LOCAL_RANK=str(dist.get_rank()), WORLD_SIZE=str(WORLD_SIZE))
    trainer = {**config["trainer"], "strategy": "fsdp", "expert_parallel_size": expert_parallel_size}
    config = {**config, "trainer": trainer}
    return config, Distributed.from_config(config)


def _train_sharded(model):
    images, labels = batch()
    mine = slice(dist.get_rank() * PER_RANK_BATCH, (dist.get_rank() + 1) * PER_RANK_BATCH)
    losses, _ = train(model, images[mine], labels[mine], lambda m: fsdp.clip_grad_norm_(m, 0.05))
    dist.all_reduce(losses)
    return losses / WORLD_SIZE


def two_by_two_and_one_by_four_start_from_the_one_process_weights_and_train_alike(rank):
    for size in (2, 4):
        config, distributed = _launch(SHARED["meta"], size)
        model = build_state(config, distributed, total_steps=3)[0].model
        weights = full_state(model)  # collective
        losses = _train_sharded(model)
        assert list(weights) == list(SHARED["weights"])
        for name, value in SHARED["weights"].items():
            assert torch.equal(weights[name], value), f"{size} expert ranks: {name}"
        torch.testing.assert_close(losses, SHARED["losses"], **FP32)


def upcycling_gives_every_layout_the_one_process_weights(rank):
    config, distributed = _launch(SHARED["upcycled"], 2)
    weights = full_state(build_state(config, distributed, total_steps=3)[0].model)
    for name, value in SHARED["upcycled_weights"].items():
        assert torch.equal(weights[name], value), name


def the_default_build_still_starts_every_layout_from_rank_zeros_weights(rank):
    config, distributed = _launch({**SHARED["meta"], "trainer": {**SHARED["meta"]["trainer"], "init_device": "cpu"}}, 2)
    torch.manual_seed(rank)  # every rank builds its own; rank 0's (seed 0, as the one process) reach all
    weights = full_state(build_state(config, distributed, total_steps=3)[0].model)
    for name, value in SHARED["default_weights"].items():
        assert torch.equal(weights[name], value), name


def no_rank_ever_holds_more_than_its_pieces_and_one_whole_parameter(rank):
    """The peak of live storage bytes during the build: under meta init at most this rank's pieces (FSDP's padded
    shards), the largest whole parameter and its init's scratch (torch's trunc_normal_ compares it with its bounds:
    three bool masks, 3/4 of its bytes), and 1 KiB of device-mesh indices; the default build holds the whole model."""
    peaks, pieces = {}, {}
    for init_device in ("meta", "cpu"):
        config, distributed = _launch({**SHARED["meta"], "trainer": {**SHARED["meta"]["trainer"],
                                                                      "init_device": init_device}}, 2)
        with LiveBytes() as meter:
            model = build_state(config, distributed, total_steps=3)[0].model
        peaks[init_device] = meter.peak
        pieces[init_device] = sum(p.to_local().untyped_storage().nbytes() for p in model.parameters())
    whole, largest = SHARED["model_bytes"], SHARED["largest_bytes"]
    pieces = pieces["meta"]
    assert pieces < whole / 3  # a quarter of the model, padding included
    assert peaks["meta"] <= pieces + largest * 7 / 4 + 1024, (peaks, pieces, largest)
    assert peaks["cpu"] >= whole, (peaks, whole)


SCENARIOS = {fn.__name__: fn for fn in (
    two_by_two_and_one_by_four_start_from_the_one_process_weights_and_train_alike,
    upcycling_gives_every_layout_the_one_process_weights,
    the_default_build_still_starts_every_layout_from_rank_zeros_weights,
    no_rank_ever_holds_more_than_its_pieces_and_one_whole_parameter,
)}


@pytest.fixture(scope="module")
def four_rank_results(compose_run, dense_checkpoint, tmp_path_factory):
    SHARED["meta"] = meta = configs(compose_run)
    SHARED["upcycled"] = configs(compose_run, f"model.upcycle_from={dense_checkpoint}", "model.upcycle_noise_std=0.01")
    reference = one_process(meta)
    SHARED["weights"] = {name: value.clone() for name, value in reference.state_dict().items()}
    SHARED["losses"], _ = train(reference, *batch(), lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.05))
    SHARED["upcycled_weights"] = one_process(SHARED["upcycled"]).state_dict()
    torch.manual_seed(0)
    SHARED["default_weights"] = build_model(meta["model"], meta["moe"]).state_dict()
    SHARED["model_bytes"] = sum(value.nbytes for value in SHARED["weights"].values())
    SHARED["largest_bytes"] = max(value.nbytes for value in SHARED["weights"].values())
    assert math.isclose(SHARED["model_bytes"] / 2**10, 156, rel_tol=0.05)  # as SMALL's comment says
    return run_scenarios(tmp_path_factory.mktemp("meta_init"), WORLD_SIZE, SCENARIOS, shared=SHARED)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_four_ranks(four_rank_results, scenario):
    assert_passed_on_every_rank(four_rank_results, scenario, WORLD_SIZE)
