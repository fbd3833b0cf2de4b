"""Routing statistics on hand-computed cases, and routing capture."""

import gc
import math
import weakref

import pytest
import torch

from softmoe import (
    SoftMoE, SoftMoEVisionTransformer, block_index, capture_routing, cumulative_dispatch_mass, moe_layers,
    router_parameters, router_scale, routing_stats, slot_similarity,
)


def uniform(b, m, n, p):
    dispatch = torch.full((b, m, n, p), 1.0 / m)
    combine = torch.full((b, m, n, p), 1.0 / (n * p))
    return dispatch, combine


def test_uniform_routing():
    stats = routing_stats(*uniform(2, 6, 4, 2))
    assert stats["dispatch_entropy"] == pytest.approx(1.0)
    assert stats["combine_entropy"] == pytest.approx(1.0)
    assert stats["dispatch_max"] == pytest.approx(1 / 6)
    assert stats["combine_max"] == pytest.approx(1 / 8)
    torch.testing.assert_close(stats["expert_utilisation"], torch.full((4,), 0.25))
    torch.testing.assert_close(stats["slot_utilisation"], torch.full((8,), 0.125))
    assert stats["effective_experts"] == pytest.approx(4.0)


def test_one_hot_routing_to_a_single_expert():
    b, m, n, p = 2, 5, 3, 2
    dispatch = torch.zeros(b, m, n, p)
    dispatch[:, 0] = 1.0  # every slot reads token 0 only
    combine = torch.zeros(b, m, n, p)
    combine[:, :, 1, 0] = 1.0  # every token reads slot (expert 1, slot 0) only
    stats = routing_stats(dispatch, combine)
    assert stats["dispatch_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert stats["combine_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert stats["dispatch_max"] == pytest.approx(1.0) and stats["combine_max"] == pytest.approx(1.0)
    torch.testing.assert_close(stats["expert_utilisation"], torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(stats["slot_utilisation"], torch.tensor([0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert stats["effective_experts"] == pytest.approx(1.0)


def test_half_and_half_combine():
    b, m, n, p = 1, 4, 2, 1
    dispatch, _ = uniform(b, m, n, p)
    combine = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0], [1.0, 0.0]]).view(1, 4, 2, 1)
    stats = routing_stats(dispatch, combine)
    # tokens 0-1 uniform (entropy 1), tokens 2-3 one-hot (entropy 0)
    assert stats["combine_entropy"] == pytest.approx(0.5)
    assert stats["combine_max"] == pytest.approx(0.75)
    torch.testing.assert_close(stats["expert_utilisation"], torch.tensor([0.75, 0.25]))
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert stats["effective_experts"] == pytest.approx(expected)


def test_cumulative_dispatch_mass():
    dispatch = torch.tensor([0.5, 0.3, 0.2]).view(1, 3, 1, 1)
    torch.testing.assert_close(cumulative_dispatch_mass(dispatch), torch.tensor([0.5, 0.8, 1.0]))


def test_bad_shapes():
    with pytest.raises(ValueError, match=r"dispatch must have shape \[batch, tokens, experts, slots_per_expert\]"):
        routing_stats(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"dispatch must be a tensor \[batch, tokens, experts, slots_per_expert\] "
                                         r"\(a routing record's dispatch\), got NoneType"):  # was: an AttributeError
        routing_stats(None, None)
    with pytest.raises(ValueError, match=r"^dispatch holds no routing weights \(shape \[0, 5, 4, 1\]\): record a "
                                         r"batch of at least one example$"):  # was: NaN for every statistic
        routing_stats(torch.rand(0, 5, 4, 1), torch.rand(0, 5, 4, 1))
    with pytest.raises(ValueError, match="same shape"):
        routing_stats(*uniform(1, 2, 2, 1)[:1], uniform(1, 3, 2, 1)[1])


def test_slot_similarity_is_the_cosine_between_slot_parameters():  # router_scale: the capture test below
    phi = torch.zeros(3, 2, 2)
    phi[0, 0, 0] = phi[0, 0, 1] = 2.0  # expert 0's two slots point the same way
    phi[1, 1, 0] = 1.0
    phi[2, 1, 1] = -1.0
    sim = slot_similarity(phi)
    assert sim.shape == (4, 4)
    assert sim[0, 1] == pytest.approx(1.0, abs=1e-7) and sim[2, 3] == pytest.approx(0.0, abs=1e-7)
    torch.testing.assert_close(sim.diagonal(), torch.ones(4), atol=1e-7, rtol=0)


def test_slot_similarity_of_a_128_expert_router_at_init_is_one_on_its_diagonal():
    # a slot's squared norm is about 1/128 at init: the router's eps (1e-6) read it as 0.99987
    sim = slot_similarity(SoftMoE(64, num_experts=128))
    torch.testing.assert_close(sim.diagonal(), torch.ones(128), atol=1e-7, rtol=0)
    assert sim.abs().max() <= 1 + 1e-7


def model():
    return SoftMoEVisionTransformer(
        img_size=8, patch_size=4, embed_dim=16, depth=3, num_heads=2, num_classes=3, num_experts=2,
        slots_per_expert=2, moe_layer_index=[0, 2],
    )


def test_capture_records_each_moe_layer_only_inside_the_context():
    net = model()
    net.blocks[2].mlp.scale.data.fill_(3.0)
    assert list(moe_layers(net)) == ["blocks.0.mlp", "blocks.2.mlp"]
    assert [block_index(name) for name in moe_layers(net)] == [0, 2]
    assert router_scale(net.blocks[2].mlp) == 3.0
    for not_a_router in (net, net.blocks[1].mlp):  # not 1.0 by default: there is no scale to read
        with pytest.raises(ValueError, match="expected a Soft MoE or sparse MoE layer"):
            router_scale(not_a_router)
    with capture_routing(net) as routing:
        net(torch.randn(5, 3, 8, 8))
    assert sorted(routing) == ["blocks.0.mlp", "blocks.2.mlp"]
    record = routing["blocks.2.mlp"]
    assert record.dispatch.shape == record.combine.shape == (5, 5, 2, 2)  # [batch, 1 + 4 tokens, experts, slots]
    assert not record.dispatch.requires_grad and not record.combine.requires_grad  # neither keeps the graph alive
    stats = routing_stats(record.dispatch, record.combine)
    assert 0 < stats["dispatch_entropy"] <= 1 and 1 <= stats["effective_experts"] <= 2

    net(torch.randn(1, 3, 8, 8))  # outside the context nothing is recorded or kept alive
    assert routing["blocks.2.mlp"] is record
    assert all(layer._routing_recorder is None for layer in moe_layers(net).values())
    ref = weakref.ref(record.dispatch)
    del routing, record, stats
    gc.collect()
    assert ref() is None


def test_capture_records_an_empty_batch_as_the_model_runs_it():
    net = model()
    with capture_routing(net) as routing:
        out = net(torch.randn(0, 3, 8, 8))
    assert out.shape == (0, 3)
    assert routing["blocks.2.mlp"].dispatch.shape == routing["blocks.2.mlp"].combine.shape == (0, 5, 2, 2)


def test_capture_routing_names_a_model_that_is_not_a_module():
    with pytest.raises(ValueError, match=r"^model must be an nn.Module holding MoE layers, got str 'net'$"):
        with capture_routing("net"):  # was: AttributeError, 'str' object has no attribute 'named_modules'
            pass


def test_the_routing_helpers_name_a_model_that_is_not_a_module():
    # were: AttributeError ("'str' object has no attribute 'named_modules'", "... 'split'")
    from softmoe.sparse import auxiliary_loss

    for helper in (moe_layers, router_parameters):
        with pytest.raises(ValueError, match=r"^model must be an nn.Module holding MoE layers, got NoneType None$"):
            helper(None)
    with pytest.raises(ValueError, match=r"^model must be an nn.Module holding sparse MoE layers, got str 'x'$"):
        auxiliary_loss("x")
    with pytest.raises(ValueError, match=r"^module_name must be a module's name such as 'blocks.7.mlp', got 3$"):
        block_index(3)


def test_block_index_needs_a_block():
    with pytest.raises(ValueError, match="not inside a 'blocks.<index>' container"):
        block_index("head")


def test_a_support_of_one_element_counts_as_uniform():
    """One token (dispatch over m = 1) or one slot (combine over n·p = 1): entropy 1, not 0/0 or 0."""
    stats = routing_stats(torch.ones(2, 1, 3, 1), torch.full((2, 1, 3, 1), 1 / 3))
    assert stats["dispatch_entropy"] == 1.0 and stats["combine_entropy"] == pytest.approx(1.0)
    stats = routing_stats(torch.full((2, 4, 1, 1), 0.25), torch.ones(2, 4, 1, 1))
    assert stats["combine_entropy"] == 1.0 and stats["dispatch_entropy"] == pytest.approx(1.0)


def test_slot_utilisation_is_a_share_of_the_mass_a_dropped_token_does_not_add_to():
    """A sparse layer's dropped token has an all-zero combine row: the shares still sum to 1."""
    combine = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 0.0]]).view(1, 4, 2, 1)
    stats = routing_stats(torch.full((1, 4, 2, 1), 0.25), combine)
    torch.testing.assert_close(stats["slot_utilisation"], torch.tensor([2 / 3, 1 / 3]))
    torch.testing.assert_close(stats["expert_utilisation"], torch.tensor([2 / 3, 1 / 3]))


