"""Tokens Choice and Experts Choice against naive float64 per-token loops, and the properties they promise."""

import math

import pytest
import torch
import torch.nn.functional as F

from softmoe import SoftMoEVisionTransformer, capture_routing, moe_layers, routing_stats
from softmoe.sparse import ExpertsChoiceMoE, SparseMoE, TokensChoiceMoE, auxiliary_loss, sparse_routing_stats

DIM, HIDDEN, EXPERTS = 8, 16, 4
LAYERS = (TokensChoiceMoE, ExpertsChoiceMoE)


def make_layer(cls, **kwargs):
    settings = {"num_experts": EXPERTS, "slots_per_expert": 2, "noise_std": 0.0, **kwargs}
    return cls(DIM, HIDDEN, **settings)


def sharpen_router(layer, scale=3.0):
    """Random router weights large enough that routing is uneven and capacity overflows."""
    with torch.no_grad():
        layer.router_weight.normal_(0.0, scale)
    return layer


# ---- independent float64 references: Python loops over tokens and experts --------------------------------


def expert_on_token(layer, i, token):
    e = layer.experts
    hidden = F.gelu(token @ e.fc1_weight[i].double() + e.fc1_bias[i].double())
    return hidden @ e.fc2_weight[i].double() + e.fc2_bias[i].double()


def router_probs(layer, tokens, noise=None):
    """Router probabilities [m, n] of one example's tokens [m, d]."""
    weight = layer.router_weight.detach().double()
    if layer.normalize:
        tokens = tokens / torch.sqrt((tokens**2).sum(-1, keepdim=True) + 1e-6)
        weight = layer.scale.detach().double() * weight / torch.sqrt((weight**2).sum(0, keepdim=True) + 1e-6)
    logits = tokens @ weight
    return torch.softmax(logits if noise is None else logits + noise, dim=-1)


def reference_tokens_choice(layer, x, capacity, noise=None):
    """Output, per-token count of experts that processed it, and per-expert load, by a loop over claims."""
    b, m, _ = x.shape
    n, k = layer.num_experts, layer.k
    out = torch.zeros(b, m, layer.experts.out_features, dtype=torch.float64)
    processed = torch.zeros(b, m)
    load = torch.zeros(n)
    for e in range(b):
        probs = router_probs(layer, x[e].double(), None if noise is None else noise[e]).tolist()
        choices = [sorted(range(n), key=lambda i: -p[i])[:k] for p in probs]
        order = list(range(m))
        if layer.batch_priority:
            order.sort(key=lambda t: -max(probs[t]))  # stable: ties keep position order
        taken = [0] * n
        for rank in range(k):  # all first choices claim capacity before any second choice
            for t in order:
                i = choices[t][rank]
                if taken[i] < capacity:
                    taken[i] += 1
                    processed[e, t] += 1
                    out[e, t] += probs[t][i] * expert_on_token(layer, i, x[e, t].double())
        load += torch.tensor(taken, dtype=torch.float32)
    return out, processed, load


def reference_experts_choice(layer, x, capacity):
    b, m, _ = x.shape
    out = torch.zeros(b, m, layer.experts.out_features, dtype=torch.float64)
    processed = torch.zeros(b, m)
    for e in range(b):
        probs = router_probs(layer, x[e].double())
        for i in range(layer.num_experts):
            for t in sorted(range(m), key=lambda t: -probs[t, i].item())[:capacity]:
                processed[e, t] += 1
                out[e, t] += probs[t, i] * expert_on_token(layer, i, x[e, t].double())
    return out, processed


def check_stats(layer, processed, load):
    stats = sparse_routing_stats(layer)
    assert stats["dropped_fraction"] == pytest.approx((processed == 0).float().mean().item(), abs=1e-6)
    torch.testing.assert_close(stats["expert_load"], load / load.sum())
    assert stats["expert_load"].sum().item() == pytest.approx(1.0)
    assert stats["expert_importance"].sum().item() == pytest.approx(1.0)


