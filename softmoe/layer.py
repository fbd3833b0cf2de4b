"""The Soft MoE layer (Puigcerver et al., arXiv 2308.00951, section 2).

For the tokens of one example X [m, d] and slot parameters Φ [d, n, p]:

    logits = l2n(X) · (scale · l2n(Φ))          [m, n·p]   (section 2.3; raw X·Φ if normalize=False)
    D      = softmax over the m tokens           [m, n·p]   dispatch weights, one column per slot
    C      = softmax over all n·p slots          [m, n·p]   combine weights, one row per token
    X̃     = Dᵀ X                                [n·p, d]   slots, from the *un-normalised* tokens
    Ỹ[i]   = f_i(X̃[i])                          expert i sees its p slots
    Y      = C Ỹ                                 [m, d']

Every example of a batch is routed on its own: no token of one example reaches another.
"""

from __future__ import annotations

import math
import warnings
from functools import partial
from typing import Callable, Optional, Tuple, Type, Union

import torch
from torch import nn

from ._checks import (
    autocast_dtype_on,
    is_symbolically_traced,
    is_tracing,
    require_bool,
    require_choice,
    require_module_class,
    require_positive_int,
    require_positive_number,
    require_tokens,
)
from .experts import BatchedMlp
from .stacked_experts import StackedExperts
from .routing import NORM_EPS, SCALE_INIT, soft_routing
from .runtime import auto_tune_pending, tune_allocator_once

DISPATCH_CHOICES = ("soft", "uniform", "identity")
COMBINE_CHOICES = ("soft", "uniform", "identity")


def l2_normalize(x: torch.Tensor, dim: int = -1, eps: float = NORM_EPS) -> torch.Tensor:
    """``x / sqrt(sum(x**2) + eps)`` over ``dim``, as vmoe's router does."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + eps)


@torch.fx.wrap  # one opaque call under torch.fx: a traced tensor's dtype is a proxy, not a dtype
def routing_dtype(x: torch.Tensor) -> torch.dtype:
    """The routing precision for tokens ``x``: float32, or float64 for float64 tokens."""
    return torch.promote_types(x.dtype, torch.float32)


# The standard deviation of a unit normal truncated to [-2, 2]: dividing by it gives the truncated draw the
# variance of the untruncated one, as flax's `variance_scaling(..., "truncated_normal")` does.
TRUNCATED_NORMAL_STD = 0.87962566103423978


def truncated_lecun_normal_(tensor: torch.Tensor, fan_in: int) -> torch.Tensor:
    """Flax's ``lecun_normal``: a normal truncated at two standard deviations, of variance 1 / ``fan_in``."""
    std = math.sqrt(1.0 / fan_in) / TRUNCATED_NORMAL_STD
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


def lecun_normal_phi_(phi: torch.Tensor) -> torch.Tensor:
    """Initialise Φ [d, n, p] as vmoe does: flax's ``lecun_normal`` on that 3-d shape.

    Flax takes fan_in = shape[-2] · (the remaining dims) = n·d for [d, n, p], and draws from a
    normal truncated at two standard deviations, rescaled so the variance is 1 / fan_in.
    """
    d, n, _ = phi.shape
    return truncated_lecun_normal_(phi, fan_in=d * n)


