"""Expert banks: ``num_experts`` independent layers applied to their slots in one batched call.

Banks take slots as ``[batch, num_experts, slots_per_expert, dim]`` and return
``[batch, num_experts, slots_per_expert, out_dim]``; expert ``i`` sees only ``slots[:, i]``.

* :class:`BatchedMlp` is the default (timm's ``Mlp`` shape). Its weights are stored stacked,
  ``[num_experts, in, out]``, and applied with ``baddbmm``: a few large matmuls, no Python loop. Under autocast
  it reads low-precision copies of them, made once per optimizer step (:class:`ExpertLinear`).
* :class:`~softmoe.stacked_experts.StackedExperts` (its own module) turns any ``nn.Module`` into a bank.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional, Tuple, Type, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from ._checks import (autocast_dtype_on, functorch_transforms_active, is_exporting, is_tracing, require_bool,
                      require_choice, require_module_class, require_positive_int, require_probability, require_slots)
from .cpu_packing import PackedExpertWeights
from .stacked_experts import StackedExperts, run_stacked_experts  # noqa: F401  (their home before; pickles name it)

# timm's VisionTransformer weight_init modes (vision_transformer.get_init_weights_vit)
WEIGHT_INIT_MODES = ("", "jax", "jax_nlhb", "moco", "reset")


def _pair(name: str, value):
    pair = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be one value for both layers or a pair (fc1's, fc2's), got {value!r}")
    return pair


# Optimizer steps taken in this process. Fused optimizers update weights without bumping their version
# counters, so the autocast copies of expert weights are keyed on this count as well.
_optimizer_steps = 0


def weights_changed() -> None:
    """Tell every expert bank that weights may have changed, as after an optimizer step: their
    low-precision copies are rewritten at the next autocast forward. ``torch.optim`` optimizers call it
    through a step hook; call it after updating weights another way (the benchmark uses it to time a
    step's first forward)."""
    global _optimizer_steps
    _optimizer_steps += 1
    for bank in list(_held_banks):  # a compiled forward must not read copies made before this step
        bank._copies_held = False
    _held_banks.clear()


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    weights_changed()


register_optimizer_step_post_hook(_count_optimizer_step)


# id(weight): (weakref to the weight, weakref to its bank, the weight's name there), for every expert weight whose
# low-precision copy a bank keeps. Keyed by id and checked by identity: tensors compare elementwise, so they cannot
# be dictionary keys; weak, so a bank or a weight that goes away takes nothing with it.
_copy_owners: dict = {}


def _owner_of(weight: torch.Tensor):
    entry = _copy_owners.get(id(weight))
    bank = None if entry is None or entry[0]() is not weight else entry[1]()
    if bank is None or getattr(bank, entry[2], None) is not weight:  # gone, or a weight the bank no longer holds
        return None, None
    return bank, entry[2]


def low_precision_copy(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """The low-precision copy an expert bank keeps of ``weight`` for autocast (None: no bank keeps one).

    An optimizer that writes ``copy.copy_(weight)`` as it updates ``weight`` (in the same kernel, it adds a 2-byte
    write to the update instead of the bank's 6-byte recast) then calls :func:`copy_written`, and the next forward
    uses the copy as it is (:class:`softmoe.optim.AdamW` does)."""
    bank, name = _owner_of(weight)
    if bank is None or name not in bank._low_precision:
        return None
    return bank._low_precision[name][1]


def copy_written(weight: torch.Tensor) -> None:
    """Tell the bank that keeps ``weight``'s low-precision copy that the copy now holds ``weight`` cast, from inside
    an optimizer's ``step``: the step post-hook counts that step when it returns, so the copy is taken as current
    for the weights that step leaves. Called anywhere else, the copy is recast at the next forward, as usual."""
    bank, name = _owner_of(weight)
    if bank is not None and name in bank._low_precision:
        bank._low_precision[name] = (_CopyKey(weight, steps=_optimizer_steps + 1), bank._low_precision[name][1])


class _CopyKey:
    """What a copy is current for: the optimizer steps counted, the weight's in-place writes, its storage, and the
    weight itself. Held weakly, the weight is compared by identity: a new weight often lands at the address the
    one it replaces just freed, with the same version counter (``torch.func.functional_call`` with new weights, or
    ``load_state_dict(assign=True)``), and was read as the old one, its copy left stale. A weight made under
    ``torch.inference_mode`` has no version counter: its copy is never taken as current."""

    __slots__ = ("state", "weight")
    __hash__ = None  # compared, never a dict key

    def __init__(self, weight: torch.Tensor, steps: int) -> None:
        self.state = None if weight.is_inference() else (steps, weight._version, weight.data_ptr())
        self.weight = weakref.ref(weight)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, _CopyKey) and self.state is not None and self.state == other.state
                and self.weight() is not None and self.weight() is other.weight())


