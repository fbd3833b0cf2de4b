"""A compiled Soft MoE ViT under autocast reads the expert banks' low-precision copies, brought up to date eagerly
before its graph (``hold_expert_copies``), instead of casting every expert weight inside the graph at every call;
and it computes what eager mode computes through optimizer steps and in-place weight edits. AOTAutograd's own
graphs are inspected (``aot_eager``: no inductor code generation, so these run in seconds on a CPU)."""

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd
from torch._functorch.partitioners import min_cut_rematerialization_partition

from softmoe import SoftMoE, SoftMoEVisionTransformer
from softmoe.experts import hold_expert_copies

NUM_EXPERTS = 4
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=10, num_experts=NUM_EXPERTS,
           moe_layer_index=[2, 3])
IMAGES = torch.randn(2, 3, 32, 32)


def twin_models():
    torch.manual_seed(0)
    model, eager = SoftMoEVisionTransformer(**VIT), SoftMoEVisionTransformer(**VIT)
    eager.load_state_dict(model.state_dict())
    return model, eager


def graph_catcher():
    """A backend keeping AOTAutograd's forward, backward and inference graphs (min-cut partition, as inductor's)."""
    graphs = []

    def keep(kind):
        def compiler(graph_module, example_inputs):
            graphs.append((kind, graph_module))
            return make_boxed_func(graph_module.forward)
        return compiler

    backend = aot_autograd(fw_compiler=keep("forward"), bw_compiler=keep("backward"),
                           inference_compiler=keep("inference"), partition_fn=min_cut_rematerialization_partition)
    return backend, graphs


def expert_weight_reads(graph_module):
    """(casts of a float32 expert weight input, bf16 expert-weight-shaped inputs) of one graph."""
    def is_expert_weight(node, dtype):
        value = node.meta.get("val") if node.op == "placeholder" else None
        return value is not None and value.ndim == 3 and value.shape[0] == NUM_EXPERTS and value.dtype == dtype

    nodes = list(graph_module.graph.nodes)
    casts = [n for n in nodes if n.op == "call_function" and "_to_copy" in str(n.target)
             and isinstance(n.args[0], torch.fx.Node) and is_expert_weight(n.args[0], torch.float32)]
    return len(casts), sum(is_expert_weight(n, torch.bfloat16) for n in nodes)


@pytest.mark.parametrize("reads_copies", [True, False])
def test_a_compiled_forward_under_autocast_reads_the_copies_instead_of_casting_each_expert_weight(reads_copies):
    model, _ = twin_models()
    model.compiled_reads_expert_copies = reads_copies
    backend, graphs = graph_catcher()
    compiled = torch.compile(model, backend=backend)
    with torch.autocast("cpu", torch.bfloat16):
        compiled(IMAGES).float().sum().backward()
        with torch.no_grad():
            compiled(IMAGES)
    reads = {kind: expert_weight_reads(graph) for kind, graph in graphs if kind != "backward"}
    assert set(reads) == {"forward", "inference"}
    # 2 MoE blocks x (fc1, fc2): each weight either cast in the graph or read as its bf16 copy
    expected = (0, 4) if reads_copies else (4, 0)
    assert reads == {"forward": expected, "inference": expected}


class OwnModel(torch.nn.Module):
    """A model of a user's own around a Soft MoE layer, holding the copies as docs/library.md tells it to."""

    def __init__(self, hold: bool):
        super().__init__()
        self.hold = hold
        self.embed = torch.nn.Linear(8, 16)
        self.moe = SoftMoE(16, num_experts=NUM_EXPERTS, slots_per_expert=1)

    def forward(self, x):
        if self.hold:
            hold_expert_copies(self, True)
        x = self.moe(self.embed(x))
        if self.hold:
            hold_expert_copies(self, False)
        return x


@pytest.mark.parametrize("hold", [True, False])
def test_a_model_of_ones_own_compiled_under_autocast_reads_the_copies_it_holds(hold):
    torch.manual_seed(0)
    model = OwnModel(hold)
    backend, graphs = graph_catcher()
    compiled = torch.compile(model, backend=backend)
    tokens = torch.randn(2, 5, 8)
    with torch.autocast("cpu", torch.bfloat16):
        compiled(tokens).float().sum().backward()
        with torch.no_grad():
            out = compiled(tokens)
    reads = [expert_weight_reads(graph) for kind, graph in graphs if kind in ("forward", "inference")]
    assert len(reads) == 2  # the graph between the two holds: its forward and its inference graph
    assert set(reads) == {(0, 2) if hold else (2, 0)}  # fc1 and fc2: read as bf16 copies, or cast in the graph
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        torch.testing.assert_close(out, model(tokens), rtol=0, atol=0)


