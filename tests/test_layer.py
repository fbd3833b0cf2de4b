"""The Soft MoE layer against the paper's equations, and the properties they imply."""

import math
from functools import partial

import pytest
import torch
from torch import nn

from reference import (
    BF16_RELATIVE_ERROR,
    reference_mlp_experts,
    reference_routing,
    reference_soft_moe,
    relative_error,
)
from softmoe import BatchedMlp, SoftMoE, StackedExperts, capture_routing


class IdentityExperts(nn.Module):
    """Experts that return their slots: makes the layer exactly C Dᵀ X."""

    def forward(self, slots):
        return slots


def make_layer(dim=16, num_experts=4, slots_per_expert=2, **kwargs):
    return SoftMoE(dim, hidden_features=2 * dim, num_experts=num_experts, slots_per_expert=slots_per_expert, **kwargs)


@pytest.mark.parametrize("normalize", [True, False])
def test_identity_experts_match_paper_equations_in_float64(normalize):
    layer = make_layer(experts=IdentityExperts(), normalize=normalize).double()
    if normalize:
        layer.scale.data.fill_(1.7)  # a scale other than its init must be used as well
    x = torch.randn(3, 10, 16, dtype=torch.float64)
    scale = layer.scale.item() if normalize else 1.0
    expected = reference_soft_moe(x, layer.phi.detach(), [lambda s: s] * 4, scale=scale, normalize=normalize)
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalize", [True, False])
def test_mlp_experts_match_paper_equations_in_float64(normalize):
    layer = make_layer(normalize=normalize).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    expected = reference_soft_moe(x, layer.phi.detach(), reference_mlp_experts(layer.experts), normalize=normalize)
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-10)


