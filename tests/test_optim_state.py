"""``softmoe.optim.AdamW``: AdamW with its moments in bfloat16. Its float32 mode against ``torch.optim.AdamW`` bit for
bit; its bf16 update against an independent float64 AdamW; stochastic rounding unbiased and what it buys; exact
resumes through ``state_dict`` and through the trainer; checkpoints of either optimizer loading into the other."""

import io
import re

import pytest
import torch

from torch._dynamo.eval_frame import _debug_get_cache_entry_list

from softmoe.optim import AdamW, adamw_low_precision_, round_to_bfloat16, rounding_noise, step_bits

HYPER = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)


def parameters(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((40, 30), (7,), (3, 4, 5))]


def copies(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def step_with(optimizers_and_params, steps, seed=1):
    """Step each optimizer ``steps`` times on the same random gradients."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=generator) for p in optimizers_and_params[0][1]]
        for optimizer, params in optimizers_and_params:
            for param, grad in zip(params, grads):
                param.grad = grad.clone()
            optimizer.step()


def test_float32_state_is_torchs_adamw_bit_for_bit_in_two_groups():
    ours, theirs = parameters(), parameters()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]  # noqa: E731
    step_with([(torch.optim.AdamW(groups(theirs), foreach=False, **HYPER), theirs),
               (AdamW(groups(ours), state_dtype="float32", **HYPER), ours)], steps=6)
    for mine, reference in zip(ours, theirs):
        assert torch.equal(mine, reference)


def float64_adamw(param, grad, m, v, step, lr, beta1, beta2, eps, weight_decay):
    """AdamW's equations (Loshchilov & Hutter, with PyTorch's bias correction), written out in float64."""
    param, grad, m, v = (t.double() for t in (param, grad, m, v))
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad * grad
    m_hat, v_hat = m / (1 - beta1**step), v / (1 - beta2**step)
    return param * (1 - lr * weight_decay) - lr * m_hat / (v_hat.sqrt() + eps), m, v


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_a_bf16_state_step_is_the_float64_update_of_the_stored_moments(rounding):
    params = parameters()
    optimizer = AdamW(params, rounding=rounding, **HYPER)
    step_with([(optimizer, params)], steps=3)  # moments that are not zero
    before = {id(p): (p.detach().clone(), *(optimizer.state[p][k].clone() for k in ("exp_avg", "exp_avg_sq")))
              for p in params}
    step_with([(optimizer, params)], steps=1, seed=7)
    for param in params:
        state = optimizer.state[param]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
        expected, m, v = float64_adamw(*before[id(param)][:1], param.grad, *before[id(param)][1:], step=4,
                                       lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
        torch.testing.assert_close(param.double(), expected, rtol=1e-6, atol=1e-7)
        for stored, exact in ((state["exp_avg"], m), (state["exp_avg_sq"], v)):  # within one bf16 step of it
            assert ((stored.double() - exact).abs() <= exact.abs() * 2**-7 + 1e-30).all()


def test_the_eager_update_in_chunks_is_the_update_in_one(monkeypatch):
    """Eager bf16 steps go CHUNK elements at a time: chunks of 7 over parameters of 1200, 7 and 60 elements."""
    import softmoe.optim

    whole, chunked = parameters(), parameters()
    step_with([(AdamW(whole, **HYPER), whole)], steps=2)
    monkeypatch.setattr(softmoe.optim, "CHUNK", 7)
    step_with([(AdamW(chunked, **HYPER), chunked)], steps=2)
    for mine, reference in zip(chunked, whole):
        assert torch.equal(mine, reference)


def test_parameters_that_are_not_float32_keep_moments_in_their_own_dtype():
    params = [torch.nn.Parameter(torch.randn(5, dtype=dtype)) for dtype in (torch.float64, torch.bfloat16)]
    optimizer = AdamW(params, **HYPER)
    for param in params:
        param.grad = torch.randn_like(param)
    assert optimizer.step(closure=lambda: 3.5) == 3.5  # step returns the closure's loss, as torch's optimizers do
    for param in params:
        assert optimizer.state[param]["exp_avg"].dtype == optimizer.state[param]["exp_avg_sq"].dtype == param.dtype


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbour():
    exact = torch.tensor([1.0 + 3 / 1024, -0.3, 7e-5, -2.5e3], dtype=torch.float32).repeat_interleave(50_000)
    generator = torch.Generator().manual_seed(0)  # the noise's sources: a parameter and a gradient
    param, grad = (torch.randn(exact.shape, generator=generator) for _ in range(2))
    noise = rounding_noise(param, grad, torch.tensor(step_bits(3, 5), dtype=torch.int32))
    assert 0 <= noise.min() and noise.max() < 65536
    rounded = round_to_bfloat16(exact, noise).float()
    down = round_to_bfloat16(exact.view(torch.int32).bitwise_and(-65536).view(torch.float32), None).float()
    up = torch.nextafter(down.to(torch.bfloat16), down.sign().to(torch.bfloat16) * float("inf")).float()
    assert ((rounded == down) | (rounded == up)).all()
    means = rounded.view(4, -1).mean(1)
    torch.testing.assert_close(means, exact.view(4, -1)[:, 0], rtol=2e-4, atol=0)
    nearest = round_to_bfloat16(exact, None).float().view(4, -1).mean(1)
    assert (means - exact.view(4, -1)[:, 0]).abs().sum() < (nearest - exact.view(4, -1)[:, 0]).abs().sum()


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_only_stochastic_rounding_lets_the_second_moment_decay(rounding):
    """bf16 keeps 8 significant bits: v * 0.999 rounds back to v, so without gradients v would never decay."""
    param = torch.nn.Parameter(torch.zeros(20_000))
    optimizer = AdamW([param], rounding=rounding, lr=1e-3, weight_decay=0.0)
    param.grad = torch.ones_like(param)
    optimizer.step()  # v = 0.001 everywhere
    param.grad = torch.zeros_like(param)
    for _ in range(700):
        optimizer.step()
    decayed = optimizer.state[param]["exp_avg_sq"].float().mean().item()
    if rounding == "nearest":
        assert decayed == pytest.approx(0.001, rel=0.01)  # stuck
    else:
        assert decayed == pytest.approx(0.001 * 0.999**700, rel=0.05)


def test_a_resumed_optimizer_steps_exactly_as_the_uninterrupted_one():
    whole_params, part_params = parameters(), parameters()
    whole = AdamW(whole_params, **HYPER)
    step_with([(whole, whole_params)], steps=6)
    first = AdamW(part_params, **HYPER)
    step_with([(first, part_params)], steps=3)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed_params = copies(part_params)
    resumed = AdamW(resumed_params, **HYPER)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    generator_rest = torch.Generator().manual_seed(1)
    for _ in range(3):  # the same gradients the whole run drew at its steps 1-3 are consumed, then steps 4-6
        [torch.randn(p.shape, generator=generator_rest) for p in part_params]
    for _ in range(3):
        for param in resumed_params:
            param.grad = torch.randn(param.shape, generator=generator_rest)
        resumed.step()
    for mine, reference in zip(resumed_params, whole_params):
        assert torch.equal(mine, reference)
    for mine, reference in zip(resumed_params, whole_params):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed.state[mine][key], whole.state[reference][key])


def test_checkpoints_load_across_the_two_state_dtypes_and_keep_this_runs_choice():
    torch_params = parameters()
    theirs = torch.optim.AdamW(torch_params, **HYPER)
    step_with([(theirs, torch_params)], steps=2)
    ours = AdamW(copies(torch_params), rounding="nearest", **HYPER)
    ours.load_state_dict(theirs.state_dict())
    for param in ours.param_groups[0]["params"]:
        assert ours.state[param]["exp_avg"].dtype == torch.bfloat16
    assert (ours.param_groups[0]["state_dtype"], ours.param_groups[0]["rounding"]) == ("bfloat16", "nearest")
    back = torch.optim.AdamW(copies(torch_params), **HYPER)
    back.load_state_dict(ours.state_dict())  # torch casts the moments to the parameters' float32
    reference = theirs.state[torch_params[0]]["exp_avg"]
    loaded = back.state[back.param_groups[0]["params"][0]]["exp_avg"]
    assert loaded.dtype == torch.float32
    torch.testing.assert_close(loaded, reference.to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize("state_dtype", ["bfloat16", "float32"])
def test_a_compiled_update_agrees_with_the_eager_one_and_writes_the_copies(state_dtype):
    from softmoe import SoftMoE

    torch.manual_seed(0)
    eager, compiled = SoftMoE(16, 32, num_experts=4, slots_per_expert=2), SoftMoE(16, 32, num_experts=4,
                                                                                   slots_per_expert=2)
    compiled.load_state_dict(eager.state_dict())
    _train_under_bf16_autocast(eager, AdamW(eager.parameters(), state_dtype=state_dtype, **HYPER))
    graphs_before = len(_debug_get_cache_entry_list(adamw_low_precision_.__code__))
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        written = _train_under_bf16_autocast(compiled, AdamW(compiled.parameters(), state_dtype=state_dtype,
                                                             compile=True, **HYPER))
    # one graph with the copy to write and one without, whatever the parameters' shapes (6 here, of 1 to 3 dims)
    assert len(_debug_get_cache_entry_list(adamw_low_precision_.__code__)) - graphs_before <= 2
    assert all(written)  # the kernel's cast is round-to-nearest-even, as the bank's
    # Fused kernels may round a float op differently. With bf16 moments, a last-bit difference in a parameter also
    # changes its stochastic rounding bits, and now and then a moment by one bf16 step: an update off by up to
    # 2**-8 of the learning rate (1e-2), on some CPUs and not others
    atol = 1e-6 if state_dtype == "float32" else 1e-4
    for (name, mine), reference in zip(compiled.named_parameters(), eager.parameters()):
        torch.testing.assert_close(mine, reference, rtol=1e-6, atol=atol, msg=name)


@pytest.mark.parametrize("kwargs,named", [
    ({"state_dtype": "float16"}, "state_dtype must be one of 'float32', 'bfloat16', got 'float16'"),
    ({"rounding": "up"}, "rounding must be one of 'stochastic', 'nearest', got 'up'"),
    ({"betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1), got (0.9, 1.0)"),
    ({"lr": -1.0}, "lr must be a finite number >= 0.0, got -1.0"),
    ({"rounding": "Stochastic"}, "rounding must be one of 'stochastic', 'nearest', got 'Stochastic'"),
])
def test_bad_arguments_are_named(kwargs, named):
    with pytest.raises(ValueError) as error:
        AdamW(parameters(), **kwargs)
    assert named in str(error.value)
    # a param group's own value, checked as the constructor's (was: "Stochastic" rounded to nearest in silence, "bf16"
    # a KeyError at the first step); the group named by its index
    groups = [{"params": parameters()}, {"params": parameters(), **kwargs}]
    with pytest.raises(ValueError, match=re.escape(f"param group 1: {named}")):
        AdamW(groups)
    optimizer = AdamW(parameters())
    with pytest.raises(ValueError, match=re.escape(f"param group 1: {named}")):
        optimizer.add_param_group({"params": parameters(), **kwargs})
    assert len(optimizer.param_groups) == 1  # refused before it joined


def test_a_run_with_optimizer_adamw_bf16_resumes_as_one_run(compose_run, tmp_path, resumed_from):
    from softmoe.harness.checkpoint import load_checkpoint
    from softmoe.harness.loop import train

    run = ["optimizer=adamw_bf16", "data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=64",
           "data.test_size=16", "model.depth=2", "trainer.batch_size=8", "scheduler=constant", "logger=none",
           "trainer.progress_bar=false"]  # a constant rate: a 3-step run is the first half of a 6-step one
    train(compose_run(*run, "trainer.max_steps=3"), tmp_path / "first")
    train(compose_run(*run, "trainer.max_steps=6", f"trainer.resume={tmp_path / 'first' / 'last.pt'}"),
          tmp_path / "resumed")
    assert resumed_from() == [(tmp_path / "first" / "last.pt", 3)]
    train(compose_run(*run, "trainer.max_steps=6"), tmp_path / "whole")
    resumed, whole = (load_checkpoint(tmp_path / name / "last.pt") for name in ("resumed", "whole"))
    moments = [state["exp_avg_sq"] for state in whole["optimizer"]["state"].values()]
    assert {m.dtype for m in moments} == {torch.bfloat16}
    for name, weight in whole["model"].items():
        assert torch.equal(resumed["model"][name], weight), name


def _train_under_bf16_autocast(layer, optimizer, steps=3):
    """Autocast training steps; after each, whether the banks' copies are current and equal their weights cast."""
    generator = torch.Generator().manual_seed(3)
    current = []
    for _ in range(steps):
        x = torch.randn(3, 9, 16, generator=generator)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = layer(x).float().square().mean()
        loss.backward()
        optimizer.step()
        for name in ("fc1_weight", "fc2_weight"):
            copy = layer.experts._low_precision[name][1]
            current.append(layer.experts.copy_is_current(name)
                           and torch.equal(copy, getattr(layer.experts, name).detach().to(torch.bfloat16)))
    return current