def test_compiled_training_under_autocast_follows_eager_through_optimizer_steps_and_weight_edits():
    model, eager = twin_models()
    compiled = torch.compile(model, backend="aot_eager")
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, eager)]
    outputs = []
    for step in range(3):
        outputs.append([])
        for module, optimizer in zip((compiled, eager), optimizers):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", torch.bfloat16):
                out = module(IMAGES)
            out.float().square().mean().backward()
            optimizer.step()
            outputs[-1].append(out.float())
        torch.testing.assert_close(*outputs[-1], rtol=0.02, atol=0.02)
    # each step moves the output by more than that tolerance, so a copy one step stale would be seen
    assert (outputs[2][1] - outputs[1][1]).abs().max() > 0.05
    with torch.no_grad():
        for module in (model, eager):  # an in-place edit: no optimizer step, only the weight's version changes
            module.blocks[3].mlp.experts.fc1_weight.mul_(3.0)
        with torch.autocast("cpu", torch.bfloat16):
            edited, reference = compiled(IMAGES).float(), eager(IMAGES).float()
            # forward_features called on its own holds nothing: the graph casts the weights, as it always did
            features = torch.compile(model.forward_features, backend="aot_eager")(IMAGES).float()
            torch.testing.assert_close(features, eager.forward_features(IMAGES).float(), rtol=0.02, atol=0.02)
    torch.testing.assert_close(edited, reference, rtol=0.02, atol=0.02)
    assert (reference - outputs[2][1]).abs().max() > 0.05


def test_the_copies_are_held_only_for_the_compiled_call_and_released_by_an_optimizer_step():
    model, _ = twin_models()
    banks = [model.blocks[i].mlp.experts for i in VIT["moe_layer_index"]]
    hold_expert_copies(model, True)  # autocast off: nothing to hold
    assert not any(bank._copies_held for bank in banks)
    with torch.autocast("cpu", torch.bfloat16):
        hold_expert_copies(model, True)
    assert all(bank._copies_held and bank.copy_is_current("fc1_weight") for bank in banks)
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # a step's post-hook releases them
    assert not any(bank._copies_held for bank in banks)
    compiled = torch.compile(model, backend="aot_eager")
    with torch.autocast("cpu", torch.bfloat16):
        compiled(IMAGES)
    assert not any(bank._copies_held for bank in banks)  # held for the call only


def test_a_compiled_forward_that_raises_releases_the_copies():
    """Was: a wrong input's error inside the held region left the copies held, and the next compiled float32 call
    read them ("expected scalar type Float but found BFloat16") until an optimizer step."""
    model, eager = twin_models()
    compiled = torch.compile(model, backend="aot_eager")
    with torch.autocast("cpu", torch.bfloat16):
        compiled(IMAGES)
        with pytest.raises(ValueError, match="img_size"):
            compiled(torch.randn(2, 3, 40, 40))  # the library's own one line for a wrong image size
    assert not any(bank._copies_held for bank in model.modules() if hasattr(bank, "_copies_held"))
    torch.testing.assert_close(compiled(IMAGES), eager(IMAGES))  # float32


def test_under_autocast_dynamo_breaks_the_graph_only_to_hold_the_copies_unless_told_not_to():
    """The cost of reading the copies: graph breaks around the model, so fullgraph=True needs
    compiled_reads_expert_copies off."""
    model, _ = twin_models()
    model.eval()
    with torch.autocast("cpu", torch.bfloat16):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(IMAGES)
        reasons = [str(reason.reason) for reason in explanation.break_reasons]
        assert explanation.graph_count <= 2 and reasons and all("hold_expert_copies" in r for r in reasons), reasons
        model.compiled_reads_expert_copies = False
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(model)(IMAGES)
        assert (explanation.graph_count, explanation.graph_break_count) == (1, 0), explanation.break_reasons
        torch.compile(model, fullgraph=True, backend="aot_eager")(IMAGES)