def test_captured_weights_are_the_paper_dispatch_and_combine():
    layer = make_layer().double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    with capture_routing(layer) as routing:
        layer(x)
    record = routing[""]
    dispatch, combine = reference_routing(x, layer.phi.detach())
    torch.testing.assert_close(record.dispatch, dispatch, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(record.combine, combine, rtol=1e-10, atol=1e-12)
    # dispatch: a distribution over tokens for every slot; combine: one distribution over all n*p slots per token
    ones = torch.ones(2, 7, 4, dtype=torch.float64)
    torch.testing.assert_close(record.dispatch.sum(dim=1), ones[:, :4, :2])
    torch.testing.assert_close(record.combine.sum(dim=(2, 3)), ones[:, :, 0])
    assert not torch.allclose(record.combine.sum(dim=3), ones), "combine must not be a per-expert softmax"


def test_experts_receive_unnormalised_tokens():
    # Normalised logits are invariant to the tokens' scale, so with identity experts Y is linear in the scale of X;
    # an implementation feeding l2-normalised tokens to the experts would return the same Y for x and 10x.
    layer = make_layer(experts=IdentityExperts())
    x = torch.randn(2, 6, 16)
    torch.testing.assert_close(layer(10 * x), 10 * layer(x), rtol=1e-5, atol=1e-5)


def test_no_information_flows_between_examples():
    layer = make_layer()
    x = torch.randn(4, 8, 16)
    y = layer(x)
    x_changed = x.clone()
    x_changed[1:] = torch.randn(3, 8, 16)
    torch.testing.assert_close(layer(x_changed)[0], y[0])
    torch.testing.assert_close(layer(x[:1])[0], y[0], rtol=1e-5, atol=1e-6)


def test_gradient_of_one_example_touches_no_other_example():
    layer = make_layer()
    x = torch.randn(3, 8, 16, requires_grad=True)
    layer(x)[0].sum().backward()
    assert x.grad[0].abs().sum() > 0
    assert torch.all(x.grad[1:] == 0)


def test_permuting_tokens_permutes_outputs():
    layer = make_layer()
    x = torch.randn(2, 12, 16)
    perm = torch.randperm(12)
    torch.testing.assert_close(layer(x[:, perm]), layer(x)[:, perm], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradients_reach_router_and_every_expert(normalize):
    layer = make_layer(normalize=normalize)
    layer(torch.randn(2, 8, 16)).pow(2).sum().backward()
    params = dict(layer.named_parameters())
    assert params["phi"].grad.abs().sum() > 0
    if normalize:
        assert params["scale"].grad.abs().sum() > 0
    for name in ("experts.fc1_weight", "experts.fc1_bias", "experts.fc2_weight", "experts.fc2_bias"):
        grad = params[name].grad
        per_expert = grad.reshape(grad.shape[0], -1).abs().sum(dim=1)
        assert torch.all(per_expert > 0), f"{name}: some expert got no gradient"


def test_experts_are_initialised_independently():
    experts = make_layer(num_experts=8).experts
    for weight in (experts.fc1_weight, experts.fc2_weight):
        flat = weight.reshape(8, -1)
        assert not any(torch.equal(flat[0], flat[i]) for i in range(1, 8))
    # each expert is drawn as its own nn.Linear would be: uniform within 1/sqrt(fan_in), up to that bound
    for weight, fan_in in ((experts.fc1_weight, 16), (experts.fc2_weight, 32)):
        assert 0.95 * fan_in**-0.5 <= weight.abs().max() <= fan_in**-0.5


def test_phi_lecun_normal_init_and_scale():
    layer = SoftMoE(256, num_experts=64, slots_per_expert=4)
    assert layer.phi.shape == (256, 64, 4) and layer.scale.shape == (1,) and layer.scale.item() == 1.0
    expected_std = (1.0 / (256 * 64)) ** 0.5  # flax lecun_normal on [d, n, p]: fan_in = d * n
    assert abs(layer.phi.std().item() / expected_std - 1) < 0.05
    # truncated at two standard deviations of the normal before truncation (an untruncated draw of 65,536 values
    # reaches about 4 expected_std), and drawn up to there
    density_at_2, mass_within_2 = math.exp(-2) / math.sqrt(2 * math.pi), math.erf(2 / math.sqrt(2))
    truncated_std = math.sqrt(1 - 4 * density_at_2 / mass_within_2)  # a unit normal's, truncated to [-2, 2]
    cut = 2 * expected_std / truncated_std
    assert 0.95 * cut <= layer.phi.abs().max() <= cut
    assert SoftMoE(8, num_experts=2, normalize=False).scale is None


def test_router_parameters_follow_device_and_dtype():
    layer = SoftMoE(8, num_experts=2, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    meta = SoftMoE(8, num_experts=2, device="meta")
    assert all(p.device.type == "meta" for p in meta.parameters())


def test_bf16_autocast_keeps_routing_in_float32():
    layer = make_layer()
    x = torch.randn(2, 8, 16)
    with capture_routing(layer) as routing_fp32:
        reference = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16), capture_routing(layer) as routing:
        y = layer(x)
    assert y.dtype == torch.bfloat16
    assert routing[""].dispatch.dtype == torch.float32 and routing[""].combine.dtype == torch.float32
    for weights in ("dispatch", "combine"):  # the same routing as in float32, not merely the same dtype
        error = relative_error(getattr(routing[""], weights), getattr(routing_fp32[""], weights))
        assert error < BF16_RELATIVE_ERROR / 4, (weights, error)
    assert relative_error(y, reference) < BF16_RELATIVE_ERROR


def test_timm_mlp_kwargs_and_norm_layer():
    layer = SoftMoE(
        in_features=16, hidden_features=32, out_features=8, act_layer=nn.ReLU, norm_layer=nn.LayerNorm,
        bias=(True, False), drop=0.0, num_experts=3, slots_per_expert=1,
    )
    assert layer(torch.randn(2, 5, 16)).shape == (2, 5, 8)
    assert layer.experts.fc2_bias is None and layer.experts.norm_weight.shape == (3, 32)
    with pytest.raises(ValueError, match="norm_layer"):
        SoftMoE(16, norm_layer=nn.BatchNorm1d, num_experts=2)


@pytest.mark.parametrize(
    "dispatch, combine", [("soft", "uniform"), ("uniform", "soft"), ("uniform", "uniform"), ("identity", "identity")]
)
def test_routing_ablations_follow_their_definitions(dispatch, combine):
    # 3 experts x 2 slots. 5 tokens, so that uniform dispatch (1/5 per token) and uniform combine (1/6 per slot)
    # differ; identity (slot i is token i) needs as many tokens as slots
    tokens, slots = (6 if dispatch == "identity" else 5), 6
    layer = SoftMoE(8, num_experts=3, slots_per_expert=2, dispatch=dispatch, combine=combine,
                    experts=IdentityExperts()).double()
    x = torch.randn(2, tokens, 8, dtype=torch.float64)
    with capture_routing(layer) as routing:
        y = layer(x)
    d, c = routing[""].dispatch.reshape(2, tokens, slots), routing[""].combine.reshape(2, tokens, slots)
    soft = [w.reshape(2, tokens, slots) for w in reference_routing(x, layer.phi.detach(), layer.scale.item())]
    eye = torch.eye(slots, dtype=torch.float64).expand(2, slots, slots)
    expected_dispatch = {"soft": soft[0], "uniform": torch.full_like(d, 1 / tokens), "identity": eye}[dispatch]
    expected_combine = {"soft": soft[1], "uniform": torch.full_like(c, 1 / slots), "identity": eye}[combine]
    torch.testing.assert_close(d, expected_dispatch, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c, expected_combine, rtol=1e-10, atol=1e-12)
    # identity experts: Y = C (Dᵀ X), from the expected weights
    slot_inputs = torch.einsum("bms,bmd->bsd", expected_dispatch, x)
    torch.testing.assert_close(y, torch.einsum("bms,bsd->bmd", expected_combine, slot_inputs), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: SoftMoE(16, num_experts=0), "num_experts must be a positive integer, got 0"),
        (lambda: SoftMoE(16, slots_per_expert=0), "slots_per_expert must be a positive integer, got 0"),
        (lambda: SoftMoE(16, num_experts=2, dispatch="hard"), "dispatch must be one of"),
        (lambda: SoftMoE(16, num_experts=2, combine="topk"), "combine must be one of"),
        (lambda: SoftMoE(16, 0, num_experts=2), "hidden_features must be a positive integer, got 0"),
        (lambda: SoftMoE(16, out_features=0, num_experts=2), "out_features must be a positive integer, got 0"),
        (lambda: BatchedMlp(2, 16, 0), "hidden_features must be a positive integer, got 0"),
        (lambda: SoftMoE(16, num_experts=2, bias=(True,)),
         r"bias must be one value for both layers or a pair \(fc1's, fc2's\), got \(True,\)"),
        (lambda: SoftMoE(16, num_experts=2, drop=[0.1, 0.1, 0.2]), r"drop must be one value .* got \[0.1, 0.1, 0.2\]"),
        # was: taken as True by timm's to_2tuple and nn.Linear, for either layer
        (lambda: SoftMoE(16, num_experts=2, bias="no"), "bias must be True or False, got 'no'"),
        (lambda: SoftMoE(16, num_experts=2, bias=(True, "no")), "bias must be True or False, got 'no'"),
        # was: torch's "dropout probability has to be between 0 and 1", naming no argument
        (lambda: SoftMoE(16, num_experts=2, drop=2.0), r"drop must be a number in \[0, 1\], got 2.0"),
        (lambda: SoftMoE(16, num_experts=2, drop=(0.1, -1)), r"drop must be a number in \[0, 1\], got -1"),
        (lambda: SoftMoE(16, num_experts=2, act_layer=nn.GELU()),
         r"act_layer must be an nn.Module class or a callable returning one, got a GELU instance: pass the class"),
        (lambda: SoftMoE(16, num_experts=2, act_layer="gelu"), "act_layer must be an nn.Module class .* got 'gelu'"),
        (lambda: SoftMoE(16, num_experts=2, normalize="no"), "normalize must be True or False, got 'no'"),
        (lambda: SoftMoE(16, num_experts=4, experts="mlp"),
         r"experts must be an nn.Module mapping slots \[b, n, p, d\] to \[b, n, p, d'\] .* got 'mlp'"),
        (lambda: SoftMoE(16, num_experts=4, experts=BatchedMlp(3, 16)),
         "experts holds num_experts=3 experts, but the layer has num_experts=4"),
        # were: LayerNorm.forward's TypeError, "'str' object is not callable", "Only Tensors of floating point ..."
        (lambda: SoftMoE(16, num_experts=2, norm_layer=nn.LayerNorm(16)),
         "norm_layer must be an nn.Module class or a callable returning one, got a LayerNorm instance"),
        (lambda: SoftMoE(16, num_experts=2, norm_layer="ln"), "norm_layer must be an nn.Module class .* got 'ln'"),
        (lambda: SoftMoE(16, num_experts=2, dtype=torch.int32),
         r"dtype must be a floating-point torch.dtype \(the layer's parameters\), got torch.int32"),
    ],
)
def test_bad_arguments_raise_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_custom_expert_bank_whose_output_is_not_per_slot_is_named():
    class SumsTheSlots(nn.Module):  # [b, n, p, d] -> [b, n, d]: was a reshape's "shape '[3, 2, 16]' is invalid"
        def forward(self, slots):
            return slots.sum(2)

    layer = SoftMoE(16, num_experts=2, slots_per_expert=2, experts=SumsTheSlots())
    with pytest.raises(ValueError, match=r"^experts must map slots \[b, n, p, d\] = \[3, 2, 2, 16\] to \[b, n, p, "
                                         r"d'\], got an output of shape \[3, 2, 16\]$"):
        layer(torch.randn(3, 5, 16))