# ---- agreement with the references ------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 8.0])
def test_tokens_choice_matches_per_token_loop(k, batch_priority, capacity_factor):
    layer = make_layer(
        TokensChoiceMoE, k=k, batch_priority=batch_priority, capacity_factor=capacity_factor, normalize=False
    )
    layer = sharpen_router(layer).double()
    x = torch.randn(3, 12, DIM, dtype=torch.float64)
    capacity = 2 if capacity_factor is None else min(12, math.ceil(capacity_factor * 12 * k / EXPERTS))
    expected, processed, load = reference_tokens_choice(layer, x, capacity)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    check_stats(layer, processed, load)
    stats = sparse_routing_stats(layer)
    assert stats["capacity"] == capacity
    assert stats["dropped_assignment_fraction"] == pytest.approx(1 - load.sum().item() / (3 * 12 * k))
    if capacity_factor in (None, 0.5):  # the case must exercise overflow, or it tests nothing about capacity
        assert stats["dropped_assignment_fraction"] > 0


@pytest.mark.parametrize("capacity_factor", [None, 0.5, 1.0, 8.0])
@pytest.mark.parametrize("normalize", [False, True])
def test_experts_choice_matches_per_token_loop(capacity_factor, normalize):
    layer = sharpen_router(make_layer(ExpertsChoiceMoE, capacity_factor=capacity_factor, normalize=normalize)).double()
    if normalize:
        layer.scale.data.fill_(2.5)
    x = torch.randn(3, 12, DIM, dtype=torch.float64)
    capacity = 2 if capacity_factor is None else min(12, math.ceil(capacity_factor * 12 / EXPERTS))
    expected, processed = reference_experts_choice(layer, x, capacity)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)
    check_stats(layer, processed, torch.full((EXPERTS,), 1.0))


def test_tokens_choice_with_normalized_router_matches_loop():
    layer = make_layer(TokensChoiceMoE, k=2, normalize=True).double()
    layer.scale.data.fill_(4.0)
    x = torch.randn(2, 10, DIM, dtype=torch.float64)
    expected, _, _ = reference_tokens_choice(layer, x, capacity=2)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


def test_noisy_routing_and_load_loss_match_reference():
    layer = sharpen_router(make_layer(TokensChoiceMoE, k=2, noise_std=2.0, normalize=False), scale=0.5).double().train()
    x = torch.randn(3, 12, DIM, dtype=torch.float64)
    sigma = 2.0 / EXPERTS
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    noise = sigma * torch.randn(3, 12, EXPERTS, dtype=torch.float64)  # the layer's only random draw
    expected, _, _ = reference_tokens_choice(layer, x, capacity=2, noise=noise)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)

    logits = x @ layer.router_weight.detach()
    threshold = (logits + noise).sort(dim=-1, descending=True).values[..., 1:2]  # k-th largest noisy logit
    p = 1 - torch.distributions.Normal(0.0, 1.0).cdf((threshold - logits) / sigma)
    p_mean = p.mean(dim=1)  # [b, n]
    expected_load = (p_mean.var(dim=-1, unbiased=False) / p_mean.mean(dim=-1) ** 2).mean()
    assert layer.last_stats["load_loss"].item() == pytest.approx(expected_load.item(), rel=1e-9)
    importance = torch.softmax(logits, dim=-1).sum(dim=1)  # [b, n]: of the noise-free router, as V-MoE's
    expected_importance = (importance.var(dim=-1, unbiased=False) / importance.mean(dim=-1) ** 2).mean()
    assert layer.last_stats["importance_loss"].item() == pytest.approx(expected_importance.item(), rel=1e-9)
    layer.eval()
    layer(x)
    assert "load_loss" not in layer.last_stats, "evaluation routes without noise, so there is no load loss"


# ---- capacity, priority and dropping on constructed inputs ------------------------------------------------


def everyone_wants_expert_zero(cls, m=12, **kwargs):
    """A router where every token's top expert is 0, and later tokens want it more."""
    layer = make_layer(cls, normalize=False, **kwargs)
    with torch.no_grad():
        layer.router_weight.zero_()
        layer.router_weight[0, 0] = 1.0
    x = torch.zeros(1, m, DIM)
    x[0, :, 0] = torch.linspace(1.0, 4.0, m)
    return layer, x


