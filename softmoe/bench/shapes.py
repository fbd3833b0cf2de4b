"""The shapes the benchmark measures and their cost models: FLOPs, bytes, and the bare matmuls of the layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Tuple


class Matmul(NamedTuple):
    """``batch`` independent [rows, inner] @ [inner, cols] products."""

    name: str
    batch: int
    rows: int
    inner: int
    cols: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.rows * self.inner * self.cols


@dataclass(frozen=True)
class LayerShape:
    """One Soft MoE layer: [batch, tokens, dim] routed to num_experts x slots_per_expert MLPs dim->hidden->dim."""

    name: str
    batch: int
    tokens: int
    dim: int
    hidden: int
    num_experts: int
    slots_per_expert: int

    @property
    def num_slots(self) -> int:
        return self.num_experts * self.slots_per_expert

    def forward_matmuls(self) -> List[Matmul]:
        """The five products the layer's forward must compute, at its own shapes."""
        b, m, d, h, s, n = self.batch, self.tokens, self.dim, self.hidden, self.num_slots, self.num_experts
        rows = b * self.slots_per_expert  # each expert's slots over the batch
        return [
            Matmul("logits X·Φ", 1, b * m, d, s),
            Matmul("slots Dᵀ X", b, s, m, d),
            Matmul("experts fc1", n, rows, d, h),
            Matmul("experts fc2", n, rows, h, d),
            Matmul("outputs C Ỹ", b, m, s, d),
        ]

    def flops(self, backward: bool) -> int:
        """Multiply-adds x 2 of the logits, dispatch, experts and combine products; backward doubles each
        (for A·B: dA = dC·Bᵀ and dB = Aᵀ·dC)."""
        return (3 if backward else 1) * sum(mm.flops for mm in self.forward_matmuls())

    def expert_flops(self, backward: bool) -> int:
        """The experts' share: each of num_experts MLPs on batch x slots_per_expert rows."""
        forward = 2 * self.batch * self.num_slots * 2 * self.dim * self.hidden
        return 3 * forward if backward else forward

    def expert_weight_bytes(self, element_size: int) -> int:
        n, d, h = self.num_experts, self.dim, self.hidden
        return element_size * n * (d * h + h + h * d + d)

    def weight_traffic_bytes(self, backward: bool, element_size: int = 4) -> int:
        """Bytes of expert weights that must cross the memory bus: read once forward; with backward read
        again (for the input gradients) and their gradients written. The layer's bandwidth roofline."""
        return (3 if backward else 1) * self.expert_weight_bytes(element_size)

    def required_saved_bytes(self, element_size: int = 4) -> int:
        """Activations backward needs: X, D, C, X̃, the experts' pre- and post-activation hidden, Ỹ."""
        b, m, d, h, s = self.batch, self.tokens, self.dim, self.hidden, self.num_slots
        return element_size * (b * m * d + 2 * b * m * s + b * s * d + 2 * b * s * h + b * s * d)


LAYER_SHAPES = {
    "vit_s16": LayerShape("vit_s16", batch=32, tokens=197, dim=384, hidden=1536, num_experts=128, slots_per_expert=1),
    # the same layer at 4x the batch: 128 rows per expert matrix instead of 32
    "vit_s16_b128": LayerShape("vit_s16_b128", batch=128, tokens=197, dim=384, hidden=1536, num_experts=128,
                               slots_per_expert=1),
    "cpu_small": LayerShape("cpu_small", batch=16, tokens=65, dim=192, hidden=768, num_experts=64, slots_per_expert=1),
    "tiny": LayerShape("tiny", batch=2, tokens=9, dim=16, hidden=32, num_experts=4, slots_per_expert=2),
}


@dataclass(frozen=True)
class ModelShape:
    """A timm ViT and its Soft MoE twin, both built by ``timm.create_model`` from their registered names with
    the same ``overrides``; the Soft MoE one also gets ``moe_kwargs`` (its experts and MoE blocks)."""

    name: str
    dense_model: str
    soft_moe_model: str
    img_size: int
    overrides: Tuple[Tuple[str, object], ...] = ()  # hashable: the dataclass is frozen
    moe_kwargs: Tuple[Tuple[str, object], ...] = ()

    def create_kwargs(self, kind: str) -> dict:
        return dict(self.overrides, **(dict(self.moe_kwargs) if kind == "soft_moe" else {}))


MODEL_SHAPES = {
    # timm's vit_small_patch16_224 and the paper's Soft MoE S/16: 128 experts in the last 6 blocks (the defaults).
    "vit_s16": ModelShape("vit_s16", "vit_small_patch16_224", "soft_moe_vit_small", 224),
    "vit_b16": ModelShape("vit_b16", "vit_base_patch16_224", "soft_moe_vit_base", 224),
    "tiny": ModelShape("tiny", "vit_small_patch16_224", "soft_moe_vit_small", 32,
                       overrides=(("img_size", 32), ("embed_dim", 32), ("depth", 2), ("num_heads", 2)),
                       # 2 slots per expert: batch 2 gives 4 rows per expert, enough for the packed CPU path to run
                       moe_kwargs=(("num_experts", 4), ("slots_per_expert", 2), ("moe_layer_index", 1))),
}
