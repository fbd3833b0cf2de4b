"""Routing statistics: the one definition used by training telemetry, evaluation and the notebooks.

All functions take routing weights shaped [batch, tokens m, experts n, slots_per_expert p], as
recorded by :func:`softmoe.capture_routing`.
"""

from __future__ import annotations

import math
from typing import Dict, Union

import torch
from torch import nn
from torch.nn import functional as F

from .capture import is_routing_layer


def entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy (nats) along ``dim``, with 0 log 0 = 0."""
    return -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=dim)


def normalized_entropy(probs: torch.Tensor, dim: int) -> torch.Tensor:
    """Entropy divided by its maximum log(size); a support of one element counts as uniform (1)."""
    size = probs.shape[dim]
    if size == 1:
        return torch.ones_like(probs.sum(dim=dim))
    return entropy(probs, dim) / math.log(size)


def _check_routing(name: str, weights: torch.Tensor) -> None:
    if not isinstance(weights, torch.Tensor):
        raise ValueError(f"{name} must be a tensor [batch, tokens, experts, slots_per_expert] (a routing record's "
                         f"{name}), got {type(weights).__name__}")
    if weights.ndim != 4:
        raise ValueError(
            f"{name} must have shape [batch, tokens, experts, slots_per_expert], got shape {list(weights.shape)}"
        )
    if weights.numel() == 0:  # every statistic would be a mean over nothing: NaN
        raise ValueError(f"{name} holds no routing weights (shape {list(weights.shape)}): record a batch of at least "
                         "one example")


def routing_stats(dispatch: torch.Tensor, combine: torch.Tensor) -> Dict[str, Union[float, torch.Tensor]]:
    """Summaries of one layer's routing for a batch.

    - ``dispatch_entropy``: mean over slots of the entropy of its dispatch distribution over tokens, / log m
      (1 = uniform, 0 = one token).
    - ``combine_entropy``: mean over tokens of the entropy of its combine distribution over all n·p slots, / log(n·p).
    - ``dispatch_max``: mean over slots of the largest dispatch weight (-> 1 when dispatch collapses, paper Appendix E).
    - ``combine_max``: mean over tokens of the largest combine weight (-> 1 when combine collapses).
    - ``expert_utilisation``: tensor [n], each expert's share of the total combine mass (sums to 1).
    - ``slot_utilisation``: tensor [n·p], each slot's share of the total combine mass (sums to 1).
    - ``effective_experts``: exp of the entropy of ``expert_utilisation`` (n when balanced, 1 when one expert
      takes all).

    Defined for a Soft MoE's weights, whose rows and columns are distributions. A sparse layer's record
    (:mod:`softmoe.sparse`) is one-hot per slot and gate-weighted per token: there ``dispatch_max`` is the share of
    filled slots and ``combine_entropy`` the entropy of rows that sum to the token's gates, not to 1.
    """
    _check_routing("dispatch", dispatch)
    _check_routing("combine", combine)
    if dispatch.shape != combine.shape:
        raise ValueError(
            f"dispatch and combine must have the same shape, got {list(dispatch.shape)} and {list(combine.shape)}"
        )
    b, m, n, p = dispatch.shape
    dispatch = dispatch.double().reshape(b, m, n * p)
    combine = combine.double().reshape(b, m, n * p)

    slot_mass = combine.sum(dim=(0, 1))  # [n·p]
    slot_utilisation = slot_mass / slot_mass.sum()
    expert_utilisation = slot_utilisation.view(n, p).sum(dim=1)
    return {
        "dispatch_entropy": normalized_entropy(dispatch, dim=1).mean().item(),
        "combine_entropy": normalized_entropy(combine, dim=2).mean().item(),
        "dispatch_max": dispatch.amax(dim=1).mean().item(),
        "combine_max": combine.amax(dim=2).mean().item(),
        "expert_utilisation": expert_utilisation.float(),
        "slot_utilisation": slot_utilisation.float(),
        "effective_experts": effective_experts(expert_utilisation),
    }


def effective_experts(expert_utilisation: torch.Tensor) -> float:
    """exp of the entropy of ``expert_utilisation`` [n] (each expert's share): n when balanced, 1 when one takes all."""
    return math.exp(entropy(expert_utilisation.double(), dim=0).item())


def cumulative_dispatch_mass(dispatch: torch.Tensor) -> torch.Tensor:
    """Mean over batch and slots of the sorted cumulative dispatch weight: [m], entry k = mass of the top k+1 tokens
    (paper Appendix G)."""
    _check_routing("dispatch", dispatch)
    b, m, n, p = dispatch.shape
    per_slot = dispatch.double().reshape(b, m, n * p).sort(dim=1, descending=True).values
    return per_slot.cumsum(dim=1).mean(dim=(0, 2)).float()


def slot_similarity(layer_or_phi: Union[nn.Module, torch.Tensor]) -> torch.Tensor:
    """Pairwise cosine similarity [n·p, n·p] of the slot parameters Φ (columns of a [d, n, p] tensor)."""
    phi = getattr(layer_or_phi, "phi", layer_or_phi)
    if not isinstance(phi, torch.Tensor) or phi.ndim != 3:
        raise ValueError(
            "expected a Soft MoE layer or its phi [dim, experts, slots_per_expert], "
            f"got {type(layer_or_phi).__name__}"
        )
    d = phi.shape[0]
    # divided by the norms themselves: the router's eps (1e-6) is not negligible against a slot's squared norm, about
    # 1/n at init (a diagonal of 0.99987 at 128 experts)
    slots = F.normalize(phi.detach().double().reshape(d, -1), dim=0)  # [d, s]
    return (slots.T @ slots).float()


def router_scale(layer: nn.Module) -> float:
    """The layer's learnable logit scale (1.0 when the layer does not normalise)."""
    if not is_routing_layer(layer):  # a model or a dense MLP: no router, so no scale to read
        raise ValueError(f"expected a Soft MoE or sparse MoE layer (softmoe.moe_layers(model) lists a model's), "
                         f"got {type(layer).__name__}")
    scale = getattr(layer, "scale", None)
    return 1.0 if scale is None else float(scale.detach().reshape(-1)[0])