@pytest.mark.parametrize("batch_priority, expected_tokens", [(False, [0, 1]), (True, [11, 10])])
def test_batch_priority_decides_who_gets_the_capacity(batch_priority, expected_tokens):
    layer, x = everyone_wants_expert_zero(TokensChoiceMoE, batch_priority=batch_priority)
    with capture_routing(layer) as routing:
        layer(x)
    dispatch = routing[""].dispatch  # [b, m, n, capacity]: capacity == slots_per_expert, so it is recorded
    assert dispatch.shape == (1, 12, EXPERTS, 2)
    assert dispatch[0, :, 0].argmax(dim=0).tolist() == expected_tokens
    assert dispatch[0, :, 1:].sum() == 0
    assert sparse_routing_stats(layer)["dropped_fraction"] == pytest.approx(10 / 12)


@pytest.mark.parametrize("capacity_factor, dropped", [(EXPERTS, 0.0), (1.0, 9 / 12), (0.25, 11 / 12)])
def test_tokens_choice_drops_what_exceeds_capacity(capacity_factor, dropped):
    layer, x = everyone_wants_expert_zero(TokensChoiceMoE, capacity_factor=capacity_factor)
    y = layer(x)
    stats = sparse_routing_stats(layer)
    assert stats["dropped_fraction"] == pytest.approx(dropped)
    assert (y.abs().sum(-1) == 0).float().mean().item() == pytest.approx(dropped), "dropped tokens must output 0"
    torch.testing.assert_close(stats["expert_load"], torch.tensor([1.0, 0.0, 0.0, 0.0]))


def test_experts_choice_drops_tokens_no_expert_takes():
    layer = sharpen_router(make_layer(ExpertsChoiceMoE, capacity_factor=EXPERTS))
    x = torch.randn(2, 12, DIM)
    layer(x)
    assert sparse_routing_stats(layer)["dropped_fraction"] == 0.0  # every expert takes every token
    layer.capacity_factor = 0.25  # one token per expert: at most 4 of 12 processed
    y = layer(x)
    assert sparse_routing_stats(layer)["dropped_fraction"] >= 8 / 12
    assert (y.abs().sum(-1) == 0).sum() >= 16


# ---- auxiliary losses ----------------------------------------------------------------------------------------


def two_token_layer(router_rows, **kwargs):
    layer = TokensChoiceMoE(DIM, HIDDEN, num_experts=2, slots_per_expert=2, noise_std=0.0, normalize=False, **kwargs)
    with torch.no_grad():
        layer.router_weight.zero_()
        layer.router_weight[: len(router_rows)] = torch.tensor(router_rows)
    return layer, torch.eye(2, DIM).unsqueeze(0)  # tokens e0 and e1: logits are the router's rows 0 and 1


def test_aux_losses_on_a_hand_computed_case():
    # token 0: softmax([log 3, 0]) = [3/4, 1/4]; token 1: softmax([log 2, 0]) = [2/3, 1/3]
    layer, x = two_token_layer([[math.log(3), 0.0], [math.log(2), 0.0]], gshard_loss_weight=0.5)
    layer(x)
    # importance = [17/12, 7/12]: mean 1, variance (5/12)^2
    assert layer.last_stats["importance_loss"].item() == pytest.approx(25 / 144, rel=1e-6)
    # both tokens pick expert 0: f = [1, 0]; mean probabilities P = [17/24, 7/24]; 2 * 17/24
    assert layer.last_stats["gshard_loss"].item() == pytest.approx(17 / 12, rel=1e-6)
    assert layer.aux_loss.item() == pytest.approx(25 / 144 + 0.5 * 17 / 12, rel=1e-6)


