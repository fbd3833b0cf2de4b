"""Expert weights packed for oneDNN (softmoe.pack_experts_for_cpu): CPU float32 inference as the paper's MLP experts
compute it, and every call the packing cannot serve runs the bank's own path."""

import contextlib
import copy
import io

import pytest
import torch
from torch import nn

import softmoe
from softmoe import BatchedMlp, pack_experts_for_cpu
from softmoe.cpu_packing import MIN_ROWS, packing_available
from replaced_weights import WAYS, calls_at_freed_addresses

pytestmark = pytest.mark.skipif(not packing_available(), reason="torch built without oneDNN")


def make_bank(seed=0, **kwargs):
    torch.manual_seed(seed)
    options = dict(num_experts=4, in_features=8, hidden_features=16, out_features=6)
    options.update(kwargs)
    return BatchedMlp(**options).eval()


@torch.no_grad()
def reference_mlp(bank: BatchedMlp, slots: torch.Tensor) -> torch.Tensor:
    """Each expert's fc1 -> act -> fc2 in float64, one expert at a time: [b, n, p, d] -> [b, n, p, o]."""
    outputs = []
    for e in range(bank.num_experts):
        x = slots[:, e].double()
        hidden = x @ bank.fc1_weight[e].double()
        if bank.fc1_bias is not None:
            hidden = hidden + bank.fc1_bias[e].double()
        hidden = bank.act(hidden)
        out = hidden @ bank.fc2_weight[e].double()
        if bank.fc2_bias is not None:
            out = out + bank.fc2_bias[e].double()
        outputs.append(out)
    return torch.stack(outputs, dim=1)


def packed_and_unpacked(bank: BatchedMlp, slots: torch.Tensor):
    """The bank's output through its packing (which it must have used) and, as a plain copy, without."""
    plain = copy.deepcopy(bank)
    plain.cpu_packing = None
    pack_experts_for_cpu(bank)
    with torch.inference_mode():
        packed_out, plain_out = bank(slots), plain(slots)
    assert bank.cpu_packing.key is not None, "the packed path did not run"
    return packed_out, plain_out


@pytest.mark.parametrize("act_layer", [nn.GELU, lambda: nn.GELU(approximate="tanh"), nn.ReLU, nn.SiLU])
@pytest.mark.parametrize("bias", [True, False, (True, False)])
@pytest.mark.parametrize("batch,slots_per_expert", [(MIN_ROWS, 1), (3, 2), (5, 3)])
def test_packed_bank_matches_float64_reference(act_layer, bias, batch, slots_per_expert):
    bank = make_bank(act_layer=act_layer, bias=bias)
    slots = torch.randn(batch, 4, slots_per_expert, 8)
    packed_out, plain_out = packed_and_unpacked(bank, slots)
    expected = reference_mlp(bank, slots)
    assert packed_out.shape == expected.shape == (batch, 4, slots_per_expert, 6)
    torch.testing.assert_close(packed_out.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_out, plain_out, rtol=1e-5, atol=1e-5)


def test_no_grad_runs_packed_as_inference_mode_does_and_reads_what_inference_mode_packed():
    bank = make_bank()
    slots = torch.randn(MIN_ROWS, 4, 1, 8)
    pack_experts_for_cpu(bank)
    with torch.no_grad():
        packed_no_grad = bank(slots)
    assert bank.cpu_packing.key is not None
    torch.testing.assert_close(packed_no_grad.double(), reference_mlp(bank, slots), rtol=1e-5, atol=1e-5)
    pack_experts_for_cpu(bank)  # packed afresh, this time under inference_mode, then read under no_grad
    with torch.inference_mode():
        packed_inference = bank(slots)
    with torch.no_grad():
        assert torch.equal(bank(slots), packed_inference)


def test_each_example_and_expert_stays_its_own():
    """Changing one example's slots of one expert changes that output row only (no mixing across experts/rows)."""
    bank = make_bank()
    pack_experts_for_cpu(bank)
    slots = torch.randn(MIN_ROWS, 4, 1, 8)
    changed = slots.clone()
    changed[2, 1] += 1.0
    with torch.inference_mode():
        before, after = bank(slots), bank(changed)
    differs = (before - after).abs().amax(dim=(2, 3)) > 0
    assert differs[2, 1] and differs.sum() == 1