@pytest.mark.parametrize(
    "shape, message",
    [((4, 16), r"input must have shape \[batch, tokens, 16\], got a tensor of shape \[4, 16\]"),
     ((2, 4, 12), r"input last dimension must equal dim=16, got shape \[2, 4, 12\]"),
     ((2, 0, 16), "at least one token")],
)
def test_bad_inputs_raise_clear_errors(shape, message):
    with pytest.raises(ValueError, match=message):
        make_layer()(torch.randn(*shape))


@pytest.mark.parametrize(
    "dtype, autocast, message",
    [(torch.int64, False, "input must be a floating-point tensor, got dtype torch.int64"),
     (torch.bfloat16, False, r"input dtype torch.bfloat16 does not match the layer's parameters \(torch.float32\): "
      r"cast one to the other \(x.to\(torch.float32\) or layer.to\(torch.bfloat16\)\), or run under torch.autocast$"),
     (torch.float64, False, r"input dtype torch.float64 does not match .*layer.to\(torch.float64\)\)$"),
     (torch.float64, True, r"input dtype torch.float64 does not match .*layer.to\(torch.float64\)\)$")],
    ids=["integers", "bf16_without_autocast", "float64", "float64_under_autocast_which_leaves_it_alone"],
)
def test_an_input_in_another_dtype_than_the_layer_is_named(dtype, autocast, message):
    x = torch.randn(2, 5, 16).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), pytest.raises(ValueError, match=message):
        make_layer()(x)
    with pytest.raises(ValueError, match="input must be a tensor of shape \\[batch, tokens, 16\\], got list"):
        make_layer()([[0.0] * 16])


