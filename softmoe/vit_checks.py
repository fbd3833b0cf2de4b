"""What :class:`~softmoe.vit.SoftMoEVisionTransformer` checks before timm sees it: the timm arguments and the images
that timm meets with a bare ``assert``, a ``ZeroDivisionError`` or a convolution's shape error, named instead in one
line with the argument, its value and what is allowed."""

from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional

import torch
from timm.layers import PatchEmbed, get_act_layer, get_norm_layer
from timm.models.vision_transformer import VisionTransformer

from ._checks import (is_int, is_number, is_symbolically_traced, require_bool, require_choice, require_parameter_device,
                      require_parameter_dtype, require_positive_int, require_positive_number, require_probability)

_TIMM_DEFAULTS = {name: parameter.default
                  for name, parameter in inspect.signature(VisionTransformer.__init__).parameters.items()}


def sizes(name: str, value: Any) -> tuple:
    """``value`` as timm reads a size (an int, or a pair for height and width), each a positive int."""
    sizes = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(sizes) not in (1, 2) or not all(is_int(size) and size > 0 for size in sizes):
        raise ValueError(f"{name} must be a positive integer or a (height, width) pair of them, got {value!r}")
    return sizes


# timm's VisionTransformer asserts global_pool is one of these ('' returns every token's logits)
GLOBAL_POOLS = ("", "avg", "avgmax", "max", "token", "map", "prr")
# Dropout rates, each handed to nn.Dropout or DropPath: torch's error for 1.5 does not say which argument it was,
# and DropPath takes a negative drop_path_rate as 0 without a word.
DROP_RATES = ("drop_rate", "pos_drop_rate", "proj_drop_rate", "attn_drop_rate", "drop_path_rate")


def require_vit_arguments(kwargs: Mapping[str, Any]) -> None:
    """Check the timm ``VisionTransformer`` arguments in ``kwargs`` (timm's defaults for the rest) that timm would
    meet with a bare assert (``num_heads`` not dividing ``embed_dim``, an unknown ``global_pool``, token pooling
    without a class token), a division by zero (a zero size), an error that does not name them (a negative width
    from ``mlp_ratio``, a dropout rate above 1) or not at all (a negative ``num_classes`` or drop path rate)."""
    argument = {**_TIMM_DEFAULTS, **kwargs}
    embed_dim = require_positive_int("embed_dim", argument["embed_dim"])
    num_heads = require_positive_int("num_heads", argument["num_heads"])
    if embed_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim} (each head takes an equal share)")
    require_mlp_ratio(argument["mlp_ratio"], embed_dim)
    require_positive_int("in_chans", argument["in_chans"])
    require_num_classes(argument["num_classes"])
    patch_size = sizes("patch_size", argument["patch_size"])
    if argument["img_size"] is not None:
        require_whole_patches(sizes("img_size", argument["img_size"]), patch_size, argument)
    for name in BOOLEAN_ARGUMENTS:  # bool("no") is True: a string would turn the option on without a word
        if name in argument and not (name == "fc_norm" and argument[name] is None):  # fc_norm None: timm decides
            require_bool(name, argument[name])
    require_layer_names(argument)
    if not is_int(argument["reg_tokens"]) or argument["reg_tokens"] < 0:
        raise ValueError(f"reg_tokens must be a whole number >= 0 (register tokens), got {argument['reg_tokens']!r}")
    require_global_pool(argument["global_pool"], argument["class_token"])
    require_choice("pos_embed", argument["pos_embed"], ("learn", "none", ""))
    for name in DROP_RATES:
        require_probability(name, argument[name])
    patch_drop_rate = require_probability("patch_drop_rate", argument["patch_drop_rate"])
    if patch_drop_rate == 1:  # timm's PatchDropout asserts 0 <= rate < 1: it would drop every patch
        raise ValueError("patch_drop_rate must be a number in [0, 1), got 1: a rate of 1 would drop every patch")