def _forget_owner(weight_id: int) -> None:
    entry = _copy_owners.get(weight_id)
    if entry is not None and entry[0]() is None:  # not a newer weight that reuses the id
        del _copy_owners[weight_id]


# Banks whose copies a compiled forward reads now (hold_expert_copies); weak, as _copy_owners.
_held_banks: "weakref.WeakSet" = weakref.WeakSet()


@torch.compiler.disable  # runs eagerly, between compiled graphs: one graph break before the model and one after
def hold_expert_copies(module: nn.Module, hold: bool) -> None:
    """``hold=True``: every :class:`BatchedMlp` in ``module`` brings its autocast copies up to date now, eagerly,
    and a compiled forward reads them as graph inputs; ``hold=False``: compiled forwards cast the weights again.

    Autocast inside a compiled graph caches nothing across calls, so a compiled forward would otherwise cast every
    expert weight at every call: 6 bytes per parameter, 5.4 GB per forward at Soft MoE S/16, where dense ViT-S/16
    moves 0.13 GB. :class:`~softmoe.vit.SoftMoEVisionTransformer` holds them around each compiled forward. Under
    FSDP nothing is held: the weights are gathered inside the forward, so none is whole before it."""
    modules = list(module.modules())  # one walk of the model per compiled call
    if hold and any(_is_fsdp_module(m) for m in modules):
        return
    for bank in modules:
        if isinstance(bank, BatchedMlp):
            bank._hold_copies(hold)


def _is_fsdp_module(module: nn.Module) -> bool:
    fully_sharded = getattr(torch.distributed, "fsdp", None) and getattr(torch.distributed.fsdp, "FSDPModule", None)
    return fully_sharded is not None and isinstance(module, fully_sharded)