def test_a_compiled_forward_reads_the_copies_softmoe_adamw_wrote_without_casting_them_again():
    """softmoe's AdamW writes each copy in its update (2 bytes, not the recast's 6): the held copy is that one."""
    from softmoe.optim import AdamW

    model, eager = twin_models()
    compiled = torch.compile(model, backend="aot_eager")
    # the eager twin steps first: any optimizer step in the process makes every copy stale but the ones it wrote
    optimizers = [AdamW(m.parameters(), lr=1e-3, state_dtype="float32") for m in (eager, model)]
    banks = [model.blocks[i].mlp.experts for i in VIT["moe_layer_index"]]
    for step in range(3):
        outputs = []
        for module, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", torch.bfloat16):
                out = module(IMAGES)
            out.float().square().mean().backward()
            outputs.append(out.float())
            optimizer.step()
        torch.testing.assert_close(*outputs, rtol=0.02, atol=0.02)
        copies = [bank._low_precision[name][1] for bank in banks for name in ("fc1_weight", "fc2_weight")]
        written = [copy._version for copy in copies]  # an in-place recast would bump these
        assert all(bank.copy_is_current(name) for bank in banks for name in ("fc1_weight", "fc2_weight"))
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            compiled(IMAGES)
        assert [copy._version for copy in copies] == written, step


@pytest.mark.parametrize("device_has_the_kernel", [True, False])
def test_a_compiled_backward_takes_the_expert_weight_gradients_in_float32_from_the_gemm(device_has_the_kernel,
                                                                                       monkeypatch):
    """Where the device has aten::bmm.dtype (CUDA), the compiled backward writes an expert weight's float32 gradient
    in the GEMM itself, as eager mode does, instead of a bf16 product cast afterwards (6 bytes per expert parameter
    and step). Traced on fake CPU tensors, so nothing runs (the CPU has no such kernel): the device list is widened
    for the trace."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    import softmoe.experts as experts
    if device_has_the_kernel:
        monkeypatch.setattr(experts, "_FLOAT32_GEMM_DEVICES", ("cpu",))
    backend, graphs = graph_catcher()
    with FakeTensorMode():
        x = torch.empty(NUM_EXPERTS, 8, 16, dtype=torch.bfloat16, requires_grad=True)
        weight = torch.empty(NUM_EXPERTS, 16, 32, requires_grad=True)
        bias = torch.empty(NUM_EXPERTS, 32, requires_grad=True)
        apply = torch.compile(experts.ExpertLinear.apply, backend=backend, fullgraph=True)
        apply(x, weight, weight.detach().to(torch.bfloat16), bias).float().sum().backward()
        assert weight.grad.dtype == torch.float32
    (backward,) = [graph for kind, graph in graphs if kind == "backward"]
    grad_weight = backward.graph.output_node().args[0][1]
    if device_has_the_kernel:
        assert grad_weight.target == torch.ops.aten.bmm.dtype and grad_weight.args[2] == torch.float32
    else:  # the product in bf16, then a cast
        assert grad_weight.target == torch.ops.aten._to_copy.default
        assert grad_weight.args[0].target == torch.ops.aten.bmm.default


@pytest.mark.parametrize("reading_held_copies", [True, False])
def test_the_benchmarks_compiled_layer_reads_its_held_copies_as_the_model_does(reading_held_copies):
    """The GPU suite times the compiled layer as a compiled model runs it (``ReadingHeldCopies``); compiled bare,
    the layer casts its 2 expert weights in the graph at every call."""
    from softmoe.bench.layer import ReadingHeldCopies

    torch.manual_seed(0)
    layer = SoftMoE(16, num_experts=NUM_EXPERTS, slots_per_expert=1)
    backend, graphs = graph_catcher()
    compiled = torch.compile(ReadingHeldCopies(layer) if reading_held_copies else layer, backend=backend)
    with torch.autocast("cpu", torch.bfloat16):
        compiled(torch.randn(2, 6, 16)).float().sum().backward()
    reads = [expert_weight_reads(graph) for kind, graph in graphs if kind == "forward"]
    assert reads == [(0, 2) if reading_held_copies else (2, 0)]
    assert layer.experts.fc1_weight.grad.dtype == torch.float32 and layer.experts.fc1_weight.grad.abs().sum() > 0
