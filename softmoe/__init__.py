"""softmoe: Soft Mixture of Experts (Puigcerver et al., arXiv 2308.00951) on timm's VisionTransformer.

The library imports nothing from the experiment harness (Hydra, W&B): ``from softmoe import SoftMoE``
is all a user of the layer needs.
"""

from . import _startup  # first: `python -m softmoe.<command>` answers a Ctrl-C in the imports below in one line
from .capture import RoutingRecord, block_index, capture_routing, moe_layers, router_parameters
from .cpu_packing import pack_experts_for_cpu
from .experts import BatchedMlp
from .layer import SoftMoE, SoftMoELayerWrapper, l2_normalize
from .runtime import cpu_has_native_bf16, tune_allocator
from .sparse import ExpertsChoiceMoE, SparseMoE, TokensChoiceMoE, auxiliary_loss, sparse_routing_stats
from .stacked_experts import StackedExperts
from .stats import cumulative_dispatch_mass, router_scale, routing_stats, slot_similarity
from .upcycle import load_state_dict, upcycle
from .vit import (
    SoftMoEVisionTransformer,
    resolve_moe_layer_index,
    soft_moe_vit_base,
    soft_moe_vit_huge,
    soft_moe_vit_large,
    soft_moe_vit_small,
    soft_moe_vit_tiny,
)

__version__ = "0.1.0"
_startup.restore()

__all__ = [
    "BatchedMlp",
    "ExpertsChoiceMoE",
    "SparseMoE",
    "TokensChoiceMoE",
    "auxiliary_loss",
    "sparse_routing_stats",
    "RoutingRecord",
    "SoftMoE",
    "SoftMoELayerWrapper",
    "SoftMoEVisionTransformer",
    "StackedExperts",
    "block_index",
    "capture_routing",
    "cpu_has_native_bf16",
    "cumulative_dispatch_mass",
    "l2_normalize",
    "load_state_dict",
    "moe_layers",
    "pack_experts_for_cpu",
    "resolve_moe_layer_index",
    "router_parameters",
    "router_scale",
    "routing_stats",
    "slot_similarity",
    "soft_moe_vit_base",
    "soft_moe_vit_huge",
    "soft_moe_vit_large",
    "soft_moe_vit_small",
    "soft_moe_vit_tiny",
    "tune_allocator",
    "upcycle",
]