def test_a_layer_left_on_the_meta_device_is_named_not_run():
    layer = make_layer(device="meta")  # was: a meta tensor returned for a CPU input, without a word
    with pytest.raises(ValueError, match=r"^input is on cpu, but the layer's parameters are on the meta device "
                                         r"\(shapes, no values\): materialise it first \(layer.to_empty"):
        layer(torch.randn(2, 5, 16))


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_autocast_takes_an_input_in_either_dtype(x_dtype):
    layer = make_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(torch.randn(2, 5, 16, dtype=x_dtype))
    assert y.dtype == torch.bfloat16 and y.shape == (2, 5, 16) and torch.isfinite(y).all()


def test_an_empty_batch_gives_an_empty_output_and_gradient():
    """As timm's ViT does: a batch of 0 examples (the last one of an evenly split loader) is not an error."""
    layer = make_layer(out_features=12)
    x = torch.randn(0, 5, 16, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 5, 12)
    y.sum().backward()
    assert x.grad.shape == (0, 5, 16)
    assert all(p.grad is not None and not p.grad.any() for p in layer.parameters())  # zero, not missing


def linear_bank():
    return StackedExperts(4, lambda: nn.Linear(8, 8))


@pytest.mark.parametrize(
    "bank, shape, message",
    [(BatchedMlp, (2, 3, 8),
      r"slots must have shape \[batch, num_experts=4, slots_per_expert, in_features=8\], got \[2, 3, 8\]"),
     (BatchedMlp, (2, 4, 1, 6), r"in_features=8\], got \[2, 4, 1, 6\]"),
     (linear_bank, (2, 3, 1, 8), r"num_experts=4, slots_per_expert, dim\], got \[2, 3, 1, 8\]")],
    ids=["three_dims", "wrong_width", "wrong_expert_count"],
)
def test_an_expert_bank_called_directly_names_the_slots_it_takes(bank, shape, message):
    with pytest.raises(ValueError, match=message):
        (bank(4, 8) if bank is BatchedMlp else bank())(torch.randn(*shape))