@pytest.mark.parametrize("state_dtype", ["float32", "bfloat16"])
def test_the_update_writes_the_expert_banks_copies_so_the_forward_recasts_nothing(state_dtype):
    """The copy written by the step is the cast the bank would make: the same training, bit for bit."""
    from softmoe import SoftMoE

    torch.manual_seed(0)
    writing = SoftMoE(16, 32, num_experts=4, slots_per_expert=2)
    recasting = SoftMoE(16, 32, num_experts=4, slots_per_expert=2)
    recasting.load_state_dict(writing.state_dict())
    written = _train_under_bf16_autocast(writing, AdamW(writing.parameters(), state_dtype=state_dtype, **HYPER))
    recast = _train_under_bf16_autocast(
        recasting, AdamW(recasting.parameters(), state_dtype=state_dtype, write_expert_copies=False, **HYPER))
    assert all(written)
    assert not any(recast)  # stale after each step: recast at the next forward
    for (name, mine), reference in zip(writing.named_parameters(), recasting.parameters()):
        assert torch.equal(mine, reference), name


def test_a_bank_whose_weight_was_replaced_is_recast_not_trusted():
    from softmoe import SoftMoE

    layer = SoftMoE(16, 32, num_experts=4, slots_per_expert=2)
    optimizer = AdamW(layer.parameters(), **HYPER)
    _train_under_bf16_autocast(layer, optimizer, steps=1)
    old = layer.experts.fc1_weight
    layer.experts.fc1_weight = torch.nn.Parameter(old.detach() * 2)  # the optimizer still steps the old one
    _train_under_bf16_autocast(layer, AdamW([old], **HYPER), steps=1)
    assert not layer.experts.copy_is_current("fc1_weight")


