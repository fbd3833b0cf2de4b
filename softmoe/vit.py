"""Soft MoE Vision Transformer: timm's ``VisionTransformer`` with Soft MoE layers in chosen blocks.

The class extends timm through its own hooks (``block_fn``/``mlp_layer``), so every timm feature
(dynamic image size, register tokens, pooling heads, gradient checkpointing, ...) keeps working.
The registered models are built the way timm builds its own ViTs (``build_model_with_cfg``), so they
also get pretrained configs, ``features_only`` and checkpoint filtering: ``pretrained=True`` upcycles
the dense timm weights their tag names (or a local ``pretrained_cfg_overlay=dict(file=...)``).
"""

from __future__ import annotations

import inspect
import math
import os
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.models import (
    build_model_with_cfg,
    generate_default_cfgs,
    get_pretrained_cfg,
    list_pretrained,
    register_model,
    resolve_pretrained_cfg,
)
from timm.layers import Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn

from ._checks import (autocast_dtype_on, is_exporting, is_int, require_choice, require_module_class,
                      require_positive_int)
from .capture import moe_layers
from .experts import WEIGHT_INIT_MODES, BatchedMlp, hold_expert_copies
from .layer import SoftMoE
from .hub import hub_offline, hub_reachable, hub_weights_cached
from .upcycle import (UnreadableCheckpointError, cfg_names, fit_dense_state, load_state_dict, other_channels,
                      upcycle_state_dict)
from .vit_checks import (require_global_pool, require_images, require_moe_kwargs, require_num_classes,
                         require_block_indices, require_vit_arguments, require_whole_patches, sizes)

MoELayerIndex = Union[int, Sequence[int]]


def block_list_problem(blocks: Sequence[Any], depth: int) -> Optional[Tuple[str, Any]]:
    """What is wrong with an explicit list of 0-indexed MoE blocks of a ``depth``-block ViT: ``("empty", None)``,
    ``("beyond", entry)`` (the first entry that is not a block index) or ``("twice", None)``; None if nothing.
    The one rule behind :func:`resolve_moe_layer_index` and the harness's ``moe.layers`` check, each of which
    words the problem in its own argument's name."""
    if not blocks:
        return ("empty", None)
    for block in blocks:
        if not is_int(block) or not 0 <= block < depth:
            return ("beyond", block)
    if len(set(blocks)) != len(blocks):
        return ("twice", None)
    return None


