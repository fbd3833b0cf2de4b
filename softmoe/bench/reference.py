"""The Soft MoE layer as the reference implementation (``soft_moe_pytorch``) writes it: the baseline."""

from __future__ import annotations

import torch
from torch import nn

from ..layer import SoftMoE, l2_normalize


class ReferenceLoopSoftMoE(nn.Module):
    """The Soft MoE layer written as the reference implementation writes it: einsums over [b, m, n, p]
    routing weights and a Python loop over an ``nn.ModuleList`` of timm ``Mlp`` experts.

    It computes the same function as :class:`SoftMoE` (the reference feeds L2-normalised tokens to its
    experts; here they get the raw tokens), so the benchmark compares structure, not arithmetic.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, slots_per_expert: int) -> None:
        super().__init__()
        from timm.layers import Mlp

        self.phi = nn.Parameter(torch.empty(dim, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(1))
        self.experts = nn.ModuleList(Mlp(dim, hidden) for _ in range(num_experts))

    @classmethod
    def from_soft_moe(cls, layer: SoftMoE) -> "ReferenceLoopSoftMoE":
        """The reference-style twin of a normalised ``SoftMoE`` with ``BatchedMlp`` experts, with the same
        weights."""
        experts = layer.experts
        twin = cls(layer.dim, experts.hidden_features, layer.num_experts, layer.slots_per_expert)
        twin.to(device=layer.phi.device, dtype=layer.phi.dtype)
        with torch.no_grad():
            twin.phi.copy_(layer.phi)
            twin.scale.copy_(layer.scale)
            for i, mlp in enumerate(twin.experts):
                mlp.fc1.weight.copy_(experts.fc1_weight[i].t())
                mlp.fc1.bias.copy_(experts.fc1_bias[i])
                mlp.fc2.weight.copy_(experts.fc2_weight[i].t())
                mlp.fc2.bias.copy_(experts.fc2_bias[i])
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phi = self.scale * l2_normalize(self.phi, dim=0)
        logits = torch.einsum("bmd,dnp->bmnp", l2_normalize(x, dim=-1), phi)
        dispatch = torch.softmax(logits, dim=1)
        combine = torch.softmax(logits.flatten(start_dim=2), dim=-1).view_as(logits)
        slots = torch.einsum("bmd,bmnp->bnpd", x, dispatch)
        outputs = torch.stack([expert(slots[:, i, :, :]) for i, expert in enumerate(self.experts)], dim=1)
        return torch.einsum("bnpd,bmnp->bmd", outputs, combine)