class SoftMoE(nn.Module):
    """A Soft MoE layer whose experts are timm-style MLPs; a drop-in ``mlp_layer`` for timm's ``Block``.

    Args:
        in_features: token dimension d.
        hidden_features, out_features, act_layer, norm_layer, bias, drop: each expert's MLP, as timm's ``Mlp``.
        num_experts: number of experts n.
        slots_per_expert: slots p each expert processes.
        normalize: L2-normalise tokens and Φ (with a learnable ``scale``) when computing the logits.
        scale_init: the initial value of ``scale`` (vmoe: 1.0). With normalised logits in
            [-scale, scale], the softmaxes start near uniform unless scale is large against log(m):
            a small model trained for few steps may never move it far enough to route.
        dispatch: ``"soft"`` (the paper), ``"uniform"`` (every slot averages all tokens) or
            ``"identity"`` (slot i is token i; needs n·p = m). Table 2's ablations.
        combine: ``"soft"`` (the paper), ``"uniform"`` (every token averages all slots) or ``"identity"``.
        experts: a custom expert bank mapping [b, n, p, d] -> [b, n, p, d'] (see ``softmoe.experts``);
            replaces the MLP experts.
    """

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        act_layer: Type[nn.Module] = nn.GELU,
        norm_layer: Optional[Type[nn.Module]] = None,
        bias: Union[bool, Tuple[bool, bool]] = True,
        drop: Union[float, Tuple[float, float]] = 0.0,
        *,
        num_experts: int = 128,
        slots_per_expert: int = 1,
        normalize: bool = True,
        scale_init: float = SCALE_INIT,
        dispatch: str = "soft",
        combine: str = "soft",
        experts: Optional[nn.Module] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype (the layer's parameters), got {dtype!r}")
        self.dim = require_positive_int("in_features", in_features)
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.slots_per_expert = require_positive_int("slots_per_expert", slots_per_expert)
        self.num_slots = self.num_experts * self.slots_per_expert
        self.normalize = require_bool("normalize", normalize)
        self.scale_init = require_positive_number("scale_init", scale_init)
        self.dispatch_mode = require_choice("dispatch", dispatch, DISPATCH_CHOICES)
        self.combine_mode = require_choice("combine", combine, COMBINE_CHOICES)

        self.phi = nn.Parameter(
            torch.empty(self.dim, self.num_experts, self.slots_per_expert, device=device, dtype=dtype)
        )
        # Named and shaped as in the reference implementation so its router weights load unchanged.
        self.scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if self.normalize else None
        if experts is None:
            experts = BatchedMlp(
                num_experts,
                in_features,
                hidden_features,
                out_features,
                act_layer=act_layer,
                norm_layer=norm_layer,
                bias=bias,
                drop=drop,
                device=device,
                dtype=dtype,
            )
        elif not isinstance(experts, nn.Module):
            raise ValueError(f"experts must be an nn.Module mapping slots [b, n, p, d] to [b, n, p, d'] (see "
                             f"softmoe.experts), got {experts!r}")
        elif getattr(experts, "num_experts", num_experts) != num_experts:
            raise ValueError(f"experts holds num_experts={experts.num_experts} experts, but the layer has "
                             f"num_experts={num_experts}: build the bank with the layer's num_experts")
        self.experts = experts
        self.reset_parameters()
        # Set by softmoe.capture_routing; called with (dispatch, combine) on every forward while set.
        self._routing_recorder: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None

    def reset_parameters(self) -> None:
        """Re-initialise the router (Φ and scale); the experts keep their weights."""
        lecun_normal_phi_(self.phi.data)
        if self.scale is not None:
            nn.init.constant_(self.scale, self.scale_init)

    def init_weights(self) -> None:
        """Called by timm's ViT weight init: the router as vmoe, the experts as timm's init mode would the dense MLP."""
        self.reset_parameters()
        if hasattr(self.experts, "init_weights"):
            self.experts.init_weights()

    reset_router = reset_parameters  # the earlier name of the router's re-init

    def compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The dtype the layer's matmuls read ``x`` in: autocast's (eager calls), else ``x``'s own."""
        autocast_dtype = None if is_tracing() or x.dtype == torch.float64 else autocast_dtype_on(x.device)
        return autocast_dtype or x.dtype

    def raw_logits(self, x: torch.Tensor) -> torch.Tensor:
        """X·Φ̂ [b, m, s] in ``x``'s dtype, Φ̂ = scale · l2n(Φ) (Φ if normalize=False), normalised in the
        routing precision even when the parameters are bf16 (``model.to(torch.bfloat16)``)."""
        phi = self.phi.reshape(self.dim, self.num_slots)  # [d, s]
        if self.normalize:
            phi = phi.to(routing_dtype(x))
            phi = self.scale.to(phi.dtype) * l2_normalize(phi, dim=0)
        return torch.matmul(x, phi.to(x.dtype))  # [b, m, s]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Router logits [b, m, n·p] in float32 (float64 for float64 inputs)."""
        logits = self.raw_logits(x).to(routing_dtype(x))
        if self.normalize:
            # l2n(X)·Φ̂ = diag(1/|x|)·X·Φ̂: scaling the [b, m, s] logits costs less than normalising the
            # [b, m, d] tokens, and leaves no normalised copy of them to save for backward.
            squared_norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=logits.dtype).square()
            logits = logits * torch.rsqrt(squared_norm + NORM_EPS)  # [b, m, 1] broadcast
        return logits

    def routing_weights(self, x: torch.Tensor, x_compute: Optional[torch.Tensor] = None
                        ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Dispatch and combine weights, each [b, m, n·p], at least float32 (softmaxes in float32 under autocast).

        ``x_compute``: ``x`` already cast to :meth:`compute_dtype` (the forward casts it once for the logits
        and the dispatch); by default ``x`` itself, cast by autocast where it is on."""
        b, m = x.shape[0], x.shape[1]  # indexed, not unpacked: torch.fx proxies cannot be iterated
        dtype = routing_dtype(x)
        if "soft" in (self.dispatch_mode, self.combine_mode):
            tokens = x if self.normalize else None
            raw = self.raw_logits(x if x_compute is None else x_compute)
            # eager: one autograd node for the scaling and both softmaxes; traced: plain ops for the compiler
            dispatch, combine = soft_routing(raw, tokens, NORM_EPS, fused=not is_tracing())
        else:
            dispatch = combine = None
        dispatch = self._weights(self.dispatch_mode, dispatch, b, m, x.device, dtype, softmax_dim=1)
        combine = self._weights(self.combine_mode, combine, b, m, x.device, dtype, softmax_dim=2)
        return dispatch, combine

    def _weights(self, mode, soft_weights, b, m, device, dtype, softmax_dim):
        if mode == "soft":
            return soft_weights
        shape = (b, m, self.num_slots)
        if mode == "uniform":
            return torch.full(shape, 1.0 / shape[softmax_dim], device=device, dtype=dtype)
        if not is_symbolically_traced() and m != self.num_slots:  # compiled: as eager, not torch's expand error
            raise ValueError(
                f"identity routing needs num_experts * slots_per_expert == number of tokens, "
                f"got {self.num_experts} * {self.slots_per_expert} = {self.num_slots} slots for {m} tokens"
            )
        return torch.eye(m, device=device, dtype=dtype).expand(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_tokens("input", x, self.dim, self.phi)
        # is_tracing() first: under torch.fx.symbolic_trace, x.device.type == "cpu" is a proxy, not a bool
        if auto_tune_pending() and not is_tracing() and x.device.type == "cpu" and torch.is_grad_enabled():
            tune_allocator_once()  # before the first backward allocates the expert weight gradients
        b = x.shape[0]
        compute_dtype = self.compute_dtype(x)
        x_compute = x.to(compute_dtype)  # cast once: the logits and the slots read the same copy
        dispatch, combine = self.routing_weights(x, x_compute)  # [b, m, s] each
        if self._routing_recorder is not None:
            self._routing_recorder(dispatch, combine)
        dispatch, combine = dispatch.to(compute_dtype), combine.to(compute_dtype)
        slots = torch.bmm(dispatch.transpose(1, 2), x_compute)  # X̃ = Dᵀ X: [b, s, d]
        slot_outputs = self.experts(slots.view(b, self.num_experts, self.slots_per_expert, self.dim))  # [b, n, p, d']
        if not is_tracing() and tuple(slot_outputs.shape[:3]) != (b, self.num_experts, self.slots_per_expert):
            expected = [b, self.num_experts, self.slots_per_expert, self.dim]
            raise ValueError(f"experts must map slots [b, n, p, d] = {expected} to [b, n, p, d'], got an output of "
                             f"shape {list(slot_outputs.shape)}")
        # the output width spelled out, not -1: an empty batch has no elements to infer it from
        return torch.bmm(combine, slot_outputs.reshape(b, self.num_slots, slot_outputs.shape[-1]))  # Y = C Ỹ

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
            f"normalize={self.normalize}, scale_init={self.scale_init}, dispatch={self.dispatch_mode!r}, "
            f"combine={self.combine_mode!r}"
        )


class SoftMoELayerWrapper(SoftMoE):
    """Turn any layer mapping [b, m, dim] -> [b, m, d'] into a Soft MoE layer of independent experts.

    The reference implementation's API: ``layer`` is a class (or ``partial``) built ``num_experts`` times
    with ``**layer_kwargs``; expert i receives its slots as a [batch, slots_per_expert, dim] tensor.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        slots_per_expert: int,
        layer: Callable[..., nn.Module],
        normalize: bool = True,
        **layer_kwargs,
    ) -> None:
        require_positive_int("dim", dim)  # named as the wrapper takes it, before SoftMoE checks it as in_features
        require_positive_int("num_experts", num_experts)
        require_module_class("layer", layer)  # built num_experts times
        experts = StackedExperts(num_experts, partial(layer, **layer_kwargs))
        # device= and dtype= are the layer's arguments (nn.Linear's, timm's Mlp's); the router must follow them, or
        # SoftMoELayerWrapper(..., device="cuda") would leave Φ on the CPU, beside experts on the GPU.
        super().__init__(
            dim, num_experts=num_experts, slots_per_expert=slots_per_expert, normalize=normalize, experts=experts,
            device=layer_kwargs.get("device"), dtype=layer_kwargs.get("dtype"),
        )
        # nn.MultiheadAttention and the torch Transformer layers read [sequence, batch, dim] by default
        sequence_first = [name for name, module in experts.layer.named_modules()
                          if getattr(module, "batch_first", None) is False]
        if sequence_first:
            where = "" if sequence_first[0] == "" else f" (its {sequence_first[0]})"
            warnings.warn(
                f"SoftMoELayerWrapper: layer {type(experts.layer).__name__}{where} has batch_first=False, but each "
                "expert receives its slots as [batch, slots_per_expert, dim]: it would attend across the examples "
                "of a batch. Pass batch_first=True",
                UserWarning,
                stacklevel=2,
            )