# moe placement -> the 0-indexed blocks of a ``depth``-block ViT that get an MoE layer. The paper's is the last half.
MOE_PLACEMENTS: Dict[str, Callable[[int], List[int]]] = {
    "none": lambda depth: [],
    "last_half": lambda depth: list(range(depth // 2, depth)),
    "every_other": lambda depth: list(range(1, depth, 2)),
    "all": lambda depth: list(range(depth)),
}


def resolve_moe_layer_index(moe_layer_index: Optional[MoELayerIndex], depth: int) -> List[int]:
    """The 0-indexed blocks that get a Soft MoE layer: None means the last half (the paper's placement),
    an int k means blocks k..depth-1, a list means exactly those."""
    if moe_layer_index is None:
        return MOE_PLACEMENTS["last_half"](depth)
    if isinstance(moe_layer_index, (bool, str, bytes)):
        raise ValueError(f"moe_layer_index must be an int or a list of ints, got {moe_layer_index!r}")
    if is_int(moe_layer_index):
        if not 0 <= moe_layer_index < depth:
            raise ValueError(f"moe_layer_index must be in [0, depth={depth}), got {moe_layer_index}")
        return list(range(int(moe_layer_index), depth))
    try:
        blocks = list(moe_layer_index)
    except TypeError:
        raise ValueError(f"moe_layer_index must be an int or a list of ints, got {moe_layer_index!r}") from None
    problem = block_list_problem(blocks, depth)
    if problem is not None:
        raise ValueError(
            {
                "empty": "moe_layer_index must name at least one block, got an empty list "
                "(use timm's VisionTransformer for a dense model)",
                "beyond": f"moe_layer_index entries must be block indices in [0, depth={depth}), got {blocks}",
                "twice": f"moe_layer_index lists a block twice: {blocks}",
            }[problem[0]]
        )
    return sorted(map(int, blocks))


def _name(value: Any) -> str:
    return getattr(value, "__name__", None) or repr(value)


def require_timm_mlp(mlp_layer: Optional[Callable]) -> None:
    """Refuse an ``mlp_layer`` other than timm's ``Mlp``: it would build the dense blocks only."""
    if mlp_layer not in (None, Mlp):
        raise ValueError(
            f"mlp_layer={_name(mlp_layer)} would build only the dense blocks' MLPs: the MoE blocks' experts are timm "
            "Mlp-shaped (BatchedMlp). Leave mlp_layer at timm's Mlp; for other experts pass moe_layer, a layer class "
            "taking timm's MLP arguments plus num_experts, slots_per_expert and normalize"
        )


def require_moe_blocks(blocks: torch.nn.Module, moe_blocks: List[int], built: List[torch.nn.Module],
                       block_fn: Callable) -> None:
    """Check that every block in ``moe_blocks`` holds one of the MoE layers ``built`` for them: a ``block_fn`` that
    ignores its ``mlp_layer`` (timm's ParallelScalingBlock fuses its own MLP) would leave a dense model."""
    built_ids = {id(layer) for layer in built}
    missing = [i for i in moe_blocks if not any(id(module) in built_ids for module in blocks[i].modules())]
    if missing:
        raise ValueError(
            f"block_fn={_name(block_fn)} does not build its MLP with the mlp_layer it is given, so blocks {missing} of "
            f"moe_layer_index={moe_blocks} hold no MoE layer: use a block that does, such as timm's Block"
        )


# timm's forward_intermediates signature, read once: the block indices and output format are checked at each call
FORWARD_INTERMEDIATES = inspect.signature(VisionTransformer.forward_intermediates)


class SoftMoEVisionTransformer(VisionTransformer):
    """timm ``VisionTransformer`` whose blocks in ``moe_layer_index`` use Soft MoE MLPs.

    Args:
        num_experts: experts per MoE layer.
        slots_per_expert: slots per expert.
        moe_layer_index: None (the last half of the blocks, as the paper), an int k (blocks k..depth-1)
            or a list of 0-indexed blocks.
        normalize: L2-normalise the router inputs (paper section 2.3).
        moe_layer: the MoE ``mlp_layer`` class; it receives timm's MLP kwargs plus ``num_experts``,
            ``slots_per_expert``, ``normalize`` and ``moe_kwargs``.
        moe_kwargs: further keyword arguments for ``moe_layer`` (e.g. ``dispatch="uniform"``). They take precedence
            over the MLP arguments timm's ``Block`` passes (``hidden_features``, ``act_layer``, ``bias``, ``drop``),
            so ``moe_kwargs=dict(hidden_features=256)`` gives the experts a width of their own.
        **kwargs: every argument of timm's ``VisionTransformer``.
    """

    def __init__(
        self,
        num_experts: int = 128,
        slots_per_expert: int = 1,
        moe_layer_index: Optional[MoELayerIndex] = None,
        normalize: bool = True,
        moe_layer: Callable[..., torch.nn.Module] = SoftMoE,
        moe_kwargs: Optional[dict] = None,
        **kwargs: Any,
    ) -> None:
        depth = kwargs.get("depth", 12)
        self.num_experts = require_positive_int("num_experts", num_experts)
        self.slots_per_expert = require_positive_int("slots_per_expert", slots_per_expert)
        moe_blocks = resolve_moe_layer_index(moe_layer_index, require_positive_int("depth", depth))
        block_fn = require_module_class("block_fn", kwargs.pop("block_fn", Block))
        require_timm_mlp(kwargs.get("mlp_layer"))
        require_vit_arguments(kwargs)
        moe_kwargs = require_moe_kwargs(moe_kwargs)
        moe_mlp = partial(
            require_module_class("moe_layer", moe_layer),
            num_experts=num_experts,
            slots_per_expert=slots_per_expert,
            normalize=normalize,
        )
        built = []  # every MoE layer moe_mlp built: each MoE block must hold one

        def build_moe(*args: Any, **mlp_kwargs: Any) -> torch.nn.Module:
            # moe_kwargs last: in a partial they would lose to the MLP arguments the block passes at the call
            built.append(moe_mlp(*args, **{**mlp_kwargs, **moe_kwargs}))
            return built[-1]

        def block_with_moe(*, depth: int, mlp_layer: Callable, **block_kwargs: Any) -> torch.nn.Module:
            # timm builds block i with depth=i: swap the MLP of the chosen blocks.
            return block_fn(depth=depth, mlp_layer=build_moe if depth in moe_blocks else mlp_layer, **block_kwargs)

        super().__init__(block_fn=block_with_moe, **kwargs)
        require_moe_blocks(self.blocks, moe_blocks, built, block_fn)
        self.moe_layer_index = moe_blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """timm's forward. Compiled under autocast, the expert banks' low-precision copies are brought up to date
        eagerly before the graph and read by it (:func:`~softmoe.experts.hold_expert_copies`): the graph then casts
        no expert weight, where it would cast all of them at every call. Costs a graph break at each end, so
        ``torch.compile(model, fullgraph=True)`` under autocast fails; ``compiled_reads_expert_copies = False``
        (on the model or the class) keeps the casts in the graph instead."""
        if not (self.compiled_reads_expert_copies and torch.compiler.is_compiling()) or \
                is_exporting() or autocast_dtype_on(x.device) is None:
            return super().forward(x)
        hold_expert_copies(self, True)
        try:
            return super().forward(x)
        finally:  # an error in the forward (a wrong input) left them held: the next float32 graph read bf16 copies
            hold_expert_copies(self, False)

    compiled_reads_expert_copies = True

    def forward_features(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """timm's, after :func:`~softmoe.vit_checks.require_images`: a wrong input is named, not met by timm's
        assert or the patch convolution."""
        require_images(x, self)
        return super().forward_features(x, *args, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """timm's, after the same check as :meth:`forward_features` (``get_intermediate_layers`` and
        ``features_only`` models come through here) and of the block indices and ``output_fmt`` timm asserts on."""
        require_images(x, self)
        given = FORWARD_INTERMEDIATES.bind(self, x, *args, **kwargs)
        given.apply_defaults()
        require_block_indices(given.arguments.get("indices"), len(self.blocks))
        require_choice("output_fmt", given.arguments.get("output_fmt", "NCHW"), ("NCHW", "NLC"))
        return super().forward_intermediates(x, *args, **kwargs)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's, with the arguments timm would meet with a bare assert (or a negative ``num_classes``, with no head
        at all) named first."""
        require_num_classes(num_classes)
        if global_pool is not None:
            require_global_pool(global_pool, self.has_class_token)
            if global_pool in ("map", "prr") and global_pool != self.global_pool:  # the pool's weights are built once
                raise ValueError(f"reset_classifier cannot add or change attention pooling: "
                                 f"global_pool={global_pool!r} on a model that pools with {self.global_pool!r}; build "
                                 "the model with it instead")
        super().reset_classifier(num_classes, global_pool)

    def set_input_size(self, img_size: Optional[Any] = None, patch_size: Optional[Any] = None) -> None:
        """timm's, with the sizes checked as the constructor checks them (was: an image size the patch size does not
        divide taken without a word, the pixels past the last whole patch never seen; ``patch_size=0`` a torch
        error)."""
        new_img = self.patch_embed.img_size if img_size is None else img_size
        new_patch = self.patch_embed.patch_size if patch_size is None else patch_size
        switches = {"dynamic_img_size": self.dynamic_img_size, "dynamic_img_pad": self.patch_embed.dynamic_img_pad}
        require_whole_patches(sizes("img_size", new_img), sizes("patch_size", new_patch),
                              {**switches, "img_size": new_img, "patch_size": new_patch})
        super().set_input_size(img_size=img_size, patch_size=patch_size)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's init, with every expert initialised as ``mode`` initialises the dense MLP it replaces."""
        require_choice("weight_init", mode or self.weight_init_mode, WEIGHT_INIT_MODES)  # before timm's bare assert
        # timm's per-module init calls init_weights() without the mode: tell the expert banks first.
        for module in self.modules():
            if isinstance(module, BatchedMlp):
                module.weight_init_mode = mode or self.weight_init_mode
        super().init_weights(mode, needs_reset)

    def fix_init_weight(self) -> None:
        """timm's depth-scaled init fix, applied to every expert's fc2 in MoE blocks."""
        with torch.no_grad():
            for layer_id, layer in enumerate(self.blocks):
                scale = math.sqrt(2.0 * (layer_id + 1))
                layer.attn.proj.weight.div_(scale)
                experts = getattr(layer.mlp, "experts", None)
                fc2_weight = experts.fc2_weight if isinstance(experts, BatchedMlp) else layer.mlp.fc2.weight
                fc2_weight.div_(scale)

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """timm's pruning; ``moe_layer_index`` then lists only the MoE blocks that remain."""
        require_block_indices(indices, len(self.blocks))
        take_indices = super().prune_intermediate_layers(indices, prune_norm=prune_norm, prune_head=prune_head)
        self.moe_layer_index = [i for i in self.moe_layer_index if i < len(self.blocks)]
        return take_indices


def checkpoint_filter_fn(
    state_dict: Dict[str, torch.Tensor], model: SoftMoEVisionTransformer, noise_std: float = 0.0
) -> Dict[str, torch.Tensor]:
    """timm's ViT checkpoint filter (layouts, patch and position embedding resampling), then sparse
    upcycling when the checkpoint is a dense ViT's: each expert starts as its block's dense MLP plus
    N(0, ``noise_std``²) noise on the weights, the routers keep their init. A Soft MoE checkpoint passes as it is.
    """
    state_dict = vit_checkpoint_filter_fn(state_dict, model)
    expert_prefixes = tuple(f"{name}.experts." for name in moe_layers(model))
    if any(key.startswith(expert_prefixes) for key in state_dict):
        _require_same_layout(state_dict, model)
        return state_dict
    # a classifier of another size left at its init, as timm's load_pretrained drops the dense one
    fitted = fit_dense_state(state_dict, model, timm_filter=False, adapt_channels=False)
    # A first convolution of other input channels passes through as it is: timm's load_pretrained adapts it after
    # this filter, as for its dense ViT.
    passed = {key: fitted.state.pop(key) for key in other_channels(fitted.state, model)}
    upcycled = upcycle_state_dict(fitted.state, model, noise_std=noise_std, keep_init=[*fitted.keep_init, *passed])
    return {**upcycled, **passed}


def _require_same_layout(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """A Soft MoE file loads whole, but for a classifier timm drops (its load is not strict then, so a file of other
    MoE blocks loaded half its experts and routers, the rest left at their init), and of the model's shapes (was
    torch's error of one line per expert tensor for a file of another expert count)."""
    heads = tuple(f"{name}." for name in cfg_names(model, "classifier"))
    target = {key: value for key, value in model.state_dict().items() if not key.startswith(heads)}
    missing = [key for key in target if key not in state_dict]
    if missing:
        raise ValueError(f"the Soft MoE checkpoint lacks {len(missing)} of the model's tensors ({missing[0]!r}, "
                         "...): it is of another layout (MoE blocks, experts, slots); build the model it was "
                         "saved from")
    adapted = other_channels(state_dict, model)  # timm's load_pretrained adapts them after this filter
    other = next((key for key in target if key not in adapted and state_dict[key].shape != target[key].shape), None)
    if other is None:
        return
    found, own = list(state_dict[other].shape), list(target[other].shape)
    if other.endswith(".phi") and len(found) == len(own) == 3:  # Φ is [dim, experts, slots per expert]
        layout = (f"saved with num_experts={found[1]}, slots_per_expert={found[2]}; the model has {own[1]}, "
                  f"{own[2]}")
    else:
        layout = f"the model's is {own}"
    raise ValueError(f"the Soft MoE checkpoint's {other!r} is {found} ({layout}): build the model it was saved "
                     "from")


def _with_the_files_classes(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` whose ``pretrained_cfg_overlay`` names a local file gets that file's class count (its classifier's
    rows) unless it gives one: timm's loader drops the classifier of a file whose configured class count (the tag's,
    1,000) differs from the model's, so a trained 10-class head was silently left at its init (chance accuracy)."""
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay)  # the file: overlay's or cfg's
    if not cfg.file or "num_classes" in overlay:
        return kwargs
    try:
        weight = load_state_dict(cfg.file, mapped=True).get(f"{cfg.classifier}.weight")  # its shape only
    except Exception:  # the build that follows says what is wrong with the file
        return kwargs
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        return kwargs
    return {**kwargs, "pretrained_cfg_overlay": {**overlay, "num_classes": weight.shape[0]}}


def _create_soft_moe_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> SoftMoEVisionTransformer:
    """Build ``variant`` as timm builds its ViTs; ``pretrained=True`` upcycles dense weights."""
    out_indices = kwargs.pop("out_indices", 3)
    noise_std = kwargs.pop("upcycle_noise_std", 0.0)
    if pretrained:
        kwargs = _with_the_files_classes(variant, kwargs)
    build = partial(
        build_model_with_cfg,
        SoftMoEVisionTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=partial(checkpoint_filter_fn, noise_std=noise_std),
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )
    if not pretrained:
        return build()
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
    if cfg.file is not None or cfg.state_dict is not None:
        if cfg.file is not None and not os.path.isfile(cfg.file):
            raise ValueError(
                f"pretrained_cfg_overlay file={cfg.file!r}: no such file; pass a dense ViT checkpoint "
                "(.safetensors, .pth or .bin state dict)"
            )
        try:
            return build()
        except Exception:
            if cfg.file is not None:
                try:  # timm's loader failed; where the file is why, this package's loader says so in a few words
                    load_state_dict(cfg.file)
                except UnreadableCheckpointError as unreadable:
                    raise ValueError(f"pretrained_cfg_overlay file={cfg.file!r}: not a readable checkpoint "
                                     f"({unreadable.reason}); pass a dense ViT checkpoint (.safetensors, .pth or .bin "
                                     "state dict)") from None
            raise
    def unavailable(why: str) -> RuntimeError:
        return RuntimeError(
            f"{variant}: pretrained=True could not fetch the dense weights it upcycles, {cfg.hf_hub_id} ({why}); "
            f"offline, pass a local dense checkpoint with pretrained_cfg_overlay=dict(file=PATH) (.safetensors, .pth "
            f"or .bin)"
        )

    # Offline, fail before the model is built (minutes for the paper's sizes) and without the Hub client's five
    # retries with backoff (80 s of "Retrying in 8s" lines); cached weights still load.
    offline = bool(cfg.hf_hub_id) and not hub_reachable()
    if offline and not hub_weights_cached(cfg.hf_hub_id):
        raise unavailable("the Hugging Face Hub cannot be reached and they are not in its cache")
    try:
        with hub_offline(offline):
            return build()
    except OSError as error:  # what the Hugging Face Hub client raises
        raise unavailable(type(error).__name__) from None


# Each model mirrors a timm ViT. Its pretrained tags are that ViT's: `soft_moe_vit_small.augreg_in21k_ft_in1k`
# upcycles timm's vit_small_patch16_224.augreg_in21k_ft_in1k and shares its data config.
DENSE_ARCHITECTURES = {
    "soft_moe_vit_tiny": "vit_tiny_patch16_224",
    "soft_moe_vit_small": "vit_small_patch16_224",
    "soft_moe_vit_base": "vit_base_patch16_224",
    "soft_moe_vit_large": "vit_large_patch16_224",
    "soft_moe_vit_huge": "vit_huge_patch14_224",
    "test_soft_moe_vit": "test_vit",
    "test_soft_moe_vit2": "test_vit2",
}


def _upcycled_cfgs(name: str, dense: str) -> Dict[str, Dict[str, Any]]:
    """``name.tag`` -> pretrained config, for every Hub-hosted tag of timm's ``dense``, its default first."""
    default_tag = get_pretrained_cfg(dense).tag
    tags = sorted(
        (model_tag.split(".", 1)[1] for model_tag in list_pretrained(f"{dense}.*")),
        key=lambda tag: tag != default_tag,
    )
    cfgs = {}
    for tag in tags:
        cfg = get_pretrained_cfg(f"{dense}.{tag}").to_dict()
        if not cfg.get("hf_hub_id"):
            continue
        for key in ("architecture", "tag"):
            cfg.pop(key, None)
        # Loaded as a state dict and upcycled: never through timm's .npz loader for dense ViTs.
        cfg.update(url="", custom_load=False, description=f"upcycled from timm's {dense}.{tag}")
        cfgs[f"{name}.{tag}"] = cfg
    return cfgs


default_cfgs = generate_default_cfgs(
    {key: cfg for name, dense in DENSE_ARCHITECTURES.items() for key, cfg in _upcycled_cfgs(name, dense).items()}
)


@register_model
def soft_moe_vit_tiny(pretrained: bool = False, **kwargs) -> SoftMoEVisionTransformer:
    """Soft MoE ViT-Ti/16: 12 blocks of width 192, 128 experts in blocks 6-11."""
    model_args = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3)
    return _create_soft_moe_vit("soft_moe_vit_tiny", pretrained, **dict(model_args, **kwargs))


@register_model
def soft_moe_vit_small(pretrained: bool = False, **kwargs) -> SoftMoEVisionTransformer:
    """Soft MoE ViT-S/16: 12 blocks of width 384, 128 experts in blocks 6-11: the paper's S/16 sizes, with timm's
    class token and its pooling, as every factory here; the paper's model pools by average over the tokens, without
    a class token, and normalises queries and keys: ``class_token=False, global_pool="avg", qk_norm=True``."""
    model_args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_soft_moe_vit("soft_moe_vit_small", pretrained, **dict(model_args, **kwargs))


@register_model
def soft_moe_vit_base(pretrained: bool = False, **kwargs) -> SoftMoEVisionTransformer:
    """Soft MoE ViT-B/16: 12 blocks of width 768, 128 experts in blocks 6-11."""
    model_args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_soft_moe_vit("soft_moe_vit_base", pretrained, **dict(model_args, **kwargs))


@register_model
def soft_moe_vit_large(pretrained: bool = False, **kwargs) -> SoftMoEVisionTransformer:
    """Soft MoE ViT-L/16: 24 blocks of width 1024, 128 experts in blocks 12-23."""
    model_args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _create_soft_moe_vit("soft_moe_vit_large", pretrained, **dict(model_args, **kwargs))


@register_model
def soft_moe_vit_huge(pretrained: bool = False, **kwargs) -> SoftMoEVisionTransformer:
    """Soft MoE ViT-H/14: 32 blocks of width 1280, 128 experts in blocks 16-31."""
    model_args = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)
    return _create_soft_moe_vit("soft_moe_vit_huge", pretrained, **dict(model_args, **kwargs))


@register_model
def test_soft_moe_vit(pretrained: bool = False, **kwargs) -> SoftMoEVisionTransformer:
    """timm's ``test_vit`` (6 blocks of width 64, 160 px) with 8 experts in blocks 3-5: a test-sized model."""
    model_args = dict(
        patch_size=16, embed_dim=64, depth=6, num_heads=2, mlp_ratio=3, dynamic_img_size=True, num_experts=8
    )
    return _create_soft_moe_vit("test_soft_moe_vit", pretrained, **dict(model_args, **kwargs))


@register_model
def test_soft_moe_vit2(pretrained: bool = False, **kwargs) -> SoftMoEVisionTransformer:
    """timm's ``test_vit2`` (GAP, a register token, no class token, layer scale) with 8 experts in blocks 4-7."""
    model_args = dict(
        patch_size=16, embed_dim=64, depth=8, num_heads=2, mlp_ratio=3,
        class_token=False, reg_tokens=1, global_pool="avg", init_values=1e-5, dynamic_img_size=True, num_experts=8,
    )
    return _create_soft_moe_vit("test_soft_moe_vit2", pretrained, **dict(model_args, **kwargs))
