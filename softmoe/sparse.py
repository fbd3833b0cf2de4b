"""The sparse MoE baselines Soft MoE is compared against (arXiv 2308.00951, section 3 and Appendix B).

* :class:`TokensChoiceMoE`: every token picks its top-k experts (V-MoE, Riquelme et al. 2021,
  arXiv 2106.05974), with optional Batch Priority Routing and V-MoE's auxiliary losses.
* :class:`ExpertsChoiceMoE`: every expert picks its top-c tokens (Zhou et al. 2022, arXiv 2202.09368).

Both are drop-in ``moe_layer`` classes for :class:`softmoe.SoftMoEVisionTransformer`: they take
timm's MLP kwargs plus ``num_experts``, ``slots_per_expert`` and ``normalize`` like
:class:`softmoe.SoftMoE`. Their experts are a :class:`softmoe.experts.BatchedMlp`.

Shared mechanics, for the m tokens X [m, d] of one example:

    logits = X W                               [m, n]   (l2n(X) · scale · l2n(W) if normalize)
    probs  = softmax over the n experts        [m, n]   (noisy logits while training, as V-MoE)
    route: fill every expert's buffer of `capacity` slots with (token, gate) pairs
    Y[t]   = Σ over the slots holding t of  gate · f_i(X[t])

Each expert's buffer is gathered into one [b, n, capacity, d] tensor, so the experts run as a few
batched matmuls; empty slots hold a zero token with gate 0. A token in no slot is *dropped*: the
layer returns 0 for it and the block's residual connection carries it through.

Routing groups: every example is its own group, as in the Soft MoE (V-MoE groups several images).
So capacity, Batch Priority Routing and the auxiliary losses are per example, and no token of one
example affects another's routing or output (apart from sharing the random stream of the noise).

Capacity, the number of slots per expert and example:

* ``capacity_factor=None`` (default): ``capacity = slots_per_expert``. The experts then process
  ``num_experts * slots_per_expert`` slots per example, exactly the compute of a Soft MoE with the
  same ``num_experts`` and ``slots_per_expert``: the cost-matched comparison of the paper.
* ``capacity_factor=C``: ``capacity = ceil(C · m · k / n)`` for Tokens Choice, ``ceil(C · m / n)``
  for Experts Choice (V-MoE's and Zhou et al.'s definition); ``slots_per_expert`` is then unused.

Either way capacity is capped at m (an expert cannot hold a token twice).

Telemetry, after every forward (computed without grad from tensors the forward already has):

* ``layer.last_stats``: a dict, see :func:`sparse_routing_stats` for the keys;
* ``layer.aux_loss``: Tokens Choice's weighted auxiliary loss, a scalar with grad (None for Experts
  Choice, which needs none); :func:`auxiliary_loss` sums it over a model;
* ``layer._routing_recorder`` (set by :func:`softmoe.capture_routing`) receives the one-hot dispatch
  and gate-weighted combine matrices [b, m, n · capacity]: ``capture_routing`` records them as
  [b, m, n, capacity], whatever the capacity (``slots_per_expert``, or the ``capacity_factor``'s, capped at m).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import (is_int, require_bool, require_module, require_number, require_positive_int,
                      require_positive_number, require_tokens)
from .experts import BatchedMlp
from .layer import l2_normalize, truncated_lecun_normal_
from .routing import SCALE_INIT

Stats = Dict[str, Union[int, torch.Tensor]]


def _coefficient_of_variation_squared(values: torch.Tensor) -> torch.Tensor:
    """``var / mean²`` over the last dim (population variance), as V-MoE's importance and load losses."""
    return values.var(dim=-1, unbiased=False) / values.mean(dim=-1).pow(2)


