"""The one path from the ``model`` and ``moe`` config groups to a network.

``model`` holds timm ``VisionTransformer`` arguments (plus its ``name`` and where its weights start:
``upcycle_from``, ``upcycle_noise_std``); ``moe`` says which blocks get an MoE layer and how it routes:
``moe.router`` picks the layer class (the paper's Soft MoE or a sparse baseline of ``softmoe.sparse``).
``moe=dense`` (placement ``none``) builds timm's plain ViT. Both are built as a timm user builds them, through
``timm.create_model`` and this package's registered factories (:mod:`softmoe.vit`).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Mapping

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from softmoe import SoftMoE, upcycle
from softmoe.sparse import ExpertsChoiceMoE, TokensChoiceMoE
from softmoe.vit import MOE_PLACEMENTS, block_list_problem

from .rules import plain

PLACEMENTS = tuple(MOE_PLACEMENTS)
ROUTERS = {"soft": SoftMoE, "tokens_choice": TokensChoiceMoE, "experts_choice": ExpertsChoiceMoE}  # moe.router -> class
# The moe keys each router takes besides num_experts, slots_per_expert and normalize; a saved config that predates
# a key gets the layer class's default (layer_defaults).
ROUTER_KEYS = {
    "soft": ("scale_init", "dispatch", "combine"),
    "tokens_choice": ("scale_init", "k", "capacity_factor", "batch_priority", "noise_std"),
    "experts_choice": ("scale_init", "capacity_factor", "noise_std"),
}
# The registered timm names the harness builds through. Every architecture key comes from the config (the model
# group sets them all), so the name only picks the class and timm's creation path (pretrained_cfg, features).
SOFT_MOE_ARCHITECTURE, DENSE_ARCHITECTURE = "soft_moe_vit_tiny", "vit_tiny_patch16_224"
# model keys that are not VisionTransformer arguments
MODEL_KEYS = ("name", "upcycle_from", "upcycle_noise_std")
# VisionTransformer arguments that take classes (or a device, a dtype): set in code, not by a config
CODE_ONLY_VIT_ARGUMENTS = {
    "embed_layer", "embed_norm_layer", "norm_layer", "act_layer", "block_fn", "mlp_layer", "attn_layer", "device",
    "dtype",
}
# VisionTransformer arguments a config may set
VIT_ARGUMENTS = set(inspect.signature(VisionTransformer.__init__).parameters) - {"self"} - CODE_ONLY_VIT_ARGUMENTS


def moe_blocks(moe_cfg: Mapping[str, Any], depth: int) -> list[int]:
    """The 0-indexed blocks that get an MoE layer: ``moe.layers`` when given, else ``moe.placement``'s."""
    layers = moe_cfg["layers"]
    if layers is not None:
        shown = "[" + ",".join(map(str, layers)) + "]"
        problem = block_list_problem(list(layers), depth)  # the library's rule, in the config's words
        if problem is not None:
            kind, entry = problem
            raise ValueError(
                {
                    "empty": f"moe.layers={shown}: must name at least one block; use moe=dense for a dense ViT",
                    "beyond": f"moe.layers={shown}: {entry} is not a block of this model (model.depth={depth}): "
                    f"blocks are 0..{depth - 1}",
                    "twice": f"moe.layers={shown}: names a block twice",
                }[kind]
            )
        return sorted(layers)
    placement = moe_cfg["placement"]
    if placement not in PLACEMENTS:
        raise ValueError(f"moe.placement={placement}: must be one of {', '.join(PLACEMENTS)}")
    blocks = MOE_PLACEMENTS[placement](depth)
    if not blocks and placement != "none":  # every_other in a 1-block model: a dense ViT nobody asked for
        raise ValueError(f"moe.placement={placement}: puts no MoE block in a model of model.depth={depth}; name "
                         "the blocks with moe.layers (e.g. moe.layers=[0]), or use moe=dense for a dense ViT")
    return blocks


def vit_kwargs(model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The ``VisionTransformer`` arguments of a ``model`` config: every key but ``MODEL_KEYS``."""
    return {key: value for key, value in model_cfg.items() if key not in MODEL_KEYS}


def num_tokens(model_cfg: Mapping[str, Any]) -> int:
    """Tokens each block (and so each MoE layer) sees per image: patches plus class and register tokens."""
    patches = (model_cfg["img_size"] // model_cfg["patch_size"]) ** 2
    return patches + int(model_cfg.get("class_token", True)) + int(model_cfg.get("reg_tokens", 0) or 0)


def build_model(model_cfg: Mapping[str, Any], moe_cfg: Mapping[str, Any], *, upcycle_weights: bool = True) -> nn.Module:
    """A timm ViT, with MoE MLPs in the blocks ``moe`` names (plain configs or DictConfigs, resolved).

    With ``model.upcycle_from`` set, its weights start from that dense checkpoint (``softmoe.upcycle``);
    ``upcycle_weights=False`` leaves them freshly initialised, for a model about to load a run's checkpoint.
    """
    model_cfg, moe_cfg = plain(model_cfg), plain(moe_cfg)
    model = _build_network(model_cfg, moe_cfg)
    source = model_cfg.get("upcycle_from")  # configs saved before the key existed lack it
    # upcycled here, not by create_model(pretrained=True): the source may be a moe=dense run's last.pt, whose every
    # shape check_config has matched to this model
    if upcycle_weights and source is not None:
        upcycle(os.path.expanduser(source), model, noise_std=model_cfg.get("upcycle_noise_std", 0.0))
    return model


def _build_network(model_cfg: dict[str, Any], moe_cfg: dict[str, Any]) -> nn.Module:
    # create_model drops keyword arguments that are None; every ViT argument a config may null defaults to None.
    kwargs = vit_kwargs(model_cfg)
    blocks = moe_blocks(moe_cfg, kwargs["depth"])
    if not blocks:
        return timm.create_model(DENSE_ARCHITECTURE, **kwargs)
    return timm.create_model(
        SOFT_MOE_ARCHITECTURE,
        num_experts=moe_cfg["num_experts"],
        slots_per_expert=moe_cfg["slots_per_expert"],
        moe_layer_index=blocks,
        normalize=moe_cfg["normalize"],
        moe_layer=ROUTERS[moe_cfg["router"]],
        moe_kwargs=router_kwargs(moe_cfg),
        **kwargs,
    )


def layer_defaults(layer_class: type) -> dict[str, Any]:
    """The default of every keyword argument of ``layer_class``, its base classes' included (a subclass may pass
    ``**kwargs`` on)."""
    defaults = {}
    for cls in reversed(layer_class.__mro__):
        if issubclass(cls, nn.Module) and cls is not nn.Module and "__init__" in vars(cls):
            parameters = inspect.signature(cls.__init__).parameters.values()
            defaults.update({p.name: p.default for p in parameters if p.default is not inspect.Parameter.empty})
    return defaults


def router_kwargs(moe_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments ``moe.router``'s layer class takes from the ``moe`` config."""
    router = moe_cfg["router"]
    defaults = layer_defaults(ROUTERS[router])
    return {key: moe_cfg.get(key, defaults[key]) for key in ROUTER_KEYS[router]}
