"""SoftMoELayerWrapper: any layer as the experts of a Soft MoE layer, batched with vmap."""

import warnings
from functools import partial

import pytest
import torch
from torch import nn

from reference import reference_soft_moe
from softmoe import SoftMoELayerWrapper


def loop_reference(wrapper, x, normalize=True):
    """Float64 paper equations with expert i = the wrapped layer holding expert i's slice of the stacked weights."""
    layer = wrapper.experts.layer
    params = {k: v.detach().double() for k, v in layer.named_parameters()}

    def expert(i):
        return lambda slots: torch.func.functional_call(layer, {k: v[i] for k, v in params.items()}, (slots,))

    fns = [expert(i) for i in range(wrapper.num_experts)]
    scale = wrapper.scale.item() if wrapper.scale is not None else 1.0  # no scale without normalisation
    return reference_soft_moe(x.double(), wrapper.phi.detach(), fns, scale=scale, normalize=normalize)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_experts_match_the_paper_equations(normalize):
    x = torch.rand(2, 16, 128)
    layer = SoftMoELayerWrapper(
        dim=128, slots_per_expert=2, num_experts=32, layer=nn.Linear, in_features=128, out_features=32,
        normalize=normalize,
    )
    y = layer(x)
    assert y.shape == (2, 16, 32)
    assert layer.experts.layer.weight.shape == (32, 32, 128)  # stacked: [experts, out, in]
    torch.testing.assert_close(y.double(), loop_reference(layer, x, normalize), rtol=1e-4, atol=1e-5)