def test_aux_losses_of_a_uniform_router():
    layer = make_layer(TokensChoiceMoE, k=2, noise_std=1.0, gshard_loss_weight=1.0)
    layer.router_weight.data.zero_()
    x = torch.randn(3, 12, DIM)
    layer.eval()(x)  # no noise: every probability is exactly 1/n
    stats = sparse_routing_stats(layer)
    assert stats["importance_loss"] == pytest.approx(0.0, abs=1e-10)
    assert stats["gshard_loss"] == pytest.approx(1.0, rel=1e-5)  # n * sum_i f_i / n
    assert stats["aux_loss"] == pytest.approx(1.0, rel=1e-5)
    layer.train()(x)  # noisy logits: every expert is equally likely to enter any token's top-k
    assert sparse_routing_stats(layer)["load_loss"] == pytest.approx(0.0, abs=1e-10)


def test_aux_loss_has_gradient_into_the_router():
    layer = sharpen_router(make_layer(TokensChoiceMoE, k=2, noise_std=1.0, gshard_loss_weight=1.0), scale=0.5).train()
    layer(torch.randn(2, 12, DIM))
    assert {"importance_loss", "load_loss", "gshard_loss"} <= set(layer.last_stats)
    layer.aux_loss.backward()
    assert layer.router_weight.grad.abs().sum() > 0
    assert layer.experts.fc1_weight.grad is None


def test_zero_loss_weights_leave_a_zero_aux_loss():
    layer, x = two_token_layer([[1.0, 0.0]], importance_loss_weight=0.0, load_loss_weight=0.0)
    layer(x)
    assert layer.aux_loss.item() == 0.0 and "importance_loss" in layer.last_stats


# ---- gradients, independence, capture --------------------------------------------------------------------------


@pytest.mark.parametrize("cls", LAYERS)
def test_gradients_reach_router_experts_and_tokens(cls):
    layer = make_layer(cls, capacity_factor=1.0)
    x = torch.randn(2, 12, DIM, requires_grad=True)
    layer(x).pow(2).sum().backward()
    for name in ("router_weight", "scale"):
        assert getattr(layer, name).grad.abs().sum() > 0, name
    for name, parameter in layer.experts.named_parameters():
        assert parameter.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("cls, kwargs", [(TokensChoiceMoE, {"k": 2, "batch_priority": True}), (ExpertsChoiceMoE, {})])
def test_examples_are_routed_independently(cls, kwargs):
    # Every example is its own routing group: capacity, priority and the choice of tokens never look across examples.
    layer = sharpen_router(make_layer(cls, capacity_factor=0.5, **kwargs))
    x = torch.randn(4, 12, DIM)
    y = layer(x)
    changed = x.clone()
    changed[1:] = 5 * torch.randn(3, 12, DIM)
    torch.testing.assert_close(layer(changed)[0], y[0])
    torch.testing.assert_close(layer(x[:1])[0], y[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", LAYERS)
def test_capture_records_the_buffers_at_the_layers_capacity(cls):
    layer = sharpen_router(make_layer(cls, k=2) if cls is TokensChoiceMoE else make_layer(cls)).double()
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    with capture_routing(layer) as routing:
        y = layer(x)
    dispatch, combine = routing[""].dispatch, routing[""].combine  # [b, m, n, p]
    assert dispatch.shape == (2, 12, EXPERTS, 2)
    assert torch.all(dispatch.sum(dim=1) <= 1)  # a slot holds at most one token
    # combine weights the expert outputs: y = sum over slots of combine * expert(token in slot)
    slots = torch.einsum("bmnp,bmd->bnpd", dispatch, x)
    expected = torch.einsum("bmnp,bnpd->bmd", combine, layer.experts(slots))
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-12)
    # the Soft MoE statistics read the sparse buffers: each expert's share of the combine mass, and how full the
    # slots are (a filled slot's dispatch column is one token's 1, an empty one is 0)
    stats = routing_stats(dispatch, combine)
    shares = combine.sum(dim=(0, 1, 3)) / combine.sum()
    torch.testing.assert_close(stats["expert_utilisation"], shares.float())
    assert stats["dispatch_max"] == pytest.approx((dispatch.sum(dim=1) > 0).double().mean().item())

    layer.capacity_factor = 1.0  # another capacity than slots_per_expert: recorded at that capacity (was: not at all)
    with capture_routing(layer) as routing:
        y = layer(x)
    dispatch, combine = routing[""].dispatch, routing[""].combine
    assert dispatch.shape[3] == layer.last_stats["capacity"] != 2
    slots = torch.einsum("bmnp,bmd->bnpd", dispatch, x)
    torch.testing.assert_close(y, torch.einsum("bmnp,bnpd->bmd", combine, layer.experts(slots)), rtol=1e-10, atol=1e-12)


# ---- inside the ViT ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, moe_kwargs",
    [
        (TokensChoiceMoE, {"k": 2, "capacity_factor": 1.0, "batch_priority": True}),
        (ExpertsChoiceMoE, {"capacity_factor": 1.0}),
    ],
)
def test_works_as_moe_layer_of_the_vit(cls, moe_kwargs):
    model = SoftMoEVisionTransformer(
        moe_layer=cls, moe_kwargs=moe_kwargs, img_size=16, patch_size=4, embed_dim=32, depth=2,
        num_heads=2, num_classes=10, moe_layer_index=1, num_experts=4,
    )
    images, labels = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    loss = F.cross_entropy(model(images), labels) + 0.01 * auxiliary_loss(model)
    loss.backward()
    (name, layer), = moe_layers(model).items()
    assert name == "blocks.1.mlp" and isinstance(layer, cls)
    assert layer.router_weight.grad.abs().sum() > 0
    assert layer.experts.fc2_weight.grad.abs().sum() > 0
    stats = sparse_routing_stats(layer)
    assert stats["capacity"] == math.ceil(17 * moe_kwargs.get("k", 1) / 4)  # 16 patches + the class token
    assert stats["expert_load"].shape == (4,)
    assert (cls is TokensChoiceMoE) == ("aux_loss" in stats)


