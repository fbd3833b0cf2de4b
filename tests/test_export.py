"""Traceable and compilable: torch.fx, torch.export and torch.compile(fullgraph=True) give one graph that
computes what eager mode does, for the layer, the wrapper with MLP-like experts and the ViT; timm's dense
ViT of the same shape is the reference. Eager mode and compiled calls keep their input checks.
"""

from functools import partial

import pytest
import timm
import torch
from timm.layers import Mlp
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from softmoe import SoftMoE, SoftMoELayerWrapper, SoftMoEVisionTransformer, runtime
from softmoe._checks import is_exporting

VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10)
TOKENS = torch.randn(2, 12, 16)  # [batch, tokens, dim]
IMAGES = torch.randn(2, 3, 32, 32)


def soft_moe(**kwargs):
    return SoftMoE(16, 32, num_experts=4, slots_per_expert=3, **kwargs)


LAYERS = {
    "soft_moe": soft_moe,
    # 4*3 = 12 slots for the 12 tokens, as identity routing needs
    "soft_moe_uniform_dispatch_identity_combine": partial(soft_moe, dispatch="uniform", combine="identity"),
    "wrapper_linear": partial(
        SoftMoELayerWrapper, dim=16, num_experts=4, slots_per_expert=2, layer=nn.Linear, in_features=16, out_features=8
    ),
    "wrapper_timm_mlp": partial(
        SoftMoELayerWrapper, dim=16, num_experts=4, slots_per_expert=2, layer=Mlp, in_features=16, hidden_features=32
    ),
}
VITS = {
    "soft_moe_vit": lambda: SoftMoEVisionTransformer(**VIT, num_experts=4, moe_layer_index=[1, 3]),
    "soft_moe_vit_gap_registers": lambda: SoftMoEVisionTransformer(
        **VIT, num_experts=4, class_token=False, global_pool="avg", reg_tokens=2
    ),
    "timm_vit (reference)": lambda: VisionTransformer(**VIT),
}
MODELS = {
    **{name: (make, TOKENS) for name, make in LAYERS.items()},
    **{name: (make, IMAGES) for name, make in VITS.items()},
}


def eval_model(name):
    make, example = MODELS[name]
    return make().eval(), example


@pytest.fixture
def first_forward_of_a_process(monkeypatch):
    """The layers' state before their first training forward in a process: the allocator's one tuning attempt is
    still pending (switched off here, so the attempt leaves this test process's allocator alone)."""
    monkeypatch.setitem(runtime._auto_tune, "done", False)
    monkeypatch.setitem(runtime._auto_tune, "enabled", False)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_fx_symbolic_trace_computes_what_eager_does(name, first_forward_of_a_process):
    # symbolic_trace runs forward with grad enabled: in a fresh process the layer's check for the allocator's
    # tuning came before its check for tracing, and read a proxy as a bool (TraceError)
    model, example = eval_model(name)
    graph_module = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(graph_module(example), model(example), rtol=0, atol=0)
    # parameters stay the model's (get_attr), not constants baked into the graph
    assert {n for n, _ in graph_module.named_parameters()} <= {n for n, _ in model.named_parameters()}
    assert not [n for n, _ in graph_module.named_buffers() if n.startswith("_tensor_constant")]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_torch_export_computes_what_eager_does(name):
    model, example = eval_model(name)
    exported = torch.export.export(model, (example,))
    torch.testing.assert_close(exported.module()(example), model(example))  # float32 rounding
    assert set(exported.state_dict) == {n for n, _ in model.named_parameters()}  # parameters lifted, not constants


def test_exported_layer_takes_other_batch_and_token_counts():
    model = soft_moe().eval()
    batch, tokens = torch.export.Dim("batch", min=1, max=64), torch.export.Dim("tokens", min=2, max=512)
    exported = torch.export.export(model, (TOKENS,), dynamic_shapes=({0: batch, 1: tokens},))
    other = torch.randn(5, 30, 16)
    torch.testing.assert_close(exported.module()(other), model(other))


