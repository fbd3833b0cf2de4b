"""bf16 on CPU and the allocator: the experts' cached bf16 weights compute what autocast's own casts compute,
and are recast exactly when the weights change; the helpers that decide and warn.

No timings here: the speed lives in experiments/throughput/.
"""

import copy
import ctypes
import logging
import sys

import pytest
import torch

import softmoe.runtime as runtime
from softmoe import SoftMoE, tune_allocator
from softmoe.harness.precision import autocast, precision_name, slow_precision_warning, warn_if_slow
from processes import REPO, run_from
from replaced_weights import WAYS, calls_at_freed_addresses


def _layer():
    torch.manual_seed(0)
    return SoftMoE(16, 32, num_experts=4, slots_per_expert=2)


def _uncached(layer):
    """``layer`` computing as plain autocast does: every call casts the weights afresh."""
    layer.experts.compute_weight = lambda name: getattr(layer.experts, name)
    return layer


def test_cached_bf16_weights_give_autocasts_outputs_and_gradients():
    cached = _layer()
    plain = _uncached(copy.deepcopy(cached))
    x = torch.randn(3, 9, 16)
    results = []
    for layer in (cached, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        y.float().square().sum().backward()
        results.append((y, {name: p.grad for name, p in layer.named_parameters()}))
    (y_cached, grads_cached), (y_plain, grads_plain) = results
    assert y_cached.dtype == torch.bfloat16
    torch.testing.assert_close(y_cached, y_plain, rtol=0, atol=0)
    for name, grad in grads_plain.items():
        assert grads_cached[name].dtype == torch.float32
        torch.testing.assert_close(grads_cached[name], grad, rtol=0, atol=0, msg=name)


def test_second_derivatives_through_cached_bf16_weights_are_autocasts():
    """create_graph=True (a gradient penalty): the gradient's own gradient reaches the weights through their
    cached copies as it does through autocast's casts."""
    cached = _layer()
    plain = _uncached(copy.deepcopy(cached))
    results = []
    for layer in (cached, plain):
        x = torch.randn(3, 9, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            grad_x, = torch.autograd.grad(y.float().square().sum(), x, create_graph=True)
        grad_x.square().sum().backward()
        results.append({name: p.grad for name, p in layer.named_parameters()})
    for name, grad in results[1].items():
        torch.testing.assert_close(results[0][name], grad, rtol=1e-2, atol=1e-5, msg=name)


@pytest.mark.parametrize("optimizer", ["adamw_fused", "adamw_foreach", "sgd"])
def test_cached_bf16_weights_follow_every_optimizer_step(optimizer):
    """Fused AdamW updates weights without bumping their version counters; the copies still follow."""
    make = {
        "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
        "adamw_foreach": lambda params: torch.optim.AdamW(params, lr=1e-2, foreach=True),
        "sgd": lambda params: torch.optim.SGD(params, lr=0.5),
    }[optimizer]
    cached = _layer()
    plain = _uncached(copy.deepcopy(cached))
    x = torch.randn(3, 9, 16)
    for layer in (cached, plain):
        opt = make(layer.parameters())
        for _ in range(3):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = layer(x).float().square().sum()
            loss.backward()
            opt.step()
    for (name, p_cached), p_plain in zip(cached.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p_cached, p_plain, rtol=0, atol=0, msg=name)


def test_cached_bf16_weights_follow_load_state_dict_and_are_reused_otherwise():
    layer, other = _layer(), _layer()
    torch.nn.init.normal_(other.experts.fc1_weight)
    x = torch.randn(2, 9, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        copy_before = layer.experts._low_precision["fc1_weight"][1]
        layer(x)
        assert layer.experts._low_precision["fc1_weight"][1] is copy_before  # reused, not recast
        layer.load_state_dict(other.state_dict())
        y = layer(x)
        y_expected = _uncached(copy.deepcopy(other))(x)
    torch.testing.assert_close(y, y_expected, rtol=0, atol=0)


def test_a_weight_whose_data_is_replaced_is_recast():
    """``weight.data = new`` bumps no version counter and counts no optimizer step: the copy is keyed on the
    weight's storage too."""
    layer = _layer()
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
        layer.experts.fc1_weight.data = 2 * layer.experts.fc1_weight.detach()
        y = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = _uncached(layer)(x)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


@pytest.mark.parametrize("way", WAYS)
def test_a_weight_replaced_by_a_new_tensor_at_the_freed_ones_address_is_recast(way):
    """The copy was taken as current for a new weight at the old one's address, and the forward used the old
    weights' copy (8 of 10 calls here). The key holds the weight itself, weakly."""
    layer = _layer().eval()
    x = torch.randn(2, 9, 16)

    def new_weights(seed):
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.randn(value.shape, generator=generator) for name, value in layer.state_dict().items()}

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        for seed, y in calls_at_freed_addresses(layer, way, new_weights, (x,)):
            expected = torch.func.functional_call(_uncached(copy.deepcopy(layer)), new_weights(seed), (x,))
            torch.testing.assert_close(y, expected, rtol=0, atol=0, msg=f"call {seed}")


def test_a_copy_made_in_inference_mode_serves_training():
    layer = _layer()
    plain = _uncached(copy.deepcopy(layer))
    x = torch.randn(2, 9, 16)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)  # makes the bf16 copies, as inference tensors
    for each in (layer, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            each(x).float().square().sum().backward()
    for name, parameter in plain.named_parameters():  # the gradients autocast's own casts give
        torch.testing.assert_close(dict(layer.named_parameters())[name].grad, parameter.grad, rtol=0, atol=0, msg=name)


def test_under_autocast_the_routing_casts_only_the_two_weights_it_hands_to_the_bf16_matmuls():
    """The bf16 logits are scaled by the float32 inverse norms in one mixed-dtype product (float32 out), not cast to
    float32 first: of the [b, m, s] tensors the forward makes, only the dispatch and combine weights are casts."""
    from torch.utils._python_dispatch import TorchDispatchMode

    layer = SoftMoE(16, 32, num_experts=3, slots_per_expert=2)
    x = torch.randn(2, 5, 16)
    routing_shape = (2, 5, 6)

    class RoutingCasts(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.casts = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket is torch.ops.aten._to_copy and tuple(out.shape) == routing_shape:
                self.casts.append((args[0].dtype, out.dtype))
            return out

    for grad in (False, True):
        with RoutingCasts() as mode, torch.set_grad_enabled(grad), torch.autocast("cpu", torch.bfloat16):
            layer(x)
        assert mode.casts == [(torch.float32, torch.bfloat16)] * 2, grad


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("precision", [torch.float32, torch.bfloat16])
def test_a_forward_without_gradients_gives_the_training_forwards_outputs_bit_for_bit(normalize, precision):
    """Without gradients the routing and the experts' products skip their autograd nodes (a cost per call) and run
    the same ops: the outputs must not move by a bit, under autocast (the held bf16 copies) or not."""
    layer = SoftMoE(16, 32, num_experts=3, slots_per_expert=2, normalize=normalize)
    x = torch.randn(2, 5, 16)
    with torch.autocast("cpu", torch.bfloat16, enabled=precision == torch.bfloat16):
        trained = layer(x)
        with torch.no_grad():
            inferred = layer(x)
        with torch.inference_mode():
            inferred_in_inference_mode = layer(x)
    assert trained.grad_fn is not None and trained.dtype == precision
    assert torch.equal(inferred, trained.detach()) and torch.equal(inferred_in_inference_mode, inferred)


def test_a_layer_pickles_after_an_autocast_forward_without_its_copies(tmp_path):
    """Was: ``TypeError: cannot pickle 'weakref.ReferenceType' object`` from ``torch.save(model)`` after any autocast
    forward (the copies' keys hold the weights weakly); the copies are not saved: they are remade from the weights."""
    layer, x = _layer(), torch.randn(3, 9, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = layer(x)
    assert layer.experts._low_precision  # the copies the save must leave out
    torch.save(layer, tmp_path / "layer.pt")
    loaded = torch.load(tmp_path / "layer.pt", weights_only=False)
    assert not loaded.experts._low_precision and layer.experts._low_precision  # the original keeps its copies
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)
    assert copy.deepcopy(layer).experts._low_precision == {}


def test_float32_forward_keeps_no_low_precision_copy():
    layer = _layer()
    layer(torch.randn(2, 9, 16))
    assert layer.experts._low_precision == {}


def test_autocast_helper_is_a_no_op_for_fp32_and_bf16_otherwise():
    cpu = torch.device("cpu")
    with autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with autocast(cpu, "fp16"):  # trainer.precision=fp16 is for CUDA (with a GradScaler); the helper's dtype alone
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.float16
    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    assert [precision_name(dtype) for dtype in dtypes] == ["fp32", "bf16", "fp16"]


@pytest.mark.parametrize("flags, native", [
    ({"avx2", "fma"}, False),                  # Zen 3: bf16 emulated
    ({"avx512f", "avx512_bf16"}, True),        # Zen 4/5, Cooper Lake
    ({"avx512f", "amx_bf16", "amx_tile"}, True),  # Sapphire Rapids
    ({"fp", "asimd", "bf16"}, True),           # Arm v8.6+
    (set(), None),                             # flags unreadable
])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch, flags, native):
    monkeypatch.setattr(runtime, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(runtime.platform, "system", lambda: "Linux")
    assert runtime.cpu_has_native_bf16() is native


def test_bf16_warns_once_only_on_a_cpu_without_native_bf16(monkeypatch, caplog):
    import softmoe.harness.precision as precision

    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert "slower than fp32" in slow_precision_warning(torch.device("cpu"), "bf16")
    assert slow_precision_warning(torch.device("cpu"), "fp32") is None
    assert slow_precision_warning(torch.device("cuda"), "bf16") is None
    with caplog.at_level(logging.WARNING):
        warn_if_slow(torch.device("cpu"), "bf16")
    assert sum("slower than fp32" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert slow_precision_warning(torch.device("cpu"), "bf16") is None
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: None)  # flags unreadable (macOS): no claim made
    assert slow_precision_warning(torch.device("cpu"), "bf16") is None


def test_tune_allocator_sets_glibcs_options_and_is_harmless_elsewhere(fake_glibc, monkeypatch):
    assert tune_allocator() is True
    assert dict(fake_glibc) == {runtime.M_MMAP_MAX: 0, runtime.M_TRIM_THRESHOLD: -1}  # -1: never trim
    monkeypatch.setattr(runtime, "glibc_library", lambda: None)  # macOS, musl, Windows
    assert tune_allocator() is False


# In a process of its own (the settings are process-wide), without torch (nothing else allocates meanwhile): the
# heap's end (sbrk(0)) before a 2.5 GB block, with it, and after it is freed. Untouched, it costs address space only.
HEAP_AFTER_A_FREED_BLOCK = """
import ctypes, importlib.util, sys
spec = importlib.util.spec_from_file_location("runtime", sys.argv[1])
runtime = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runtime)
libc = runtime.glibc_library()
libc.sbrk.restype = libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
trim_threshold = int(sys.argv[2])
if trim_threshold:  # a setting as tune_allocator once passed it: 1e11 masked to a C int
    libc.mallopt(runtime.M_TRIM_THRESHOLD, trim_threshold)
    libc.mallopt(runtime.M_MMAP_MAX, 0)
else:
    assert runtime.tune_allocator()
before = libc.sbrk(0)
block = libc.malloc(5 * 2**29)
grown = libc.sbrk(0) - before
libc.free(block)
print(grown, libc.sbrk(0) - before)
"""


@pytest.mark.skipif(runtime.glibc_library() is None, reason="glibc's allocator only")
def test_tune_allocator_keeps_a_freed_block_at_the_top_of_the_heap_however_large():
    """The heap grows by a 2.5 GB block and keeps it after it is freed, for the next step's tensors. The trim
    threshold tune_allocator passed before (1e11, masked by ctypes to 1.16 GB) gave 1.4 GB of S/16's expert weight
    gradients back to the kernel at every step where they lay at the top of the heap."""
    def heap_growth_then_after_free(trim_threshold):
        done = run_from(REPO, [sys.executable, "-c", HEAP_AFTER_A_FREED_BLOCK, runtime.__file__, str(trim_threshold)])
        return tuple(int(number) for number in done.stdout.split())

    size = 5 * 2**29
    grown, kept = heap_growth_then_after_free(0)  # tune_allocator(): from the heap (not mapped), and kept there
    assert size - 2**20 <= grown <= size + 2**20 and kept == grown
    grown, kept = heap_growth_then_after_free(ctypes.c_int(100_000_000_000).value)  # the old value: trimmed
    assert size - 2**20 <= grown <= size + 2**20 and kept < 2**20


def test_malloc_options_are_c_ints_or_refused_by_name():
    with pytest.raises(ValueError, match=r"mallopt M_TRIM_THRESHOLD: value 100000000000 is not a C int "
                                         r"\(-2147483648..2147483647\); for M_TRIM_THRESHOLD, -1 means never trim"):
        runtime.set_malloc_options({runtime.M_TRIM_THRESHOLD: 100_000_000_000})
    with pytest.raises(ValueError, match=r"mallopt M_MMAP_MAX: value 1.5 is not a C int"):
        runtime.set_malloc_options({runtime.M_MMAP_MAX: 1.5})


@pytest.fixture
def fake_glibc(monkeypatch):
    """glibc's mallopt, recorded; the layers' one automatic attempt not yet made."""
    calls = []

    class FakeGlibc:
        def mallopt(self, parameter, value):
            calls.append((parameter, value))
            return 1

    monkeypatch.setattr(runtime, "glibc_library", lambda: FakeGlibc())
    monkeypatch.setitem(runtime._auto_tune, "done", False)
    monkeypatch.setitem(runtime._auto_tune, "enabled", True)
    monkeypatch.delenv(runtime.AUTO_TUNE_ENV, raising=False)
    return calls


def test_the_first_training_forward_on_cpu_tunes_the_allocator_once(fake_glibc):
    """A user who never calls tune_allocator() gets it before the first backward, and only once."""
    layer = _layer()
    with torch.no_grad():
        layer(torch.randn(2, 9, 16))
    assert fake_glibc == []  # inference leaves the allocator alone
    for _ in range(2):
        layer(torch.randn(2, 9, 16)).sum().backward()
    assert dict(fake_glibc) == runtime.TUNED and len(fake_glibc) == len(runtime.TUNED)


@pytest.mark.parametrize("opt_out", ["environment", "call"])
def test_the_automatic_allocator_tuning_can_be_switched_off(fake_glibc, monkeypatch, opt_out):
    if opt_out == "environment":
        monkeypatch.setenv(runtime.AUTO_TUNE_ENV, "0")
    else:
        runtime.set_auto_tune_allocator(False)
    _layer()(torch.randn(2, 9, 16)).sum().backward()
    assert fake_glibc == [] and not runtime.auto_tune_pending()