@contextlib.contextmanager
def inference_under_autocast():
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        yield


def fallback_cases():
    inference = torch.inference_mode
    return {
        "grad enabled": (make_bank, MIN_ROWS, torch.enable_grad),
        "autocast": (make_bank, MIN_ROWS, inference_under_autocast),
        "too few rows": (make_bank, MIN_ROWS - 1, inference),
        "dropout in training": (lambda: make_bank(drop=0.5).train(), MIN_ROWS, inference),
        "second dropout only": (lambda: make_bank(drop=(0.0, 0.5)).train(), MIN_ROWS, inference),
        "expert LayerNorm": (lambda: make_bank(norm_layer=nn.LayerNorm), MIN_ROWS, inference),
        "float64 weights": (lambda: make_bank(dtype=torch.float64), MIN_ROWS, inference),
    }


@pytest.mark.parametrize("case", list(fallback_cases()))
def test_calls_packing_cannot_serve_run_the_banks_own_path(case):
    build, rows, context = fallback_cases()[case]
    bank = build()
    plain = copy.deepcopy(bank)
    pack_experts_for_cpu(bank)
    slots = torch.randn(rows, 4, 1, 8, dtype=bank.fc1_weight.dtype)
    torch.manual_seed(1)  # the same dropout masks for both
    with context():
        out = bank(slots)
    torch.manual_seed(1)
    with context():
        expected = plain(slots)
    assert bank.cpu_packing.key is None, f"{case}: the packed path ran"
    assert torch.equal(out, expected)


@pytest.mark.parametrize("case", list(fallback_cases()))
def test_a_call_packing_cannot_serve_does_not_ask_for_the_weights_key(case):
    """The weights' key (a version and storage test per weight) is work for the packed path alone."""
    build, rows, context = fallback_cases()[case]
    bank = build()
    pack_experts_for_cpu(bank)
    x = torch.randn(4, rows, 8, dtype=bank.fc1_weight.dtype)  # [n, rows, in], as the bank passes it

    def key():
        raise AssertionError(f"{case}: the key was asked for")

    with context():
        assert bank.cpu_packing.forward(bank, x, key) is None
    with torch.inference_mode():  # and a call it serves asks once
        asked = []
        plain = make_bank()
        pack_experts_for_cpu(plain)
        plain.cpu_packing.forward(plain, torch.randn(4, MIN_ROWS, 8), lambda: asked.append(1) or ("k",))
    assert asked == [1] and plain.cpu_packing.key == ("k",)


@pytest.mark.parametrize("trace", ["fx", "compile"])
def test_a_traced_packed_bank_keeps_its_own_path(trace):
    """fx and torch.compile trace the bank's own path (oneDNN's packed tensors cannot enter a graph), fullgraph."""
    bank = make_bank()
    plain = copy.deepcopy(bank)
    pack_experts_for_cpu(bank)
    slots = torch.randn(MIN_ROWS, 4, 1, 8)
    traced = torch.fx.symbolic_trace(bank) if trace == "fx" else torch.compile(bank, backend="eager", fullgraph=True)
    with torch.inference_mode():
        out, expected = traced(slots), plain(slots)
    assert bank.cpu_packing.key is None
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_training_after_packing_reaches_every_parameter():
    bank = make_bank().train()
    pack_experts_for_cpu(bank)
    bank(torch.randn(MIN_ROWS, 4, 1, 8)).square().sum().backward()
    for name, parameter in bank.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_weights_changed_since_packing_are_packed_again():
    bank = make_bank()
    pack_experts_for_cpu(bank)
    slots = torch.randn(MIN_ROWS, 4, 1, 8)

    def check(what):
        with torch.inference_mode():
            out = bank(slots)
        torch.testing.assert_close(out.double(), reference_mlp(bank, slots), rtol=1e-5, atol=1e-5, msg=what)

    check("first call")
    optimizer = torch.optim.SGD(bank.parameters(), lr=0.5)  # an optimizer step: counted by the step hook
    bank(slots).sum().backward()
    optimizer.step()
    check("after an optimizer step")
    with torch.no_grad():
        bank.fc2_weight.mul_(-2.0)  # an in-place write: the version counter
    check("after an in-place write")
    bank.load_state_dict(make_bank(seed=7).state_dict())
    check("after load_state_dict")