@pytest.mark.parametrize("name", ["soft_moe", "soft_moe_vit", "soft_moe_vit_gap_registers", "timm_vit (reference)"])
def test_dynamo_sees_one_graph_and_no_break(name):
    model, example = eval_model(name)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(example)
    assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons


def test_eager_calls_keep_the_input_check_after_tracing():
    model = soft_moe()
    torch.fx.symbolic_trace(model)
    torch.export.export(model, (TOKENS,))
    with pytest.raises(ValueError, match=r"input last dimension must equal dim=16, got shape \[2, 12, 8\]"):
        model(torch.randn(2, 12, 8))


def test_a_compiled_layer_checks_its_input_as_eager_mode_does():
    compiled = torch.compile(soft_moe(), backend="aot_eager")
    compiled(TOKENS)
    with pytest.raises(ValueError, match=r"input last dimension must equal dim=16, got shape \[2, 12, 8\]"):
        compiled(torch.randn(2, 12, 8))
    with pytest.raises(ValueError, match=r"must have shape \[batch, tokens, 16\], got a tensor of shape \[12, 16\]"):
        compiled(torch.randn(12, 16))


def test_a_compiled_identity_router_names_a_token_count_it_cannot_take():
    compiled = torch.compile(SoftMoE(8, num_experts=4, dispatch="identity"), backend="eager")
    compiled(torch.randn(2, 4, 8))
    with pytest.raises(ValueError, match=r"identity routing needs num_experts \* slots_per_expert == number of "
                                         r"tokens, got 4 \* 1 = 4 slots for 5 tokens"):
        compiled(torch.randn(2, 5, 8))  # was torch's "expand: attempting to expand a dimension of length s27 -> 4"


def test_under_fullgraph_a_wrong_input_still_gets_the_line_if_inside_torchs_observed_exception():
    # docs/library.md says so: fullgraph=True lets no exception leave a graph, so torch reports it as its own, unless
    # an earlier compile of this forward already gave up on the frame (then it runs eagerly: the plain ValueError)
    compiled = torch.compile(soft_moe(), backend="eager", fullgraph=True)
    compiled(TOKENS)
    with pytest.raises((ValueError, torch._dynamo.exc.Unsupported), match=r"input last dimension must equal dim=16"):
        compiled(torch.randn(2, 12, 8))


def test_registered_test_model_exports():
    model = timm.create_model("test_soft_moe_vit2", img_size=64).eval()
    example = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(torch.export.export(model, (example,)).module()(example), model(example))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["soft_moe", "soft_moe_vit"])
def test_compiled_fullgraph_computes_what_eager_does(name):
    model, example = eval_model(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(example), model(example))


@pytest.mark.slow
def test_compiled_training_step_matches_eager_gradients():
    model = SoftMoEVisionTransformer(**VIT, num_experts=4)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    compiled(IMAGES).square().mean().backward()
    compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model(IMAGES).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(compiled_grads[name], param.grad, msg=name)


class ExportingBranch(nn.Module):
    def forward(self, x):
        return x * 2 if is_exporting() else x * 3


@pytest.mark.parametrize("trace", ["compile", "export", "export_strict"])
def test_is_exporting_is_true_under_torch_export_only(trace):
    """torch 2.11's dynamo folds torch.compiler.is_exporting() to True under every torch.compile: a compiled model
    then skipped its input checks and cast its expert weights in the graph. softmoe's own test reads the flag."""
    x = torch.ones(2)
    if trace == "compile":
        out = torch.compile(ExportingBranch(), backend="eager", fullgraph=True)(x)
    else:
        out = torch.export.export(ExportingBranch(), (x,), strict=trace == "export_strict").module()(x)
    assert torch.equal(out, x * (3 if trace == "compile" else 2))
    assert not is_exporting()  # and eagerly