def test_identity_routing_needs_one_slot_per_token():
    layer = SoftMoE(8, num_experts=2, slots_per_expert=2, dispatch="identity", combine="identity")
    for tokens in (5, 3):  # more tokens than slots, and fewer (was torch's expand error)
        with pytest.raises(ValueError, match="identity routing needs num_experts \\* slots_per_expert == number of "
                                             "tokens"):
            layer(torch.randn(1, tokens, 8))


def _float64_reference_grads(layer, x):
    """Output and gradients (input and every parameter) of the float64 reference at ``layer``'s weights."""
    x = x.detach().clone().requires_grad_(True)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in layer.named_parameters()}
    experts = type("Experts", (), {"num_experts": layer.num_experts, **{
        key: params[f"experts.{key}"] for key in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")}})
    scale = params["scale"] if layer.normalize else 1.0
    y = reference_soft_moe(x, params["phi"], reference_mlp_experts(experts), scale=scale, normalize=layer.normalize)
    return y, x, params


@pytest.mark.parametrize("normalize", [True, False])
def test_gradients_match_the_float64_reference(normalize):
    """Backward of the fused router (one autograd node for the scaling and both softmaxes) and of the
    expert bank: every gradient equals autograd's through the paper's equations written as einsums."""
    torch.manual_seed(0)
    layer = make_layer(normalize=normalize).double()
    if normalize:
        layer.scale.data.fill_(2.5)
    x = torch.randn(3, 9, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grad_y = torch.randn_like(y)
    y.backward(grad_y)
    y_ref, x_ref, params_ref = _float64_reference_grads(layer, x)
    y_ref.backward(grad_y)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-11)
    for name, p in layer.named_parameters():
        torch.testing.assert_close(p.grad, params_ref[name].grad, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.parametrize("with_tokens", [True, False], ids=["normalised", "raw"])
def test_fused_router_passes_gradcheck_and_equals_plain_ops(with_tokens):
    from softmoe.routing import soft_routing

    torch.manual_seed(0)
    raw = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True) if with_tokens else None
    inputs = (raw, tokens) if with_tokens else (raw,)

    def fused(*args):
        return soft_routing(args[0], args[1] if with_tokens else None, fused=True)

    assert torch.autograd.gradcheck(fused, inputs)
    grads = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(2)]
    results = []
    for use_fused in (True, False):
        outputs = soft_routing(raw, tokens, fused=use_fused)
        results.append((outputs, torch.autograd.grad(outputs, inputs, grads)))
    (out_fused, grad_fused), (out_plain, grad_plain) = results
    for a, b in zip(out_fused + grad_fused, out_plain + grad_plain):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_fused_router_keeps_float32_for_bf16_logits_and_returns_bf16_gradients():
    from softmoe.routing import soft_routing

    raw = torch.randn(2, 7, 4).bfloat16().requires_grad_(True)
    tokens = torch.randn(2, 7, 8).bfloat16().requires_grad_(True)
    dispatch, combine = soft_routing(raw, tokens)
    assert dispatch.dtype == combine.dtype == torch.float32
    (dispatch.square().sum() + combine.square().sum()).backward()
    assert raw.grad.dtype == tokens.grad.dtype == torch.bfloat16
    plain = soft_routing(raw.float(), tokens.float(), fused=False)
    torch.testing.assert_close(dispatch, plain[0], rtol=1e-6, atol=1e-7)


def test_a_model_cast_to_bf16_infers_close_to_float32():
    """``model.to(torch.bfloat16)`` (how models are deployed): routing still normalises and softmaxes in
    float32, and the output stays within bf16's tolerance of the float32 layer's."""
    torch.manual_seed(0)
    layer = make_layer()
    x = torch.randn(2, 8, 16)
    with capture_routing(layer) as routing_fp32:
        expected = layer(x)
    layer_bf16 = make_layer()
    layer_bf16.load_state_dict(layer.state_dict())
    layer_bf16.to(torch.bfloat16)
    with torch.inference_mode(), capture_routing(layer_bf16) as routing:
        y = layer_bf16(x.bfloat16())
    assert y.dtype == torch.bfloat16 and routing[""].dispatch.dtype == torch.float32
    assert relative_error(routing[""].dispatch, routing_fp32[""].dispatch) < BF16_RELATIVE_ERROR / 4
    assert relative_error(y, expected) < BF16_RELATIVE_ERROR


@pytest.mark.parametrize("with_tokens", [True, False], ids=["normalised", "raw"])
def test_fused_router_passes_gradgradcheck(with_tokens):
    """create_graph=True: the fused router's backward is itself differentiable (its fast backward writes in place)."""
    from softmoe.routing import soft_routing

    torch.manual_seed(0)
    raw = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    if with_tokens:
        assert torch.autograd.gradgradcheck(lambda r, t: soft_routing(r, t, fused=True), (raw, tokens))
    else:
        assert torch.autograd.gradgradcheck(lambda r: soft_routing(r, None, fused=True), (raw,))


@pytest.mark.parametrize("normalize", [True, False])
def test_the_layers_second_derivatives_pass_gradgradcheck(normalize):
    torch.manual_seed(0)
    layer = SoftMoE(4, 6, num_experts=2, slots_per_expert=2, normalize=normalize).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(layer, (x,))


def test_a_bf16_layer_normalises_phi_in_float32_before_rounding_it():
    """``model.to(torch.bfloat16)``: Φ̂ = scale · l2n(Φ) is computed from the bf16 Φ in float32 and rounded once,
    not normalised in bf16 arithmetic (which would round the squares, their sum and the rsqrt)."""
    layer = make_layer(dim=64, num_experts=8).to(torch.bfloat16)
    layer.scale.data.fill_(1.7)
    x = torch.randn(2, 5, 64).bfloat16()
    phi = layer.phi.detach().float().reshape(64, 16)
    phi_hat = (layer.scale.detach().float() * phi * torch.rsqrt(phi.square().sum(0, keepdim=True) + 1e-6)).bfloat16()
    assert torch.equal(layer.raw_logits(x), torch.matmul(x, phi_hat))


@pytest.mark.parametrize("mode", ["soft", "uniform", "identity"])
def test_a_bf16_layers_routing_weights_are_float32_in_every_mode(mode):
    layer = SoftMoE(8, num_experts=3, slots_per_expert=2, dispatch=mode, combine=mode).to(torch.bfloat16)
    with torch.inference_mode(), capture_routing(layer) as routing:
        layer(torch.randn(2, 6, 8).bfloat16())
    record = routing[""]
    assert record.dispatch.dtype == record.combine.dtype == torch.float32
    if mode == "uniform":  # 1/6 and 1/6 exactly as float32 holds them, not bf16's 0.1669921875
        assert torch.all(record.dispatch == torch.tensor(1 / 6)) and torch.all(record.combine == torch.tensor(1 / 6))


def test_a_float64_layer_under_autocast_computes_in_float64():
    """Autocast leaves float64 alone: a float64 layer's output under it is the one without it, in float64."""
    layer = make_layer().double()
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    expected = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("normalize", [True, False])
def test_the_logits_are_the_papers_normalised_tokens_times_scaled_normalised_phi(normalize):
    layer = make_layer(normalize=normalize).double()
    if normalize:
        layer.scale.data.fill_(2.5)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    phi = layer.phi.detach().reshape(16, 8)
    if normalize:
        x_hat = x / torch.sqrt(x.square().sum(-1, keepdim=True) + 1e-6)
        expected = x_hat @ (2.5 * phi / torch.sqrt(phi.square().sum(0, keepdim=True) + 1e-6))
    else:
        expected = x @ phi
    logits = layer.logits(x)
    assert logits.dtype == torch.float64 and logits.shape == (2, 7, 8)
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)
    dispatch, combine = layer.routing_weights(x)  # the softmaxes of these logits
    torch.testing.assert_close(dispatch, torch.softmax(expected, dim=1), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(combine, torch.softmax(expected, dim=2), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("needs_grad", ["logits", "tokens"])
def test_the_fused_router_gives_a_gradient_to_whichever_input_alone_needs_one(needs_grad):
    from softmoe.routing import soft_routing

    raw = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=needs_grad == "logits")
    tokens = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=needs_grad == "tokens")
    wanted = raw if needs_grad == "logits" else tokens
    grads = [torch.randn(2, 5, 6, dtype=torch.float64) for _ in range(2)]
    fused, = torch.autograd.grad(soft_routing(raw, tokens, fused=True), wanted, grads)
    plain, = torch.autograd.grad(soft_routing(raw, tokens, fused=False), wanted, grads)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-14)


