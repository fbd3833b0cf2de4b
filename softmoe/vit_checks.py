"""What :class:`~softmoe.vit.SoftMoEVisionTransformer` checks before timm sees it: the timm arguments and the images
that timm meets with a bare ``assert``, a ``ZeroDivisionError`` or a convolution's shape error, named instead in one
line with the argument, its value and what is allowed."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer

from ._checks import _is_fx_symbolic_tracing, is_exporting, is_int, require_parameter_dtype, require_positive_int

_TIMM_DEFAULTS = {name: parameter.default
                  for name, parameter in inspect.signature(VisionTransformer.__init__).parameters.items()}


def _sizes(name: str, value: Any) -> tuple:
    """``value`` as timm reads a size (an int, or a pair for height and width), each a positive int."""
    sizes = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(sizes) not in (1, 2) or not all(is_int(size) and size > 0 for size in sizes):
        raise ValueError(f"{name} must be a positive integer or a (height, width) pair of them, got {value!r}")
    return sizes


def require_vit_arguments(kwargs: Mapping[str, Any]) -> None:
    """Check the timm ``VisionTransformer`` arguments in ``kwargs`` (timm's defaults for the rest) that timm would
    meet with a bare assert (``num_heads`` not dividing ``embed_dim``, token pooling without a class token) or a
    division by zero (a zero size)."""
    argument = {**_TIMM_DEFAULTS, **kwargs}
    embed_dim = require_positive_int("embed_dim", argument["embed_dim"])
    num_heads = require_positive_int("num_heads", argument["num_heads"])
    if embed_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim} (each head takes an equal share)")
    require_positive_int("in_chans", argument["in_chans"])
    _sizes("patch_size", argument["patch_size"])
    if argument["img_size"] is not None:
        _sizes("img_size", argument["img_size"])
    if argument["global_pool"] == "token" and not argument["class_token"]:
        raise ValueError("global_pool='token' reads the class token, and class_token=False builds none: set "
                         "class_token=True, or pool the tokens another way (global_pool='avg', 'avgmax', 'max', 'map')")


def require_images(x: Any, model: VisionTransformer) -> None:
    """Check that ``x`` is a [batch, in_chans, height, width] floating-point tensor the model's patch embedding takes:
    its channels, its size (the model's ``img_size``, or under ``dynamic_img_size`` a multiple of the patch size),
    and the parameters' dtype unless autocast casts both. Eager calls and ``torch.compile``, not fx or export; a
    patch embedding of the user's own (``embed_layer``) takes what it takes."""
    embed = model.patch_embed
    if is_exporting() or _is_fx_symbolic_tracing() or type(embed) is not PatchEmbed:
        return
    channels = embed.proj.in_channels
    expected = f"[batch, {channels}, height, width] (in_chans={channels})"
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a tensor of images {expected}, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(f"x must be images of shape {expected}, got a tensor of shape {list(x.shape)}")
    require_parameter_dtype("x", x, embed.proj.weight, "model")
    size, patch = tuple(x.shape[2:]), tuple(embed.patch_size)
    if embed.img_size is not None and embed.strict_img_size and size != tuple(embed.img_size):
        height, width = embed.img_size
        raise ValueError(f"x must be {height}x{width} images (img_size), got {size[0]}x{size[1]}: resize them, or "
                         "build the model with dynamic_img_size=True to take other sizes")
    if not embed.strict_img_size and not embed.dynamic_img_pad and (size[0] % patch[0] or size[1] % patch[1]):
        raise ValueError(f"x is {size[0]}x{size[1]} images, which patch_size={patch[0]}x{patch[1]} does not divide: "
                         "crop or resize them, or build the model with dynamic_img_pad=True")