def test_auxiliary_loss_of_a_model_without_sparse_layers_is_zero():
    model = torch.nn.Linear(2, 2)
    assert auxiliary_loss(model).item() == 0.0


def test_auxiliary_loss_is_the_sum_over_the_sparse_layers():
    model = SoftMoEVisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=10,
                                     num_experts=4, moe_layer_index=[1, 2], moe_layer=TokensChoiceMoE)
    model(torch.randn(2, 3, 16, 16))
    per_layer = [model.blocks[i].mlp.aux_loss for i in (1, 2)]
    assert per_layer[0] != per_layer[1]  # a mean would differ from the sum
    torch.testing.assert_close(auxiliary_loss(model), per_layer[0] + per_layer[1], rtol=0, atol=0)


# ---- errors ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (TokensChoiceMoE, {"k": 0}, "k must be an integer in [1, num_experts=4], got 0"),
        (TokensChoiceMoE, {"k": 5}, "got 5"),
        (TokensChoiceMoE, {"k": 1.5}, "got 1.5"),
        (TokensChoiceMoE, {"capacity_factor": 0}, "capacity_factor must be a finite number > 0, got 0"),
        (ExpertsChoiceMoE, {"capacity_factor": -1.0}, "capacity_factor"),
        (ExpertsChoiceMoE, {"capacity_factor": float("nan")}, "capacity_factor"),
        (TokensChoiceMoE, {"noise_std": -0.1}, "noise_std must be a finite number >= 0, got -0.1"),
        (TokensChoiceMoE, {"load_loss_weight": -1}, "load_loss_weight"),
        (ExpertsChoiceMoE, {"num_experts": 0}, "num_experts"),
        (TokensChoiceMoE, {"normalize": "no"}, "normalize must be True or False, got 'no'"),
        (TokensChoiceMoE, {"batch_priority": "no"}, "batch_priority must be True or False, got 'no'"),  # was: on
    ],
)
def test_bad_arguments_are_named(cls, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_layer(cls, **kwargs)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("shape, message", [
    ((12, DIM), f"input must have shape [batch, tokens, {DIM}], got a tensor of shape [12, {DIM}]"),
    ((2, 12, DIM + 1), f"input last dimension must equal dim={DIM}, got shape [2, 12, {DIM + 1}]"),
    ((2, 0, DIM), f"input must hold at least one token, got shape [2, 0, {DIM}]"),
])
def test_bad_input_shapes_are_named(cls, shape, message):
    with pytest.raises(ValueError) as raised:
        make_layer(cls)(torch.randn(*shape))
    assert str(raised.value) == message


@pytest.mark.parametrize("cls", LAYERS)
def test_an_input_in_another_dtype_than_the_router_is_named(cls):
    with pytest.raises(ValueError, match=r"input dtype torch.float64 does not match the layer's parameters"):
        make_layer(cls)(torch.randn(2, 12, DIM, dtype=torch.float64))


@pytest.mark.parametrize("cls", LAYERS)
def test_a_float64_layer_under_autocast_computes_in_float64(cls):
    """Autocast leaves float64 alone, the expert bank's weights included (they were cast to bf16)."""
    layer = make_layer(cls).double().eval()
    x = torch.randn(2, 12, DIM, dtype=torch.float64)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-14)