def test_the_fused_routers_second_derivatives_keep_the_norms_eps_for_tokens_near_zero():
    """create_graph=True: the differentiable backward uses the forward's eps (here not the default one); tokens of
    squared norm about eps (a zero-padded token, say) are where a backward with another eps goes wrong."""
    from softmoe.routing import soft_routing

    torch.manual_seed(0)
    raw = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    tokens = (3e-3 * torch.randn(2, 4, 2, dtype=torch.float64)).requires_grad_(True)
    grads = [torch.randn(2, 4, 3, dtype=torch.float64) for _ in range(2)]
    results = []
    for fused in (True, False):
        routed = soft_routing(raw, tokens, 1e-5, fused=fused)
        first = torch.autograd.grad(routed, (raw, tokens), grads, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), (raw, tokens))
        results.append(first + second)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_expert_layernorm_follows_timms_mlp_per_expert_in_float64():
    """fc1 -> GELU -> LayerNorm (its own eps, each expert its own affine) -> fc2, as timm's Mlp with norm_layer."""
    bank = BatchedMlp(3, 8, 12, 6, norm_layer=partial(nn.LayerNorm, eps=0.1)).double()
    with torch.no_grad():
        bank.norm_weight.copy_(torch.rand(3, 12) + 0.5)
        bank.norm_bias.copy_(torch.randn(3, 12))
    slots = torch.randn(2, 3, 2, 8, dtype=torch.float64)
    for i in range(3):
        h = torch.nn.functional.gelu(slots[:, i] @ bank.fc1_weight[i] + bank.fc1_bias[i])
        h = torch.nn.functional.layer_norm(h, (12,), bank.norm_weight[i], bank.norm_bias[i], eps=0.1)
        expected = h @ bank.fc2_weight[i] + bank.fc2_bias[i]
        torch.testing.assert_close(bank(slots)[:, i], expected, rtol=1e-10, atol=1e-12, msg=f"expert {i}")