def test_a_deepcopied_model_has_its_own_copies_written_and_leaves_the_originals_alone():
    import copy

    from softmoe import SoftMoE

    original = SoftMoE(16, 32, num_experts=4, slots_per_expert=2)
    _train_under_bf16_autocast(original, AdamW(original.parameters(), **HYPER), steps=1)
    originals_copy = original.experts._low_precision["fc1_weight"][1].clone()
    clone = copy.deepcopy(original)
    assert all(_train_under_bf16_autocast(clone, AdamW(clone.parameters(), **HYPER), steps=2))
    assert torch.equal(original.experts._low_precision["fc1_weight"][1], originals_copy)
    assert not torch.equal(clone.experts.fc1_weight, original.experts.fc1_weight)


def test_a_parameter_without_a_gradient_leaves_the_others_rounding_as_it_was():
    """Each parameter's stochastic-rounding bits come from its place in the groups: one whose gradient is None this
    step (a router not used, a frozen part) must not shift the bits of the parameters after it."""
    with_grad, without_grad = parameters(), parameters()
    optimizers = [AdamW(ps, state_dtype="bfloat16", rounding="stochastic", **HYPER) for ps in (with_grad, without_grad)]
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) for p in with_grad]
    for params, optimizer in zip((with_grad, without_grad), optimizers):
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
    without_grad[0].grad = None  # the first parameter sits this step out
    with_grad[0].grad = grads[0].clone()
    for params in (with_grad, without_grad):
        for param, grad in zip(params[1:], grads[1:]):
            param.grad = grad.clone()
    for optimizer in optimizers:
        optimizer.step()
    for mine, reference in zip(without_grad[1:], with_grad[1:]):
        assert torch.equal(mine, reference)
        assert torch.equal(optimizers[1].state[mine]["exp_avg_sq"], optimizers[0].state[reference]["exp_avg_sq"])