@pytest.mark.parametrize("made_in", ["grad mode", "inference mode"])
@pytest.mark.parametrize("way", WAYS)
def test_weights_replaced_by_new_tensors_at_the_freed_ones_address_are_packed_again(way, made_in):
    """The packed weights were taken as current for new weights at the old ones' address, and the forward used the
    old ones (8 of 10 calls here). Weights made in inference mode have no version counter (reading it raised):
    they are packed at every call."""
    bank = make_bank()
    pack_experts_for_cpu(bank)
    slots = torch.randn(MIN_ROWS, 4, 1, 8)

    def new_weights(seed):
        with torch.inference_mode(made_in == "inference mode"):
            return make_bank(seed=seed).state_dict()

    with torch.inference_mode():
        for seed, out in calls_at_freed_addresses(bank, way, new_weights, (slots,)):
            expected = reference_mlp(make_bank(seed=seed), slots)
            torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5, msg=f"call {seed}")


def test_a_packed_model_infers_as_the_unpacked_one_and_unpacking_frees():
    model = softmoe.soft_moe_vit_tiny(img_size=32, patch_size=8, num_classes=5, moe_layer_index=[2, 3]).eval()
    images = torch.randn(MIN_ROWS, 3, 32, 32)
    with torch.inference_mode():
        expected = model(images)
        assert pack_experts_for_cpu(model) == 2
        packed = model(images)
        banks = [m for m in model.modules() if isinstance(m, BatchedMlp)]
        assert all(bank.cpu_packing.key is not None for bank in banks)
        torch.testing.assert_close(packed, expected, rtol=1e-5, atol=1e-5)
        assert pack_experts_for_cpu(model, pack=False) == 2
        assert all(bank.cpu_packing is None for bank in banks)
        assert torch.equal(model(images), expected)


def test_a_packed_bank_copies_pickles_and_keeps_its_state_dict():
    bank = make_bank()
    keys = list(bank.state_dict())
    pack_experts_for_cpu(bank)
    slots = torch.randn(MIN_ROWS, 4, 1, 8)
    with torch.inference_mode():
        out = bank(slots)  # packed: oneDNN tensors held, which neither copy nor pickle
    buffer = io.BytesIO()
    torch.save(bank, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(bank), torch.load(buffer, weights_only=False)):
        assert other.cpu_packing is not None and other.cpu_packing.key is None  # packs again when it runs
        with torch.inference_mode():
            torch.testing.assert_close(other(slots), out, rtol=0, atol=0)
    assert list(bank.state_dict()) == keys


def test_bad_module_names_the_argument():
    with pytest.raises(TypeError, match="module must be an nn.Module, got str"):
        pack_experts_for_cpu("model")
    with pytest.raises(ValueError, match="pack must be True or False, got 'yes'"):  # was: taken as True
        pack_experts_for_cpu(nn.Linear(2, 2), pack="yes")


def test_the_float64_reference_sees_a_wrong_expert():
    """The reference can fail: swapping two experts' fc2 weights changes the outputs it is compared with."""
    bank = make_bank()
    slots = torch.randn(MIN_ROWS, 4, 1, 8)
    expected = reference_mlp(bank, slots)
    with torch.no_grad():
        bank.fc2_weight[[0, 1]] = bank.fc2_weight[[1, 0]].clone()
    pack_experts_for_cpu(bank)
    with torch.inference_mode():
        out = bank(slots).double()
    assert not torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert (out[:, 2:] - expected[:, 2:]).abs().max() < 1e-5  # the untouched experts still agree