def test_the_hidden_dropout_follows_the_activation_as_in_timms_mlp():
    """drop1 scales act(h) by 1/(1-p) or zeroes it; before the activation it would give act(h/(1-p)) instead."""
    bank = BatchedMlp(2, 4, 6, 6, drop=(0.5, 0.0)).double().train()
    with torch.no_grad():
        bank.fc2_weight.copy_(torch.eye(6).expand(2, 6, 6))  # fc2 passes the hidden units through
        bank.fc2_bias.zero_()
    slots = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    hidden = torch.nn.functional.gelu(torch.einsum("bnpd,ndh->bnph", slots, bank.fc1_weight) + bank.fc1_bias[:, None])
    out = bank(slots)
    kept = out != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(out[kept], 2 * hidden[kept], rtol=1e-12, atol=1e-14)


def test_the_output_dropout_drops_the_bank_output_and_a_rate_set_after_construction_counts():
    """Dropout of rate 0 is skipped (no module call), so a rate set later on ``drop2.p`` must still be read, and
    a module without a rate put in its place must still run."""
    bank = BatchedMlp(2, 4, 6, 6, drop=0.0).double().train()
    slots = torch.randn(3, 2, 5, 4, dtype=torch.float64)
    whole = bank(slots)
    bank.drop2.p = 0.5
    out = bank(slots)
    kept = out != 0
    assert kept.any() and (~kept).any()
    torch.testing.assert_close(out[kept], 2 * whole[kept], rtol=1e-12, atol=1e-14)
    bank.drop2 = nn.Threshold(float("inf"), 0.0)  # a module without a rate in its place (zeroes everything): called
    assert torch.count_nonzero(bank(slots)) == 0