def batched_matmul_in(dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(a, b)`` returned in ``dtype``: on CUDA a bf16/fp16 product written in float32 straight
    from the GEMM's float32 accumulator (``out_dtype``), else computed in the inputs' dtype and cast."""
    if (dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16)
            and a.device.type in _FLOAT32_GEMM_DEVICES and _HAS_OUT_DTYPE[0]):
        try:  # compiled too: inductor lowers aten::bmm.dtype to the same cuBLAS call (torch 2.11 and 2.14)
            return torch.bmm(a, b, out_dtype=dtype)
        except (RuntimeError, TypeError, NotImplementedError):  # a torch without bmm's out_dtype: cast from now on
            _HAS_OUT_DTYPE[0] = False
    return torch.bmm(a, b).to(dtype)


_FLOAT32_GEMM_DEVICES, _HAS_OUT_DTYPE = ("cuda",), [True]  # the devices with aten::bmm.dtype (torch 2.14: not CPU)


class ExpertLinear(torch.autograd.Function):
    """``x @ weight + bias`` per expert, ``x`` [n, r, in], with ``weight`` [n, in, out] read through its
    low-precision copy ``weight_copy`` (autocast's dtype, cast once per optimizer step).

    As autocast's own cast would, the gradients reach ``weight`` and ``bias`` in their own dtype (float32),
    but without a cast of their own: the weight gradient is written in float32 by the GEMM itself on CUDA
    (:func:`batched_matmul_in`), which saves a pass over a 151 MB (bf16) + 302 MB (float32) tensor per
    expert weight and step at S/16.

    Under ``create_graph=True`` the backward reads ``weight`` cast afresh instead of its detached copy, and the
    weight gradient is cast by its own op, so that autograd can differentiate the gradients again."""

    @staticmethod
    def forward(ctx, x, weight, weight_copy, bias):
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight_copy, weight)
        return ExpertLinear.product(x, weight_copy, bias)

    @staticmethod
    def product(x, weight_copy, bias):
        """The forward's maths; called directly where no gradient is recorded (an autograd node costs per call)."""
        if bias is None:
            return torch.bmm(x, weight_copy)
        return torch.baddbmm(bias.to(x.dtype).unsqueeze(1), x, weight_copy)

    @staticmethod
    def backward(ctx, grad):
        x, weight_copy, weight = ctx.saved_tensors
        double_backward = torch.is_grad_enabled()  # the copy is detached: only weight's own cast carries grad_x to it
        read = weight.to(weight_copy.dtype) if double_backward else weight_copy
        grad_x = torch.bmm(grad, read.transpose(1, 2)) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (torch.bmm(x.transpose(1, 2), grad).to(ctx.weight_dtype) if double_backward
                           else batched_matmul_in(ctx.weight_dtype, x.transpose(1, 2), grad))
        grad_bias = None
        if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
            grad_bias = grad.sum(1).to(ctx.bias_dtype)  # as autocast's cast of the bias: summed in grad's dtype
        return grad_x, grad_weight, None, grad_bias


class BatchedMlp(nn.Module):
    """``num_experts`` independent timm ``Mlp``s: fc1 -> act -> drop -> norm -> fc2 -> drop.

    Weights are kept in ``x @ W`` layout so each layer is one ``baddbmm`` over the experts.
    """

    WEIGHT_NAMES = ("fc1_weight", "fc2_weight")  # the stacked weights autocast's copies and CPU packing are kept of

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Optional[Type[nn.Module]] = None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.in_features = require_positive_int("in_features", in_features)
        hidden_features, out_features = (in_features if v is None else v for v in (hidden_features, out_features))
        self.hidden_features = require_positive_int("hidden_features", hidden_features)
        self.out_features = require_positive_int("out_features", out_features)
        n, d, h, o = self.num_experts, self.in_features, self.hidden_features, self.out_features
        bias1, bias2 = (require_bool("bias", value) for value in _pair("bias", bias))  # bool("no") is True
        drop1, drop2 = (require_probability("drop", rate) for rate in _pair("drop", drop))

        self.fc1_weight = nn.Parameter(torch.empty(n, d, h, **dd))  # [n, in, hidden]
        self.fc1_bias = nn.Parameter(torch.empty(n, h, **dd)) if bias1 else None
        self.act = require_module_class("act_layer", act_layer)()
        self.drop1 = nn.Dropout(drop1)
        self.norm_eps, self.norm_weight, self.norm_bias = self._make_norm(norm_layer, n, h, dd)
        self.fc2_weight = nn.Parameter(torch.empty(n, h, o, **dd))  # [n, hidden, out]
        self.fc2_bias = nn.Parameter(torch.empty(n, o, **dd)) if bias2 else None
        self.drop2 = nn.Dropout(drop2)
        # The timm weight_init mode init_weights() follows; SoftMoEVisionTransformer.init_weights sets it,
        # since timm's init calls init_weights() without arguments.
        self.weight_init_mode = ""
        self._low_precision: dict = {}  # weight name: (the weight's version key, its autocast-dtype copy)
        self._copies_held = False  # a compiled forward reads the copies (hold_expert_copies)
        self.cpu_packing: Optional[PackedExpertWeights] = None  # softmoe.pack_experts_for_cpu
        self.reset_parameters()

    @staticmethod
    def _make_norm(norm_layer, n, h, dd):
        """Per-expert LayerNorm over the hidden features, its affine parameters stacked [n, h]."""
        if norm_layer is None:
            return None, None, None
        probe = require_module_class("norm_layer", norm_layer)(h, **dd)  # a string or an instance: named
        if not isinstance(probe, nn.LayerNorm):
            raise ValueError(
                f"norm_layer must be a LayerNorm type for batched MLP experts, got {norm_layer!r}; "
                "wrap other layers with SoftMoELayerWrapper"
            )
        weight = bias = None
        if probe.elementwise_affine:
            weight = nn.Parameter(probe.weight.detach().expand(n, h).clone())
            bias = nn.Parameter(probe.bias.detach().expand(n, h).clone()) if probe.bias is not None else None
        return probe.eps, weight, bias

    def reset_parameters(self) -> None:
        """Initialise every expert as its own ``nn.Linear`` would be (independent draws)."""
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            bound = 1.0 / math.sqrt(weight.shape[1])  # fan_in of one expert
            nn.init.uniform_(weight, -bound, bound)
            if bias is not None:
                nn.init.uniform_(bias, -bound, bound)
        self._reset_norm()

    def init_weights(self, mode: Optional[str] = None) -> None:
        """Initialise every expert as timm's ViT init ``mode`` initialises the dense ``Mlp`` (its
        ``blocks.<i>.mlp.fc1``/``fc2``), each expert an independent draw.

        ``mode`` is a timm ``weight_init``: ``''`` (trunc_normal(0.02), zero biases), ``'jax'`` /
        ``'jax_nlhb'`` (xavier_uniform, biases N(0, 1e-6)), ``'moco'`` (xavier_uniform, zero biases) or
        ``'reset'`` (``reset_parameters``); ``None`` means ``self.weight_init_mode``.
        """
        mode = require_choice("mode", self.weight_init_mode if mode is None else mode, WEIGHT_INIT_MODES)
        if mode == "reset":
            self.reset_parameters()
            return
        for weight, bias in ((self.fc1_weight, self.fc1_bias), (self.fc2_weight, self.fc2_bias)):
            if mode.startswith(("jax", "moco")):
                fan_in, fan_out = weight.shape[1], weight.shape[2]  # one expert's [in, out]
                bound = math.sqrt(6.0 / (fan_in + fan_out))  # nn.init.xavier_uniform_ of one expert's Linear
                nn.init.uniform_(weight, -bound, bound)
            else:
                nn.init.trunc_normal_(weight, std=0.02, a=-2.0, b=2.0)
            if bias is not None:
                if mode.startswith("jax"):
                    nn.init.normal_(bias, std=1e-6)  # timm's jax init draws the biases of MLP Linears
                else:
                    nn.init.zeros_(bias)
        self._reset_norm()

    def _reset_norm(self) -> None:
        if self.norm_weight is not None:
            nn.init.ones_(self.norm_weight)
        if self.norm_bias is not None:
            nn.init.zeros_(self.norm_bias)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        require_slots(slots, self.num_experts, self.in_features)
        b, p = slots.shape[0], slots.shape[2]  # indexed, not unpacked: torch.fx proxies cannot be iterated
        n = self.num_experts
        x = slots.transpose(0, 1).reshape(n, b * p, self.in_features)  # [n, b*p, d]: each expert's slots together
        if self.cpu_packing is not None and not is_tracing():  # a graph keeps the bank's own path
            packed = self.cpu_packing.forward(self, x, key=lambda: tuple(  # computed only where packing applies
                _CopyKey(getattr(self, name), _optimizer_steps) for name in self.WEIGHT_NAMES))
            if packed is not None:
                return packed.view(n, b, p, self.out_features).transpose(0, 1)
        x = self._linear(x, "fc1_weight", self.fc1_bias)  # [n, b*p, h]
        x = self.act(x)
        if getattr(self.drop1, "p", None) != 0:  # a Dropout of rate 0 (the default) is skipped: a call saved
            x = self.drop1(x)
        if self.norm_eps is not None:
            x = F.layer_norm(x, (self.hidden_features,), eps=self.norm_eps)
            if self.norm_weight is not None:
                x = x * self.norm_weight.unsqueeze(1)
            if self.norm_bias is not None:
                x = x + self.norm_bias.unsqueeze(1)
        x = self._linear(x, "fc2_weight", self.fc2_bias)  # [n, b*p, o]
        if getattr(self.drop2, "p", None) != 0:  # another module put in its place is always called
            x = self.drop2(x)
        return x.view(n, b, p, self.out_features).transpose(0, 1)  # [b, n, p, o]

    def compute_weight(self, name: str) -> torch.Tensor:
        """The weight ``name`` as the matmuls should read it: under autocast, its low-precision copy
        (detached: :class:`ExpertLinear` routes its gradient to the weight), else the weight itself.

        Autocast would cast the stacked weights afresh at every call (two 151 MB bf16 copies per
        forward for ViT-S/16 with 128 experts). The copy is kept instead and rewritten in place only
        when the weight may have changed since: after any ``torch.optim`` optimizer's step (or
        :func:`weights_changed`), or an in-place write its version counter records (``load_state_dict``,
        an init). So a training step casts once, and evaluation or gradient-accumulation steps not at all.
        :class:`softmoe.optim.AdamW` writes the copy in its update instead (:func:`low_precision_copy`), and then
        the forward casts nothing. (A write through ``weight.data`` bypasses both; call
        :meth:`clear_low_precision_copies` after one.)"""
        weight = getattr(self, name)
        if is_tracing():  # fx/export/compile: no copy is kept here (and a proxy has no version counter) ...
            held = self._low_precision.get(name) if self._copies_held else None
            if held is not None and torch.compiler.is_compiling() and not is_exporting():
                return held[1]  # ... but hold_expert_copies brought this one up to date before the graph ran
            return weight
        dtype = autocast_dtype_on(weight.device)
        if dtype is None or weight.dtype in (dtype, torch.float64) or not weight.is_floating_point():  # as autocast
            return weight
        if functorch_transforms_active():  # torch.func: weight is its wrapper, and ExpertLinear cannot run there
            return weight  # autocast casts it at the matmul
        key = _CopyKey(weight, steps=_optimizer_steps)
        cached = self._low_precision.get(name)
        if cached is None or cached[1].dtype != dtype or cached[1].device != weight.device or \
                cached[1].shape != weight.shape:  # a weight replaced by another shape: an expert-parallel shard
            with torch.inference_mode(False):  # a copy made during inference must still serve training
                cached = (None, torch.empty_like(weight, dtype=dtype))
        if _owner_of(weight)[0] is not self:  # a new copy, or a new weight object (a deepcopy, a replaced weight)
            weight_id = id(weight)
            _copy_owners[weight_id] = (weakref.ref(weight, lambda _: _forget_owner(weight_id)), weakref.ref(self), name)
        if cached[0] != key:
            with torch.no_grad():
                cached[1].copy_(weight)
            cached = (key, cached[1])
        self._low_precision[name] = cached
        return cached[1]

    def __getstate__(self) -> dict:
        """The bank's state without its autocast copies, which the next autocast forward remakes from the weights: a
        pickle (``torch.save(model)``) refused their keys' weak references after any autocast forward, and would have
        stored the expert weights a second time. A deep copy starts without them too (they would not be current for
        its own weights)."""
        state = super().__getstate__()  # a copy of the module's __dict__: the bank itself keeps its copies
        state["_low_precision"], state["_copies_held"] = {}, False
        return state

    def clear_low_precision_copies(self) -> None:
        """Forget the autocast copies of the weights (they are rebuilt at the next autocast forward)."""
        self._low_precision.clear()
        self._copies_held = False

    def _hold_copies(self, hold: bool) -> None:
        """See :func:`hold_expert_copies`: copies held only where autocast casts, for whole (not DTensor) weights."""
        dtype = autocast_dtype_on(self.fc1_weight.device) if hold else None
        self._copies_held = False
        if dtype is None or not self._whole_weights():
            _held_banks.discard(self)
            return
        copies = [self.compute_weight(name) for name in self.WEIGHT_NAMES]  # eager: a stale copy recast
        self._copies_held = all(copy is not getattr(self, name) and copy.dtype == dtype
                                for copy, name in zip(copies, self.WEIGHT_NAMES))
        if self._copies_held:
            _held_banks.add(self)

    def _whole_weights(self) -> bool:
        """Whether fc1's and fc2's weights are whole tensors here, not DTensor shards (FSDP gathers those inside the
        forward): only whole weights can be held as copies or packed ahead of a call."""
        return all(type(getattr(self, name)) in (torch.Tensor, nn.Parameter) for name in self.WEIGHT_NAMES)

    def copy_is_current(self, name: str) -> bool:
        """Whether the next autocast forward reads weight ``name``'s copy as it is, without recasting it."""
        cached = self._low_precision.get(name)
        return cached is not None and cached[0] == _CopyKey(getattr(self, name), steps=_optimizer_steps)

    def _linear(self, x: torch.Tensor, name: str, bias: Optional[torch.Tensor]) -> torch.Tensor:
        weight = getattr(self, name)
        read = self.compute_weight(name)
        if read is not weight:  # the cached low-precision copy
            if not torch.is_grad_enabled():
                return ExpertLinear.product(x.to(read.dtype), read, bias)
            return ExpertLinear.apply(x.to(read.dtype), weight, read, bias)
        return ExpertLinear.product(x, weight, bias)  # the weight as it is: plain ops, autograd's own backward

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, in={self.in_features}, hidden={self.hidden_features}, "
            f"out={self.out_features}"
        )
