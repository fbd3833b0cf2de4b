"""Soft MoE Vision Transformer: timm's ``VisionTransformer`` with Soft MoE layers in chosen blocks.

The class extends timm through its own hooks (``block_fn``/``mlp_layer``), so every timm feature
(dynamic image size, register tokens, pooling heads, gradient checkpointing, ...) keeps working.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, List, Optional, Sequence, Union

import torch
from timm.layers import Mlp
from timm.models import register_model
from timm.models.vision_transformer import Block, VisionTransformer

from ._checks import require_positive_int
from .experts import BatchedMlp
from .layer import SoftMoE

MoELayerIndex = Union[int, Sequence[int]]


def resolve_moe_layer_index(moe_layer_index: MoELayerIndex, depth: int) -> List[int]:
    """The 0-indexed blocks that get a Soft MoE layer: an int k means blocks k..depth-1, a list means exactly those."""
    if isinstance(moe_layer_index, (bool, str, bytes)):
        raise ValueError(f"moe_layer_index must be an int or a list of ints, got {moe_layer_index!r}")
    if isinstance(moe_layer_index, int):
        if not 0 <= moe_layer_index < depth:
            raise ValueError(f"moe_layer_index must be in [0, depth={depth}), got {moe_layer_index}")
        return list(range(moe_layer_index, depth))
    try:
        blocks = list(moe_layer_index)
    except TypeError:
        raise ValueError(f"moe_layer_index must be an int or a list of ints, got {moe_layer_index!r}") from None
    if not blocks:
        raise ValueError("moe_layer_index must name at least one block, got an empty list (use timm's VisionTransformer for a dense model)")
    bad = [b for b in blocks if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < depth]
    if bad:
        raise ValueError(f"moe_layer_index entries must be block indices in [0, depth={depth}), got {list(moe_layer_index)}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"moe_layer_index lists a block twice: {list(moe_layer_index)}")
    return sorted(blocks)


class SoftMoEVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks in ``moe_layer_index`` use Soft MoE MLPs.

    Args:
        num_experts: experts per MoE layer.
        slots_per_expert: slots per expert.
        moe_layer_index: int k (blocks k..depth-1 are MoE) or a list of 0-indexed blocks.
        normalize: L2-normalise the router inputs (paper section 2.3).
        moe_layer: the MoE ``mlp_layer`` class; it receives timm's MLP kwargs plus ``num_experts``,
            ``slots_per_expert``, ``normalize`` and ``moe_kwargs``.
        moe_kwargs: further keyword arguments for ``moe_layer`` (e.g. ``dispatch="uniform"``).
        **kwargs: every argument of timm's ``VisionTransformer``.
    """

    def __init__(
        self,
        num_experts: int = 128,
        slots_per_expert: int = 1,
        moe_layer_index: MoELayerIndex = 6,
        normalize: bool = True,
        moe_layer: Callable[..., torch.nn.Module] = SoftMoE,
        moe_kwargs: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        depth = kwargs.get("depth", 12)
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.slots_per_expert = require_positive_int("slots_per_expert", slots_per_expert)
        moe_blocks = resolve_moe_layer_index(moe_layer_index, require_positive_int("depth", depth))
        block_fn = kwargs.pop("block_fn", Block)
        moe_mlp = partial(
            moe_layer,
            num_experts=num_experts,
            slots_per_expert=slots_per_expert,
            normalize=normalize,
            **(moe_kwargs or {}),
        )

        def block_with_moe(*, depth: int, mlp_layer: Callable, **block_kwargs: Any) -> torch.nn.Module:
            # timm builds block i with depth=i: swap the MLP of the chosen blocks.
            return block_fn(depth=depth, mlp_layer=moe_mlp if depth in moe_blocks else mlp_layer, **block_kwargs)

        super().__init__(block_fn=block_with_moe, **kwargs)
        self.moe_layer_index = moe_blocks

    def fix_init_weight(self) -> None:
        """timm's depth-scaled init fix, applied to every expert's fc2 in MoE blocks."""
        with torch.no_grad():
            for layer_id, layer in enumerate(self.blocks):
                scale = math.sqrt(2.0 * (layer_id + 1))
                layer.attn.proj.weight.div_(scale)
                experts = getattr(layer.mlp, "experts", None)
                fc2_weight = experts.fc2_weight if isinstance(experts, BatchedMlp) else layer.mlp.fc2.weight
                fc2_weight.div_(scale)


def _factory(
    defaults: dict,
    pretrained: bool,
    num_experts: int,
    slots_per_expert: int,
    moe_layer_index: MoELayerIndex,
    kwargs: dict,
) -> SoftMoEVisionTransformer:
    if pretrained:
        raise ValueError(
            "pretrained=True: no pretrained Soft MoE weights exist; build the model and start it from a "
            "dense ViT's weights with softmoe.upcycle(dense_state_dict, model)"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model passes these to every entrypoint
    return SoftMoEVisionTransformer(
        num_experts=num_experts,
        slots_per_expert=slots_per_expert,
        moe_layer_index=moe_layer_index,
        **{**defaults, **kwargs},
    )


@register_model
def soft_moe_vit_tiny(pretrained=False, num_experts=128, slots_per_expert=1, moe_layer_index=6, **kwargs):
    """Soft MoE ViT-Ti/16: 12 blocks of width 192, MoE in blocks 6-11."""
    defaults = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _factory(defaults, pretrained, num_experts, slots_per_expert, moe_layer_index, kwargs)


@register_model
def soft_moe_vit_small(pretrained=False, num_experts=128, slots_per_expert=1, moe_layer_index=6, **kwargs):
    """Soft MoE ViT-S/16: 12 blocks of width 384, MoE in blocks 6-11 (the paper's S/16)."""
    defaults = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _factory(defaults, pretrained, num_experts, slots_per_expert, moe_layer_index, kwargs)


@register_model
def soft_moe_vit_base(pretrained=False, num_experts=128, slots_per_expert=1, moe_layer_index=6, **kwargs):
    """Soft MoE ViT-B/16: 12 blocks of width 768, MoE in blocks 6-11."""
    defaults = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _factory(defaults, pretrained, num_experts, slots_per_expert, moe_layer_index, kwargs)


@register_model
def soft_moe_vit_large(pretrained=False, num_experts=128, slots_per_expert=1, moe_layer_index=12, **kwargs):
    """Soft MoE ViT-L/16: 24 blocks of width 1024, MoE in blocks 12-23."""
    defaults = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _factory(defaults, pretrained, num_experts, slots_per_expert, moe_layer_index, kwargs)


@register_model
def soft_moe_vit_huge(pretrained=False, num_experts=128, slots_per_expert=1, moe_layer_index=16, **kwargs):
    """Soft MoE ViT-H/14: 32 blocks of width 1280, MoE in blocks 16-31."""
    defaults = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
    return _factory(defaults, pretrained, num_experts, slots_per_expert, moe_layer_index, kwargs)