def test_cumulative_dispatch_mass_averages_over_examples_and_slots():
    dispatch = torch.tensor([[[0.5, 1.0], [0.3, 0.0], [0.2, 0.0]],  # example 0: slots 0 and 1
                             [[0.1, 0.4], [0.1, 0.4], [0.8, 0.2]]]).view(2, 3, 2, 1)
    expected = torch.tensor([[0.5, 0.8, 1.0], [1.0, 1.0, 1.0], [0.8, 0.9, 1.0], [0.4, 0.8, 1.0]]).mean(0)
    torch.testing.assert_close(cumulative_dispatch_mass(dispatch), expected)


def test_router_scale_of_a_layer_that_does_not_normalise_is_one():
    assert router_scale(SoftMoE(8, num_experts=2, normalize=False)) == 1.0


def test_router_parameters_are_named_in_full_for_every_layer():
    net = model()
    parameters = router_parameters(net)
    assert list(parameters) == ["blocks.0.mlp.phi", "blocks.0.mlp.scale", "blocks.2.mlp.phi", "blocks.2.mlp.scale"]
    assert parameters["blocks.2.mlp.phi"] is net.blocks[2].mlp.phi


def test_a_layer_called_twice_keeps_its_latest_routing():
    layer = SoftMoE(8, num_experts=2, slots_per_expert=2)
    with capture_routing(layer) as routing:
        layer(torch.randn(1, 3, 8))
        layer(torch.randn(2, 5, 8))
    assert routing[""].dispatch.shape == (2, 5, 2, 2)


def test_a_nested_capture_leaves_the_outer_one_recording():
    layer = SoftMoE(8, num_experts=2, slots_per_expert=2)
    with capture_routing(layer) as outer:
        with capture_routing(layer) as inner:
            layer(torch.randn(1, 3, 8))
        layer(torch.randn(2, 5, 8))
    assert inner[""].dispatch.shape == (1, 3, 2, 2) and outer[""].dispatch.shape == (2, 5, 2, 2)
    assert layer._routing_recorder is None


def test_an_error_inside_the_capture_still_stops_the_recording():
    layer = SoftMoE(8, num_experts=2, slots_per_expert=2)
    with pytest.raises(RuntimeError, match="inside"), capture_routing(layer):
        raise RuntimeError("inside")
    assert layer._routing_recorder is None


def test_block_index_reads_the_index_after_blocks_anywhere_in_the_name():
    """A wrapped model's names: torch.compile's _orig_mod, DDP's module."""
    assert block_index("_orig_mod.blocks.7.mlp") == 7 and block_index("module.blocks.11.mlp.experts") == 11