# Tokens Choice's load-balancing losses are means over the examples: over none, NaN (as a cross-entropy's), and
# torch warns that the variance over an empty batch has no degrees of freedom
@pytest.mark.filterwarnings("ignore:.*degrees of freedom is <= 0:UserWarning")
@pytest.mark.parametrize("cls", LAYERS)
def test_an_empty_batch_gives_an_empty_output(cls):
    x = torch.randn(0, 12, DIM, requires_grad=True)
    layer = make_layer(cls)
    y = layer(x)
    assert y.shape == (0, 12, DIM)
    y.sum().backward()
    assert x.grad.shape == x.shape
    if cls is TokensChoiceMoE:
        assert layer.aux_loss.isnan()


@pytest.mark.parametrize("cls", LAYERS)
def test_stats_before_any_forward_is_an_error(cls):
    with pytest.raises(ValueError, match="run a forward pass"):
        sparse_routing_stats(make_layer(cls))


def test_the_shared_base_class_says_which_layers_route():
    message = "SparseMoE does not route: .* use TokensChoiceMoE or ExpertsChoiceMoE"
    with pytest.raises(NotImplementedError, match=message):
        SparseMoE(DIM, num_experts=4)(torch.randn(2, 5, DIM))


@pytest.mark.parametrize("layer_class", [TokensChoiceMoE, ExpertsChoiceMoE])
def test_routing_is_recorded_at_the_capacity_the_layer_used(layer_class):
    # capacity capped at m = 5 tokens below slots_per_expert = 8 (or set by a capacity_factor): was recorded by no
    # capture, which the docstring promised "always with capacity_factor=None"
    for layer, capacity in ((layer_class(4, 8, num_experts=2, slots_per_expert=8), 5),
                            (layer_class(4, 8, num_experts=2, capacity_factor=1.0), 3)):  # ceil(1.0 * 5 tokens / 2)
        with capture_routing(layer) as routing:
            layer(torch.randn(2, 5, 4))
        assert layer.last_stats["capacity"] == capacity
        dispatch, combine = routing[""].dispatch, routing[""].combine
        assert dispatch.shape == combine.shape == (2, 5, 2, capacity)
        assert set(dispatch.unique().tolist()) <= {0.0, 1.0}  # one-hot: each filled slot holds one token
        assert dispatch.sum(dim=1).max() <= 1


def test_a_model_copied_after_a_training_forward_takes_the_aux_loss_value_not_its_graph():
    """Was: copy.deepcopy (and timm's ModelEmaV3, which makes one) refused a Tokens Choice model after a forward
    with gradients on: aux_loss was a non-leaf tensor of the forward's graph."""
    import copy

    from timm.utils import ModelEmaV3

    model = SoftMoEVisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10,
                                     num_experts=4, moe_layer_index=1, moe_layer=TokensChoiceMoE)
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    layer = model.blocks[1].mlp
    copied = copy.deepcopy(model).blocks[1].mlp
    assert copied.aux_loss.grad_fn is None and torch.equal(copied.aux_loss, layer.aux_loss.detach())
    assert layer.aux_loss.grad_fn is not None  # the original keeps its graph for the trainer's loss
    ema = ModelEmaV3(model, decay=0.9)
    ema.update(model)
    torch.testing.assert_close(ema.module.blocks[1].mlp.router_weight, layer.router_weight)
