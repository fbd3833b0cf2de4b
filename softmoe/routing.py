"""The router's elementwise part as one autograd node: from the raw logits X·Φ̂ [b, m, s] to the dispatch
and combine weights (paper section 2.1 and 2.3).

    logits   = k ⊙ (X·Φ̂)       k = 1/sqrt(|x|² + eps) per token (section 2.3; k = 1 without normalisation)
    dispatch = softmax over the m tokens
    combine  = softmax over the s slots

Written out as torch ops under autocast, this is six passes over [b, m, s] forward (the bf16 logits cast to
float32, the scaling, two softmaxes, the weights cast back) and as many autograd nodes backward, each reading and
writing its own [b, m, s] tensor, plus the norm's own backward over [b, m, d]. :class:`RouterSoftmaxes` casts
and scales in one pass (a mixed-dtype product) and computes the backward in one node: both softmax gradients
summed in place, the scaling's gradient, and the norm's gradient
``-k³ (Σ_s g ⊙ XΦ̂) x`` in one pass over the tokens. Everything is float32 (float64 for float64 inputs),
whatever the logits' dtype: the softmaxes accumulate in float32 under autocast and for bf16 models.

Under ``torch.compile`` the layer calls :func:`soft_routing_reference` instead, the same maths as plain ops,
which inductor fuses into its own kernels forward and backward.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._checks import functorch_transforms_active

NORM_EPS = 1e-6  # l2_normalize's eps, as vmoe's router
SCALE_INIT = 1.0  # the router's initial scale, vmoe's default; SoftMoE and the sparse routers share it


def routing_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the precision the routing softmaxes run in."""
    return torch.promote_types(dtype, torch.float32)


def _softmaxes(raw_logits: torch.Tensor, tokens: Optional[torch.Tensor], eps: float):
    """(dispatch, combine, the inverse token norms k [b, m, 1] or None): :class:`RouterSoftmaxes`' forward."""
    inv_norm = None
    if tokens is not None:
        dtype = routing_dtype_of(raw_logits.dtype)
        squared_norm = torch.linalg.vector_norm(tokens, dim=-1, keepdim=True, dtype=dtype).square()
        inv_norm = torch.rsqrt(squared_norm + eps)  # [b, m, 1]
        # bf16 logits times float32 norms: the product is float32 (type promotion), the same bits as casting
        # the logits first, in one pass over [b, m, s] instead of two
        logits = raw_logits * inv_norm
    else:
        logits = raw_logits.to(routing_dtype_of(raw_logits.dtype))
    return torch.softmax(logits, dim=1), torch.softmax(logits, dim=2), inv_norm


class RouterSoftmaxes(torch.autograd.Function):
    """``(dispatch, combine)`` [b, m, s] from ``raw_logits`` = X·Φ̂ [b, m, s] and, when the router
    normalises, the tokens X [b, m, d] whose inverse norms scale each row."""

    @staticmethod
    def forward(ctx, raw_logits: torch.Tensor, tokens: Optional[torch.Tensor], eps: float):
        dispatch, combine, inv_norm = _softmaxes(raw_logits, tokens, eps)
        ctx.eps = eps
        ctx.save_for_backward(raw_logits, tokens, inv_norm, dispatch, combine)
        return dispatch, combine

    @staticmethod
    def backward(ctx, grad_dispatch: Optional[torch.Tensor], grad_combine: Optional[torch.Tensor]):
        raw_logits, tokens, inv_norm, dispatch, combine = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: a gradient autograd can differentiate again
            return RouterSoftmaxes._differentiable_backward(ctx, raw_logits, tokens, grad_dispatch, grad_combine)
        grad_logits = None
        if grad_dispatch is not None:
            grad_logits = torch._softmax_backward_data(grad_dispatch.to(dispatch.dtype), dispatch, 1, dispatch.dtype)
        if grad_combine is not None:
            grad = torch._softmax_backward_data(grad_combine.to(combine.dtype), combine, 2, combine.dtype)
            grad_logits = grad if grad_logits is None else grad_logits.add_(grad)
        if grad_logits is None:
            return None, None, None
        grad_tokens = None
        if inv_norm is not None:
            if ctx.needs_input_grad[1]:
                # logits = k·r with k = (|x|² + eps)^(-1/2): dL/dk = Σ_s g·r, dk/dx = -k³ x
                grad_inv_norm = torch.linalg.vecdot(grad_logits, raw_logits.to(grad_logits.dtype)).unsqueeze(-1)
                grad_tokens = (tokens.to(inv_norm.dtype) * (grad_inv_norm * inv_norm.pow(3)).neg_()).to(tokens.dtype)
            grad_logits = grad_logits.mul_(inv_norm)
        return grad_logits.to(raw_logits.dtype), grad_tokens, None

    @staticmethod
    def _differentiable_backward(ctx, raw_logits, tokens, grad_dispatch, grad_combine):
        """The backward as autograd's through :func:`soft_routing_reference`: the fast one above writes in place
        and saves the inverse norms without their dependence on the tokens, so it has no backward of its own."""
        inputs = [(raw_logits, ctx.needs_input_grad[0]), (tokens, tokens is not None and ctx.needs_input_grad[1])]
        wanted = [tensor for tensor, needed in inputs if needed]
        pairs = [(output, grad) for output, grad in zip(soft_routing_reference(raw_logits, tokens, ctx.eps),
                                                         (grad_dispatch, grad_combine)) if grad is not None]
        if not wanted or not pairs:
            return None, None, None
        outputs, grads = zip(*pairs)
        found = iter(torch.autograd.grad(outputs, wanted, grads, create_graph=True, allow_unused=True))
        return tuple(next(found) if needed else None for _, needed in inputs) + (None,)


def soft_routing_reference(raw_logits: torch.Tensor, tokens: Optional[torch.Tensor],
                           eps: float = NORM_EPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """:class:`RouterSoftmaxes`' forward as plain torch ops: autograd derives its backward (the compiled path), and
    without gradients it is all the eager path needs."""
    return _softmaxes(raw_logits, tokens, eps)[:2]


def soft_routing(raw_logits: torch.Tensor, tokens: Optional[torch.Tensor], eps: float = NORM_EPS,
                 fused: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dispatch and combine weights [b, m, s] (float32, or float64 for float64 logits) from the raw logits;
    ``tokens`` None: no normalisation. ``fused``: one autograd node (eager; without gradients, its forward
    alone); else plain ops (compile)."""
    # without gradients the same ops run, without the node's cost per call; torch.func's transforms cannot run the node
    if fused and torch.is_grad_enabled() and not functorch_transforms_active():
        return RouterSoftmaxes.apply(raw_logits, tokens, eps)
    return soft_routing_reference(raw_logits, tokens, eps)