# torch's note that vmap runs CPU flash attention through its slow per-example fallback ("Please file us an issue"):
# expected here, where the experts are transformer layers, and about torch's speed, not this package's results
@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
def test_transformer_layer_experts_attend_within_one_example():
    x = torch.rand(3, 16, 32)
    layer = SoftMoELayerWrapper(
        dim=32, slots_per_expert=4, num_experts=4, layer=nn.TransformerEncoderLayer, d_model=32, nhead=4, dropout=0.0,
        batch_first=True,
    )
    y = layer(x)
    x_changed = x.clone()
    x_changed[1:] += 1.0
    torch.testing.assert_close(layer(x_changed)[0], y[0])
    torch.testing.assert_close(y.double(), loop_reference(layer, x), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:There is a performance drop because we have not yet implemented the batching rule")
@pytest.mark.parametrize("layer, kwargs, where",
                         [(nn.TransformerEncoderLayer, dict(d_model=16, nhead=2), r" \(its self_attn\)"),
                          (nn.MultiheadAttention, dict(embed_dim=16, num_heads=2), "")],
                         ids=["transformer_layer", "attention"])
def test_a_sequence_first_layer_warns_that_it_would_attend_across_the_batch(layer, kwargs, where):
    message = rf"layer {layer.__name__}{where} has batch_first=False, .* Pass batch_first=True"
    with pytest.warns(UserWarning, match=message):
        wrapper = SoftMoELayerWrapper(dim=16, num_experts=2, slots_per_expert=3, layer=layer, **kwargs)
    if layer is nn.TransformerEncoderLayer:  # what the warning is about: examples mix
        wrapper.eval()
        x = torch.randn(2, 5, 16)
        assert not torch.allclose(wrapper(x)[:1], wrapper(x[:1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # batch-first: no warning
        SoftMoELayerWrapper(dim=16, num_experts=2, slots_per_expert=3, layer=layer, batch_first=True, **kwargs)


def test_partial_layer_with_an_overlapping_argument_name():
    class Scaled(nn.Module):
        def __init__(self, dim, factor):
            super().__init__()
            self.proj = nn.Linear(dim, dim)
            self.factor = factor

        def forward(self, x):
            return self.factor * self.proj(x)

    layer = SoftMoELayerWrapper(dim=16, num_experts=4, slots_per_expert=1, layer=partial(Scaled, dim=16), factor=2.0)
    assert layer(torch.randn(2, 5, 16)).shape == (2, 5, 16)


@pytest.mark.parametrize("where", [dict(dtype=torch.float64), dict(device="meta")], ids=["dtype", "device"])
def test_the_router_follows_the_device_and_dtype_given_to_the_layer(where):
    layer = SoftMoELayerWrapper(16, 4, 2, nn.Linear, in_features=16, out_features=8, **where)  # was: Φ on the CPU
    expected = {"dtype": torch.float32, "device": "cpu", **where}
    for parameter in layer.parameters():
        assert (parameter.dtype, parameter.device) == (expected["dtype"], torch.device(expected["device"]))
    with torch.device(expected["device"]):
        x = torch.rand(2, 5, 16, dtype=expected["dtype"])
    assert layer(x).shape == (2, 5, 8)


def test_experts_are_independent_instances():
    layer = SoftMoELayerWrapper(
        dim=8, num_experts=4, slots_per_expert=1, layer=nn.Linear, in_features=8, out_features=8
    )
    weight = layer.experts.layer.weight
    assert not any(torch.equal(weight[0], weight[i]) for i in range(1, 4))


def test_gradients_reach_every_expert_and_the_router():
    layer = SoftMoELayerWrapper(
        dim=8, num_experts=4, slots_per_expert=2, layer=nn.Linear, in_features=8, out_features=8
    )
    layer(torch.randn(2, 6, 8)).pow(2).sum().backward()
    assert layer.phi.grad.abs().sum() > 0 and layer.scale.grad.abs().sum() > 0
    assert torch.all(layer.experts.layer.weight.grad.reshape(4, -1).abs().sum(1) > 0)


class DataDependent(nn.Module):
    """A layer vmap cannot trace: Python control flow on a tensor's value."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        y = self.proj(x)
        return y if y.sum().item() > 0 else -y


def test_layers_vmap_cannot_run_fall_back_to_a_correct_loop():
    layer = SoftMoELayerWrapper(dim=8, num_experts=3, slots_per_expert=2, layer=partial(DataDependent, 8))
    x = torch.randn(2, 5, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = layer(x)
    assert not layer.experts.use_vmap
    assert any("falling back to a loop" in str(w.message) for w in caught)
    torch.testing.assert_close(y.double(), loop_reference(layer, x), rtol=1e-4, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_experts must be a positive integer, got 0"):
        SoftMoELayerWrapper(dim=8, num_experts=0, slots_per_expert=1, layer=nn.Linear, in_features=8, out_features=8)
    with pytest.raises(ValueError, match="dim must be a positive integer, got 0"):
        SoftMoELayerWrapper(dim=0, num_experts=2, slots_per_expert=1, layer=nn.Linear, in_features=8, out_features=8)
    with pytest.raises(ValueError, match="layer must be an nn.Module class"):
        SoftMoELayerWrapper(dim=8, num_experts=2, slots_per_expert=1, layer="linear")
    layer = SoftMoELayerWrapper(
        dim=8, num_experts=2, slots_per_expert=1, layer=nn.Linear, in_features=8, out_features=8
    )
    with pytest.raises(ValueError, match="last dimension must equal dim=8"):
        layer(torch.randn(1, 4, 6))


class Pooled(nn.Module):
    """One vector per example: not the [batch, slots_per_expert, d'] an expert must return."""

    def forward(self, x):
        return x.mean(dim=1)


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return x + y


@pytest.mark.parametrize(
    "layer, message",
    [(nn.Linear(8, 8), r"layer must be an nn.Module class or a callable returning one, got a Linear instance: pass "
      r"the class and its arguments \(layer=Linear, ...\) or functools.partial\(Linear, ...\)"),
     (lambda: torch.relu, "layer must build an nn.Module, but calling it returned <built-in method relu")],
    ids=["an_instance", "a_function_returning_a_function"],
)
def test_a_layer_that_does_not_build_modules_is_named(layer, message):
    with pytest.raises(ValueError, match=message):
        SoftMoELayerWrapper(dim=8, num_experts=2, slots_per_expert=1, layer=layer)


@pytest.mark.parametrize("use_vmap", [True, False], ids=["vmap", "loop"])
@pytest.mark.parametrize(
    "layer, kwargs, returned",
    [(Pooled, {}, r"Pooled\(\) returned a tensor of shape \[2, 8\]"),
     (nn.MultiheadAttention, dict(embed_dim=8, num_heads=2, batch_first=True), "MultiheadAttention returned a tuple")],
    ids=["pooled", "a_tuple"],
)
def test_an_expert_returning_another_shape_is_named(use_vmap, layer, kwargs, returned):
    wrapper = SoftMoELayerWrapper(dim=8, num_experts=2, slots_per_expert=3, layer=layer, **kwargs)
    wrapper.experts.use_vmap = use_vmap
    if layer is nn.MultiheadAttention:  # it takes query, key and value: called on the slots as all three
        wrapper.experts.layer.forward = lambda x: nn.MultiheadAttention.forward(wrapper.experts.layer, x, x, x)
    message = (r"each expert must return a tensor of shape \[batch, slots_per_expert, d'\] for its \[batch, "
               rf"slots_per_expert, dim\] slots, here \[2, 3, 8\] -> \[2, 3, d'\], but {returned}$")
    with pytest.raises(ValueError, match=message):
        wrapper(torch.randn(2, 5, 8))


def test_a_layer_whose_forward_takes_other_arguments_names_the_expert_and_its_input():
    wrapper = SoftMoELayerWrapper(dim=8, num_experts=2, slots_per_expert=3, layer=TwoInputs)
    message = (r"expert 0 \(TwoInputs\(\)\) cannot take its slots: .* here of shape \[2, 3, 8\], and raised: "
               r".*missing 1 required positional argument: 'y'")
    with pytest.raises(TypeError, match=message):
        wrapper(torch.randn(2, 5, 8))


@pytest.mark.parametrize(
    "layer, kwargs, error",
    [(nn.Linear, dict(in_features=4, out_features=8), RuntimeError),  # torch: "mat1 and mat2 shapes cannot be ..."
     (nn.TransformerEncoderLayer, dict(d_model=16, nhead=2, batch_first=True), ValueError)],  # torch: an assert
    ids=["linear", "transformer_layer"],
)
def test_a_layer_whose_arguments_do_not_fit_dim_names_the_expert_its_input_and_dim(layer, kwargs, error):
    wrapper = SoftMoELayerWrapper(dim=8, num_experts=2, slots_per_expert=3, layer=layer, **kwargs)
    message = r"expert 0 \(.*\) cannot take its slots: .* here of shape \[2, 3, 8\], and raised: .*against dim=8"
    with warnings.catch_warnings(record=True) as caught, pytest.raises(error, match=message):
        warnings.simplefilter("always")
        wrapper(torch.randn(2, 5, 8))
    assert not any("falling back" in str(w.message) for w in caught)  # the loop failed too: no fallback to announce


def test_an_empty_batch_gives_an_empty_output():
    layer = SoftMoELayerWrapper(dim=8, num_experts=2, slots_per_expert=1, layer=nn.Linear, in_features=8,
                                out_features=6)
    assert layer(torch.randn(0, 3, 8)).shape == (0, 3, 6)


def test_each_expert_draws_its_own_dropout_mask():
    """vmap with randomness="different": in training the experts drop different units of the same input."""
    from softmoe.stacked_experts import StackedExperts

    bank = StackedExperts(4, lambda: nn.Dropout(0.5)).train()
    out = bank(torch.ones(1, 4, 3, 16))
    assert bank.use_vmap
    assert not any(torch.equal(out[:, 0], out[:, i]) for i in range(1, 4))


class Offset(nn.Module):
    """A layer whose state is a buffer, drawn per instance."""

    def __init__(self, dim):
        super().__init__()
        self.register_buffer("offset", torch.randn(dim))

    def forward(self, x):
        return x + self.offset


def test_buffers_are_stacked_and_each_expert_reads_its_own():
    from softmoe.stacked_experts import StackedExperts

    bank = StackedExperts(3, partial(Offset, 8))
    offsets = bank.state_dict()["layer.offset"]
    assert offsets.shape == (3, 8) and not torch.equal(offsets[0], offsets[1])
    slots = torch.randn(2, 3, 4, 8)
    for use_vmap in (True, False):
        bank.use_vmap = use_vmap
        torch.testing.assert_close(bank(slots), slots + offsets[None, :, None], msg=f"use_vmap={use_vmap}")


@pytest.mark.parametrize("old_home, home, name", [("softmoe.experts", "softmoe.stacked_experts", "StackedExperts"),
                                                  ("softmoe.parallel", "softmoe.expert_parallel", "ExpertParallel")])
def test_a_pickle_that_names_a_bank_class_by_its_old_module_still_loads(old_home, home, name):
    """A whole model pickled (``torch.save(model)``) before the class moved to its own module names the old one."""
    import importlib
    import pickle

    old_reference = f"c{old_home}\n{name}\n.".encode()  # pickle protocol 0's GLOBAL opcode: module, then name
    assert pickle.loads(old_reference) is getattr(importlib.import_module(home), name)


class TiedProjections(nn.Module):
    """Two projections sharing one weight, as a weight-tied layer has them."""

    def __init__(self, dim):
        super().__init__()
        self.a, self.b = nn.Linear(dim, dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("use_vmap", [True, False])
def test_tied_weights_are_stacked_once_and_stay_tied_in_each_expert(use_vmap):
    """Was: ``b.weight`` kept expert 0's unstacked [dim, dim] weight, and the experts raised a misleading shape
    error (the loop indexed that weight as if it were stacked)."""
    layer = SoftMoELayerWrapper(dim=8, num_experts=3, slots_per_expert=2, layer=partial(TiedProjections, 8))
    bank = layer.experts.layer
    assert bank.b.weight is bank.a.weight and bank.a.weight.shape == (3, 8, 8)
    assert [name for name, _ in layer.named_parameters()] == ["phi", "scale", "experts.layer.a.weight"]
    layer.experts.use_vmap = use_vmap
    x = torch.randn(2, 5, 8)
    weights = bank.a.weight.detach().double()
    experts = [lambda slots, w=weights[i]: torch.relu(slots @ w.T) @ w.T for i in range(3)]
    expected = reference_soft_moe(x.double(), layer.phi.detach(), experts, scale=layer.scale.item())
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)


class Gained(nn.Module):
    """A projection times a fixed (frozen) gain."""

    def __init__(self, dim):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gain = nn.Parameter(torch.full((dim,), 2.0), requires_grad=False)

    def forward(self, x):
        return self.proj(x) * self.gain


def test_a_frozen_parameter_of_the_layer_stays_frozen():
    """Was: stacked as a trainable parameter, so an optimizer over ``parameters()`` changed it."""
    layer = SoftMoELayerWrapper(dim=8, num_experts=3, slots_per_expert=1, layer=partial(Gained, 8))
    bank = layer.experts.layer
    assert not bank.gain.requires_grad and bank.proj.weight.requires_grad
    optimizer = torch.optim.SGD(layer.parameters(), lr=1.0)
    layer(torch.randn(2, 5, 8)).square().sum().backward()
    optimizer.step()
    assert bank.gain.grad is None and torch.equal(bank.gain, torch.full((3, 8), 2.0))
    assert bank.proj.weight.grad is not None