def test_init_weights_resets_the_expert_layernorm_in_every_mode():
    bank = BatchedMlp(2, 8, 12, norm_layer=nn.LayerNorm)
    for mode in ("", "jax", "jax_nlhb", "moco", "reset"):
        with torch.no_grad():
            bank.norm_weight.fill_(3.0), bank.norm_bias.fill_(-1.0)
        bank.init_weights(mode)
        assert torch.all(bank.norm_weight == 1) and torch.all(bank.norm_bias == 0), mode


@pytest.mark.parametrize("normalize", [True, False])
def test_per_example_gradients_through_torch_func_match_autograd(normalize):
    # torch.func cannot run an autograd.Function written as forward(ctx, ...): the fused router gives way to its ops
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    layer = SoftMoE(8, 16, num_experts=3, slots_per_expert=2, normalize=normalize).double()
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    params = {name: param.detach() for name, param in layer.named_parameters()}

    def loss(parameters, example):
        return functional_call(layer, parameters, (example.unsqueeze(0),)).pow(2).mean()

    per_example = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(len(x)):
        layer.zero_grad()
        loss(dict(layer.named_parameters()), x[i]).backward()
        for name, param in layer.named_parameters():
            torch.testing.assert_close(per_example[name][i], param.grad, rtol=1e-12, atol=1e-14, msg=name)


def test_torch_func_grad_under_autocast_equals_autograds_float32_gradients():
    # under autocast the expert banks read their bf16 copies through ExpertLinear: torch.func casts at the matmul
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    layer = SoftMoE(8, 16, num_experts=3)
    x = torch.randn(2, 5, 8)

    def loss(parameters):
        return functional_call(layer, parameters, (x,)).float().pow(2).mean()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        through_func = grad(loss)({name: param.detach() for name, param in layer.named_parameters()})
        loss(dict(layer.named_parameters())).backward()
    for name, param in layer.named_parameters():
        assert through_func[name].dtype == param.grad.dtype == torch.float32, name
        torch.testing.assert_close(through_func[name], param.grad, rtol=1e-2, atol=1e-4, msg=name)