def require_whole_patches(img_size: tuple, patch_size: tuple, argument: Mapping[str, Any]) -> None:
    """Check that ``patch_size`` divides ``img_size`` on each side, unless every image is padded to whole patches
    (``dynamic_img_size`` and ``dynamic_img_pad``): timm's patch embedding takes ``img_size // patch_size`` patches a
    side, so the pixels past the last whole patch were never seen, without a word (and a patch larger than the
    image left no patch at all, a convolution's error at the first forward)."""
    if argument["dynamic_img_size"] and argument["dynamic_img_pad"]:
        return
    image, patch = img_size * (3 - len(img_size)), patch_size * (3 - len(patch_size))  # (height, width)
    if not (image[0] % patch[0] or image[1] % patch[1]):
        return
    if argument["dynamic_img_pad"]:  # timm pads each image, and its position embedding keeps img_size's patches
        raise ValueError(f"patch_size={argument['patch_size']!r} does not divide img_size={argument['img_size']!r}: "
                         "dynamic_img_pad=True pads each image to whole patches, more than the position embedding "
                         "holds; set dynamic_img_size=True too (it resamples the embedding to them)")
    seen = [size // step * step for size, step in zip(image, patch)]
    shown = "no pixel" if 0 in seen else f"only the top-left {seen[0]}x{seen[1]} pixels"
    raise ValueError(f"patch_size={argument['patch_size']!r} must divide img_size={argument['img_size']!r}: the model "
                     f"would see {shown} of each {image[0]}x{image[1]} image; give an img_size the patch size "
                     "divides, or set dynamic_img_size=True and dynamic_img_pad=True to pad each image to whole "
                     "patches")


# timm's switches, each True or False (those of the timm version installed are checked)
BOOLEAN_ARGUMENTS = ("qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "class_token",
                     "no_embed_class", "pre_norm", "final_norm", "fc_norm", "pool_include_prefix", "dynamic_img_size",
                     "dynamic_img_pad", "fix_init")


# The model's own arguments, which it hands to every MoE layer: moe_kwargs naming one again would be ambiguous.
MODEL_MOE_ARGUMENTS = ("num_experts", "slots_per_expert", "normalize")
# The widths each block passes its MLP (the tokens' width in and out)
BLOCK_WIDTHS = ("in_features", "out_features")


def require_moe_kwargs(moe_kwargs: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """``moe_kwargs`` as a dict, checked: a mapping that does not repeat one of :data:`MODEL_MOE_ARGUMENTS`."""
    if moe_kwargs is None:
        return {}
    if not isinstance(moe_kwargs, Mapping):
        raise ValueError(f"moe_kwargs must be a dict of keyword arguments for moe_layer, got {moe_kwargs!r}")
    repeated = [name for name in MODEL_MOE_ARGUMENTS if name in moe_kwargs]
    if repeated:
        raise ValueError(f"moe_kwargs repeats {repeated[0]}={moe_kwargs[repeated[0]]!r}, an argument of the model "
                         f"itself: pass {repeated[0]}= to the model, not in moe_kwargs")
    widths = [name for name in BLOCK_WIDTHS if name in moe_kwargs]
    if widths:  # was: accepted, then a shape error in the block's residual add at the first forward
        raise ValueError(f"moe_kwargs sets {widths[0]}={moe_kwargs[widths[0]]!r}: a MoE layer takes and returns the "
                         "block's tokens, embed_dim wide, which the block passes it; leave it out of moe_kwargs")
    return dict(moe_kwargs)


def require_mlp_ratio(mlp_ratio: Any, embed_dim: int) -> None:
    """Check that ``mlp_ratio`` gives every MLP (and expert) a hidden width of at least one, ``int(embed_dim *
    mlp_ratio)`` as timm's ``Block`` computes it."""
    require_positive_number("mlp_ratio", mlp_ratio)
    if int(embed_dim * mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio={mlp_ratio!r} gives the MLPs a hidden width of int(embed_dim={embed_dim} * "
                         f"mlp_ratio) = 0: it must be at least 1 / embed_dim")


def require_num_classes(num_classes: Any) -> None:
    """Check ``num_classes``: a count of classes, or 0 for no classifier (timm builds none for any number below 1,
    so a negative one would silently leave the model without its head)."""
    if not is_int(num_classes) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer (0: no classifier, the pooled features are the "
                         f"output), got {num_classes!r}")


def require_global_pool(global_pool: Any, class_token: bool) -> None:
    """Check ``global_pool`` against timm's pooling types, and that token pooling has a class token to read."""
    require_choice("global_pool", global_pool, GLOBAL_POOLS)
    if global_pool == "token" and not class_token:
        raise ValueError("global_pool='token' reads the class token, and class_token=False builds none: set "
                         "class_token=True, or pool the tokens another way (global_pool='avg', 'avgmax', 'max', 'map')")


def require_images(x: Any, model: VisionTransformer) -> None:
    """Check that ``x`` is a [batch, in_chans, height, width] floating-point tensor the model's patch embedding takes:
    its channels, its size (the model's ``img_size``, or under ``dynamic_img_size`` a multiple of the patch size),
    and the parameters' dtype unless autocast casts both. Eager calls and ``torch.compile``, not fx or export; a
    patch embedding of the user's own (``embed_layer``) takes what it takes."""
    embed = model.patch_embed
    if is_symbolically_traced() or type(embed) is not PatchEmbed:
        return
    channels = embed.proj.in_channels
    expected = f"[batch, {channels}, height, width] (in_chans={channels})"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor of images {expected}, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"x must be images of shape {expected}, got a tensor of shape {list(x.shape)}")
    require_parameter_device("x", x, embed.proj.weight, "model")
    require_parameter_dtype("x", x, embed.proj.weight, "model")
    size, patch = tuple(x.shape[2:]), tuple(embed.patch_size)
    if embed.img_size is not None and embed.strict_img_size and size != tuple(embed.img_size):
        height, width = embed.img_size
        raise ValueError(f"x must be {height}x{width} images (img_size), got {size[0]}x{size[1]}: resize them, or "
                         "build the model with dynamic_img_size=True to take other sizes")
    if not embed.strict_img_size and not embed.dynamic_img_pad and (size[0] % patch[0] or size[1] % patch[1]):
        raise ValueError(f"x is {size[0]}x{size[1]} images, which patch_size={patch[0]}x{patch[1]} does not divide: "
                         "crop or resize them, or build the model with dynamic_img_pad=True")


def require_block_indices(indices: Any, depth: int) -> None:
    """Check ``indices`` as timm's ``feature_take_indices`` reads them (an int n: the last n blocks; a list: block
    indices, negative from the end; None: all) against the model's ``depth``, where timm meets a bad one with a bare
    assert (``get_intermediate_layers``' ``n`` and ``features_only``'s ``out_indices`` come through here too)."""
    if indices is None:
        return
    if is_int(indices):
        if not 0 < indices <= depth:
            raise ValueError(f"indices={indices} (get_intermediate_layers' n, features_only's out_indices): the last "
                             f"n of the model's {depth} blocks, n from 1 to {depth}")
        return
    if not isinstance(indices, (list, tuple)) or not all(is_int(i) and -depth <= i < depth for i in indices):
        raise ValueError(f"indices={indices!r}: an int n (the last n blocks) or a list of block indices from "
                         f"{-depth} to {depth - 1} (the model has {depth} blocks)")


def require_layer_names(argument: Mapping[str, Any]) -> None:
    """``act_layer`` and ``norm_layer`` as timm resolves them (a class, or a name in its tables), ``embed_layer`` a
    class, ``init_values`` a number or None: timm met a misspelt name with its table's KeyError,
    a string class with "'str' object is not callable", a string init value with a ``fill_`` error."""
    for name, resolve in (("act_layer", get_act_layer), ("norm_layer", get_norm_layer)):
        value = argument[name]
        if isinstance(value, str) and value:
            try:
                resolve(value)
            except KeyError:
                raise ValueError(f"{name}={value!r}: no layer of timm's by that name (e.g. "
                                 f"{'gelu, relu, silu' if name == 'act_layer' else 'layernorm, rmsnorm'}), or pass "
                                 "the class") from None
    if not callable(argument["embed_layer"]):
        raise ValueError(f"embed_layer must be an nn.Module class (or a callable building one), got "
                         f"{argument['embed_layer']!r}")
    if argument["init_values"] is not None and not is_number(argument["init_values"]):
        raise ValueError(f"init_values must be a number (LayerScale's initial gain) or None, got "
                         f"{argument['init_values']!r}")