class SparseMoE(nn.Module):
    """What both sparse layers share: router, noise, expert buffers, statistics. Not used on its own.

    Args:
        in_features: token dimension d.
        hidden_features, out_features: each expert's MLP sizes, as timm's ``Mlp``.
        num_experts: number of experts n.
        slots_per_expert: each expert's capacity per example when ``capacity_factor`` is None.
        normalize: compute the router logits from L2-normalised tokens and router columns with a
            learnable ``scale``, as the Soft MoE does (paper section 2.3). V-MoE's router is
            ``normalize=False``.
        scale_init: the initial value of ``scale``, as for :class:`~softmoe.SoftMoE`.
        capacity_factor: None (capacity = ``slots_per_expert``) or C > 0; see the module docstring.
        noise_std: while training, Gaussian noise of std ``noise_std / num_experts`` is added to the
            logits before the softmax, as vmoe's noisy routers do (its default 1.0); 0 disables it.
        **mlp_kwargs: the rest of timm's MLP kwargs (``act_layer``, ``norm_layer``, ``bias``,
            ``drop``), passed to the :class:`~softmoe.experts.BatchedMlp` experts.
    """

    choices_per_token = 1  # the k in the capacity formula

    def __init__(
        self,
        in_features: int,
        hidden_features: Optional[int] = None,
        out_features: Optional[int] = None,
        *,
        num_experts: int = 128,
        slots_per_expert: int = 1,
        normalize: bool = True,
        scale_init: float = SCALE_INIT,
        capacity_factor: Optional[float] = None,
        noise_std: float = 1.0,
        device=None,
        dtype=None,
        **mlp_kwargs,
    ) -> None:
        super().__init__()
        self.dim = require_positive_int("in_features", in_features)
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.slots_per_expert = require_positive_int("slots_per_expert", slots_per_expert)
        self.normalize = require_bool("normalize", normalize)
        self.scale_init = require_positive_number("scale_init", scale_init)
        self.capacity_factor = (
            None
            if capacity_factor is None
            else require_number("capacity_factor", capacity_factor, minimum=0, inclusive=False)
        )
        self.noise_std = require_number("noise_std", noise_std, minimum=0, inclusive=True)

        self.router_weight = nn.Parameter(torch.empty(self.dim, self.num_experts, device=device, dtype=dtype))  # [d, n]
        self.scale = nn.Parameter(torch.ones(1, device=device, dtype=dtype)) if self.normalize else None
        self.experts = BatchedMlp(
            num_experts, in_features, hidden_features, out_features, device=device, dtype=dtype, **mlp_kwargs
        )
        self.reset_parameters()
        # Set by softmoe.capture_routing; see the module docstring for when it is called.
        self._routing_recorder: Optional[Callable[[torch.Tensor, torch.Tensor], None]] = None
        self.last_stats: Optional[Stats] = None
        self.aux_loss: Optional[torch.Tensor] = None

    def __getstate__(self) -> Dict[str, Any]:
        """The module's state with ``aux_loss`` detached: a copy (``copy.deepcopy``, as timm's ``ModelEmaV3`` makes
        one after a training step) takes its value, not the original's autograd graph, which deepcopy refuses
        ("Only Tensors created explicitly by the user ... support the deepcopy protocol")."""
        state = super().__getstate__()
        if state.get("aux_loss") is not None:
            state["aux_loss"] = state["aux_loss"].detach()
        return state

    def reset_parameters(self) -> None:
        """LeCun normal (truncated at 2 std, fan_in = d), flax's default for vmoe's router ``Dense``."""
        truncated_lecun_normal_(self.router_weight, fan_in=self.dim)
        if self.scale is not None:
            nn.init.constant_(self.scale, self.scale_init)

    def init_weights(self) -> None:
        """Called by timm's ViT weight init: the router as vmoe, the experts as timm's ViT Linear layers."""
        self.reset_parameters()
        self.experts.init_weights()

    reset_router = reset_parameters  # the earlier name of the router's re-init

    def capacity(self, num_tokens: int) -> int:
        """Slots per expert for an example of ``num_tokens`` tokens (see the module docstring)."""
        if self.capacity_factor is None:
            capacity = self.slots_per_expert
        else:
            capacity = math.ceil(self.capacity_factor * num_tokens * self.choices_per_token / self.num_experts)
        return min(capacity, num_tokens)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Noise-free router logits [b, m, n], in float32 at least (the softmaxes run in it under autocast)."""
        weight = self.router_weight
        if self.normalize:
            x = l2_normalize(x, dim=-1)
            weight = self.scale * l2_normalize(weight, dim=0)
        logits = torch.matmul(x, weight.to(x.dtype))
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def _noisy(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.training or self.noise_std == 0:
            return logits
        return logits + self.effective_noise_std * torch.randn_like(logits)

    @property
    def effective_noise_std(self) -> float:
        return self.noise_std / self.num_experts

    def _route(self, probs: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Buffers from router probabilities [b, m, n]: ``slot_token`` (long, m for an empty slot) and
        ``slot_gate`` (0 for an empty slot), each [b, n · capacity], expert-major."""
        raise NotImplementedError(
            f"{type(self).__name__} does not route: SparseMoE is what the sparse layers share, use TokensChoiceMoE "
            "or ExpertsChoiceMoE (or override _route in a subclass)"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        require_tokens("input", x, self.dim, self.router_weight)
        b, m, d = x.shape
        capacity = self.capacity(m)
        logits = self.logits(x)  # [b, m, n]
        noisy_logits = self._noisy(logits)
        probs = torch.softmax(noisy_logits, dim=-1)  # routing and gate weights
        slot_token, slot_gate = self._route(probs, capacity)  # [b, n·capacity] each

        index = slot_token.unsqueeze(-1)  # [b, n·capacity, 1]
        padded = F.pad(x, (0, 0, 0, 1))  # [b, m + 1, d]: row m is what empty slots hold
        buffer = padded.gather(1, index.expand(-1, -1, d))  # [b, n·capacity, d]
        outputs = self.experts(buffer.view(b, self.num_experts, capacity, d))  # [b, n, capacity, d']
        outputs = outputs.reshape(b, self.num_experts * capacity, outputs.shape[-1])  # the width, not -1: b may be 0
        outputs = outputs * slot_gate.unsqueeze(-1).to(outputs.dtype)
        y = outputs.new_zeros(b, m + 1, outputs.shape[-1]).scatter_add(1, index.expand_as(outputs), outputs)

        losses = self._auxiliary_losses(logits, noisy_logits, probs)  # name -> scalar with grad
        self.aux_loss = losses.pop("aux_loss", None)
        with torch.no_grad():
            self.last_stats = self._stats(slot_token, probs, m, capacity)
            self.last_stats.update({name: loss.detach() for name, loss in losses.items()})
            if self.aux_loss is not None:
                self.last_stats["aux_loss"] = self.aux_loss.detach()
            if self._routing_recorder is not None:
                self._record(slot_token, slot_gate, m)
        return y[:, :m]

    def _auxiliary_losses(self, logits, noisy_logits, probs) -> Dict[str, torch.Tensor]:
        """Auxiliary losses by name, with ``"aux_loss"`` their weighted sum; none by default."""
        return {}

    def _stats(self, slot_token: torch.Tensor, probs: torch.Tensor, m: int, capacity: int) -> Stats:
        b = slot_token.shape[0]
        filled = (slot_token < m).float()  # [b, n·capacity]
        per_token = filled.new_zeros(b, m + 1).scatter_add_(1, slot_token, filled)[:, :m]  # slots holding each token
        per_expert = filled.view(b, self.num_experts, capacity).sum(dim=(0, 2))  # [n]
        importance = probs.sum(dim=(0, 1))  # [n]
        return {
            "capacity": capacity,
            "dropped_fraction": (per_token == 0).float().mean(),
            "expert_load": per_expert / per_expert.sum(),
            "expert_importance": importance / importance.sum(),
        }

    def _record(self, slot_token: torch.Tensor, slot_gate: torch.Tensor, m: int) -> None:
        dispatch = F.one_hot(slot_token, m + 1)[..., :m].transpose(1, 2).to(slot_gate.dtype)  # [b, m, n·capacity]
        self._routing_recorder(dispatch, dispatch * slot_gate.unsqueeze(1))

    def extra_repr(self) -> str:
        capacity = "capacity=slots_per_expert"
        if self.capacity_factor is not None:
            capacity = f"capacity_factor={self.capacity_factor}"
        return (
            f"dim={self.dim}, num_experts={self.num_experts}, slots_per_expert={self.slots_per_expert}, "
            f"{capacity}, normalize={self.normalize}, noise_std={self.noise_std}"
        )


class TokensChoiceMoE(SparseMoE):
    """Tokens Choice (V-MoE): each token picks its top-k experts; each expert keeps at most ``capacity`` of them.

    Assignments claim buffer slots in order: every token's first choice before any second choice
    (V-MoE); within a rank, tokens go in position order, or with ``batch_priority=True`` in
    decreasing order of their largest router probability (Batch Priority Routing, V-MoE section
    4.1; here within each example, the routing group). An assignment that finds its expert full is
    dropped. The gate of an assignment is the router probability of that expert, not renormalised
    over the k chosen (as V-MoE).

    Auxiliary losses (V-MoE Appendix A.2, as vmoe's ``NoisyTopExpertsPerItemRouter`` computes them),
    each computed per example and averaged over the batch; ``CV²(v) = var(v) / mean(v)²`` over experts:

    - ``importance_loss = CV²(Σ_t softmax(logits)[t])``: spread of the summed noise-free router
      probabilities; 0 when balanced.
    - ``load_loss = CV²(mean_t P[t])`` with ``P[t, i] = 1 - Φ((τ_t - logits[t, i]) / σ)``: the
      probability that expert i would enter token t's top-k if the noise were drawn again; τ_t is
      t's k-th largest noisy logit, σ = ``noise_std / num_experts``. Only while training with noise.
    - ``gshard_loss = n · Σ_i f_i · P_i`` with f_i the share of tokens whose top-1 expert is i and
      P_i the mean router probability of i (GShard's l_aux, the Switch Transformer's
      load-balancing loss); 1 when balanced, n when one expert takes everything.
    - ``aux_loss = importance_loss_weight · importance_loss + load_loss_weight · load_loss
      + gshard_loss_weight · gshard_loss``, over the losses with a positive weight (vmoe's defaults
      1, 1, 0). The trainer adds ``aux_loss_weight · Σ_layers aux_loss`` (see :func:`auxiliary_loss`).

    Args:
        k: experts per token, in [1, num_experts].
        batch_priority: Batch Priority Routing instead of position order.
        importance_loss_weight, load_loss_weight, gshard_loss_weight: weights in ``aux_loss``, >= 0.
        *args, **kwargs: as :class:`SparseMoE` (timm's MLP kwargs, num_experts, slots_per_expert,
            normalize, capacity_factor, noise_std, device, dtype).
    """

    def __init__(
        self,
        *args,
        k: int = 1,
        batch_priority: bool = False,
        importance_loss_weight: float = 1.0,
        load_loss_weight: float = 1.0,
        gshard_loss_weight: float = 0.0,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        if not is_int(k) or not 1 <= k <= self.num_experts:
            raise ValueError(f"k must be an integer in [1, num_experts={self.num_experts}], got {k!r}")
        self.k = self.choices_per_token = k
        self.batch_priority = require_bool("batch_priority", batch_priority)
        self.loss_weights = {
            name: require_number(f"{name}_weight", weight, minimum=0, inclusive=True)
            for name, weight in (
                ("importance_loss", importance_loss_weight),
                ("load_loss", load_loss_weight),
                ("gshard_loss", gshard_loss_weight),
            )
        }

    def _route(self, probs: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
        b, m, n = probs.shape
        k = self.k
        gates, experts = probs.topk(k, dim=-1)  # [b, m, k]
        if self.batch_priority:
            order = torch.sort(gates[..., 0], dim=1, descending=True, stable=True).indices  # [b, m]
        else:
            order = torch.arange(m, device=probs.device).expand(b, m)

        def in_claim_order(t: torch.Tensor) -> torch.Tensor:  # [b, m, k] -> [b, k·m], rank-major
            return t.gather(1, order.unsqueeze(-1).expand(b, m, k)).transpose(1, 2).reshape(b, k * m)

        expert, gate = in_claim_order(experts), in_claim_order(gates)
        token = order.unsqueeze(1).expand(b, k, m).reshape(b, k * m)
        # A claim's place in its expert's buffer = the number of earlier claims on that expert: group
        # the claims by expert with a stable sort (keeps claim order), then rank them within each group.
        expert, by_expert = torch.sort(expert, dim=1, stable=True)
        claims = torch.zeros(b, n, dtype=torch.long, device=probs.device)
        claims.scatter_add_(1, expert, torch.ones_like(expert))
        first_claim = claims.cumsum(dim=1) - claims  # [b, n]: where each expert's group starts
        position = torch.arange(k * m, device=probs.device) - first_claim.gather(1, expert)  # [b, k·m]
        discard = n * capacity  # an extra slot that collects the dropped claims, cut off below
        slot = torch.where(position < capacity, expert * capacity + position, discard)
        slot_token = torch.full((b, discard + 1), m, device=probs.device).scatter_(1, slot, token.gather(1, by_expert))
        slot_gate = probs.new_zeros(b, discard + 1).scatter_add(1, slot, gate.gather(1, by_expert))
        return slot_token[:, :discard], slot_gate[:, :discard]

    def _auxiliary_losses(self, logits, noisy_logits, probs) -> Dict[str, torch.Tensor]:
        n = self.num_experts
        clean_probs = probs if noisy_logits is logits else torch.softmax(logits, dim=-1)
        losses = {"importance_loss": _coefficient_of_variation_squared(clean_probs.sum(dim=1)).mean()}
        if noisy_logits is not logits:
            threshold = noisy_logits.topk(self.k, dim=-1).values[..., -1:]  # [b, m, 1]: τ_t
            # 1 - Φ(z) = erfc(z / √2) / 2
            p = 0.5 * torch.erfc((threshold - logits) / (self.effective_noise_std * math.sqrt(2.0)))  # [b, m, n]
            losses["load_loss"] = _coefficient_of_variation_squared(p.mean(dim=1)).mean()
        top1_share = F.one_hot(probs.argmax(dim=-1), n).to(probs.dtype).mean(dim=1)  # [b, n]: f_i
        losses["gshard_loss"] = (n * (top1_share * probs.mean(dim=1)).sum(dim=-1)).mean()
        terms = [weight * losses[name] for name, weight in self.loss_weights.items() if weight > 0 and name in losses]
        losses["aux_loss"] = torch.stack(terms).sum() if terms else logits.new_zeros(())
        return losses

    def _stats(self, slot_token: torch.Tensor, probs: torch.Tensor, m: int, capacity: int) -> Stats:
        stats = super()._stats(slot_token, probs, m, capacity)
        kept = (slot_token < m).sum()  # every filled slot holds one kept assignment
        stats["dropped_assignment_fraction"] = 1.0 - kept.float() / (slot_token.shape[0] * m * self.k)
        return stats

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, batch_priority={self.batch_priority}"


class ExpertsChoiceMoE(SparseMoE):
    """Experts Choice (Zhou et al. 2022): each expert takes the ``capacity`` tokens it scores highest.

    Scores are the router probabilities, a softmax over experts per token (Zhou et al.'s
    ``S = softmax(X W)``); expert i takes the top-``capacity`` tokens of column i and weights its
    output for each by that score. A token may be taken by several experts or by none (dropped).
    Every expert is full by construction, so ``expert_load`` is uniform and no auxiliary loss is
    needed (``aux_loss`` stays None); ``expert_importance`` shows which experts the router favours.

    Args: as :class:`SparseMoE`.
    """

    def _route(self, probs: torch.Tensor, capacity: int) -> Tuple[torch.Tensor, torch.Tensor]:
        b, m, n = probs.shape
        gate, token = probs.transpose(1, 2).topk(capacity, dim=-1)  # [b, n, capacity]: each expert's top tokens
        return token.reshape(b, n * capacity), gate.reshape(b, n * capacity)


def sparse_routing_stats(layer: SparseMoE) -> Dict[str, Union[int, float, torch.Tensor]]:
    """The routing statistics of ``layer``'s last forward pass, scalars as Python floats.

    - ``capacity``: slots per expert and example.
    - ``dropped_fraction``: share of the batch's tokens that no expert processed (their layer output
      is 0; the residual carries them). Same definition for both layers.
    - ``dropped_assignment_fraction`` (Tokens Choice): share of the b·m·k token-expert assignments
      dropped for lack of capacity (equals ``dropped_fraction`` when k = 1).
    - ``expert_load``: tensor [n], each expert's share of the processed token slots (sums to 1;
      uniform for Experts Choice by construction).
    - ``expert_importance``: tensor [n], each expert's share of the router probability mass (sums to
      1; the probabilities the layer routed with, so noisy while training).
    - Tokens Choice: ``importance_loss``, ``gshard_loss``, ``load_loss`` (only when noise was
      added) and their weighted sum ``aux_loss``; see :class:`TokensChoiceMoE`.
    """
    stats = getattr(layer, "last_stats", None)
    if stats is None:
        raise ValueError(f"{type(layer).__name__} has no routing statistics yet: run a forward pass through it first")
    return {
        name: value.item() if isinstance(value, torch.Tensor) and value.ndim == 0 else value
        for name, value in stats.items()
    }


def auxiliary_loss(model: nn.Module) -> torch.Tensor:
    """Σ of ``aux_loss`` over the sparse layers of ``model`` from its last forward (0 if there are none).

    Train with ``loss = task_loss + aux_loss_weight * auxiliary_loss(model)``.
    """
    losses = [
        module.aux_loss for module in require_module("model", model, "an nn.Module holding sparse MoE layers").modules()
        if isinstance(module, SparseMoE) and module.aux_loss is not None
    ]
    if losses:
        return torch.stack(losses).sum()
    parameter = next(model.parameters(), None)
    return torch.zeros((), device=None if parameter is None else parameter.device)
