"""Sparse upcycling: start a Soft MoE ViT from a dense timm ViT's weights.

Every expert of an MoE block starts as that block's dense MLP (optionally plus Gaussian noise, so
the experts can diverge); everything else is copied; the router (Φ and scale, or a sparse
router's weights) keeps its fresh init.

One rule, ``fit_dense_state`` then ``upcycle_state_dict``, behind every way in: ``upcycle(dense, model)``
for a model you built, ``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=PATH))``
(through ``softmoe.vit.checkpoint_filter_fn``) and the harness's ``model.upcycle_from=PATH``. A dense ViT of
another image size, patch size, class count or input channels is fitted to the model as timm fits a
pretrained ViT; its width, depth, tokens and pooling must be the model's.
"""

from __future__ import annotations

import errno
import logging
import os
import warnings
import zipfile
from typing import Any, Collection, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from timm.models import adapt_input_conv
from timm.models.vision_transformer import checkpoint_filter_fn as vit_checkpoint_filter_fn
from torch import nn

from ._checks import require_module, require_number
from .capture import moe_layers
from .experts import BatchedMlp

log = logging.getLogger(__name__)

DenseSource = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]

# A dense timm Mlp's parameters and the expert tensors they become: nn.Linear stores [out, in], the experts
# [n, in, out]. Noise goes on the two weight matrices only.
EXPERT_PARAMETERS = (
    # (dense name, BatchedMlp name, transposed, noisy)
    ("fc1.weight", "fc1_weight", True, True),
    ("fc1.bias", "fc1_bias", False, False),
    ("norm.weight", "norm_weight", False, False),
    ("norm.bias", "norm_bias", False, False),
    ("fc2.weight", "fc2_weight", True, True),
    ("fc2.bias", "fc2_bias", False, False),
)


class UpcycleSource(NamedTuple):
    """Where one entry of the upcycled state dict comes from."""

    dense_key: Optional[str]  # None: the model keeps its own value (router, ``keep_init``)
    num_experts: int = 0  # > 0: the dense tensor repeated once per expert
    transposed: bool = False
    noisy: bool = False


def load_tensors(path: str, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, without torch's warning for a pickle protocol it did not
    write: bytes that only begin like a pickle of another protocol (a damaged file) printed two lines of it beside
    the one line that says the file is unreadable."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol")
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def why_torch_load_failed(error: Exception) -> str:
    """``torch.load(..., weights_only=True)``'s refusal of a file in a few words a user can act on: its own messages
    run to 20 lines and, for bytes it cannot parse at all, suggest ``weights_only=False``, which would not help."""
    message = str(error)
    # a zip archive cut to a few KB: the reader's search for its central directory seeks before the file's start
    cut_short = isinstance(error, OSError) and error.errno == errno.EINVAL
    if "PytorchStreamReader" in message or isinstance(error, EOFError) or cut_short:
        return "truncated or damaged: torch.load cannot read its archive"
    if isinstance(error, (KeyError, IndexError)) or "Unsupported operand" in message or "invalid load key" in message:
        return "not a file torch.save wrote"
    if "weights_only" in message or "GLOBAL" in message:  # a real pickle, of objects loading would have to construct
        return "it holds Python objects that loading would have to execute; refused (weights_only=True)"
    return (message.strip().splitlines() or [type(error).__name__])[0]


class UnreadableCheckpointError(ValueError):
    """A checkpoint file torch.load or safetensors cannot read; ``reason`` says why in a few words."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"dense checkpoint {path!r} is not a readable checkpoint ({reason})")
        self.reason = reason


def load_state_dict(source: DenseSource, mapped: bool = False) -> Dict[str, torch.Tensor]:
    """A state dict from a module, a mapping, a ``.safetensors``/``.pth``/``.bin`` file (never unpickles code), or a
    sharded checkpoint's directory (``last.dcp``).

    ``mapped=True`` maps a ``.pth``/``.bin`` file (torch's zip format, records uncompressed) instead of reading it,
    as safetensors always does: only the tensors touched are read from disk. For a look at shapes that drops the
    state at once (a checkpoint of ViT-H is gigabytes); a file written over in place while its mapped tensors live
    would crash whoever reads them, so state that is kept is read."""
    if isinstance(source, nn.Module):  # torch.compile's or DataParallel's wrapper too
        return {_unwrapped(key): value for key, value in source.state_dict().items()}
    if isinstance(source, Mapping):
        state = dict(source)
    elif not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"a dense checkpoint must be a dense ViT (an nn.Module), its state dict or the path to its "
                         f"checkpoint file, got {type(source).__name__} {source!r:.60}")
    else:
        path = os.fspath(source)
        if os.path.isfile(os.path.join(path, ".metadata")):  # a sharded (DCP) checkpoint of trainer.strategy=fsdp
            from softmoe.harness.sharded_checkpoint import read_model

            return read_model(path)
        if os.path.isdir(path):  # and not a sharded checkpoint's: that has a .metadata
            raise ValueError(f"dense checkpoint {path!r} is a directory: pass its checkpoint file (.safetensors, .pth "
                             "or .bin), or a sharded checkpoint's directory (which holds a .metadata file)")
        if not os.path.isfile(path):
            raise ValueError(f"dense checkpoint {path!r} does not exist")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            try:
                state = load_file(path)
            except Exception as error:  # safetensors' own errors are one line already
                raise UnreadableCheckpointError(path, str(error).strip() or type(error).__name__) from None
        else:
            try:
                state = load_tensors(path, mmap=mapped and can_be_mapped(path))
            except Exception as error:
                raise UnreadableCheckpointError(path, why_torch_load_failed(error)) from None
            if not isinstance(state, Mapping):  # torch.save of a list or a bare tensor: no names to map
                raise UnreadableCheckpointError(path, f"it holds a {type(state).__name__}, not a state dict")
    for wrapper_key in ("model", "state_dict"):  # common checkpoint layouts
        if wrapper_key in state and isinstance(state[wrapper_key], Mapping):
            state = dict(state[wrapper_key])
    named = {key for key in state if not isinstance(key, str)}
    if named:
        raise ValueError(f"a dense state dict maps parameter names to tensors; this one has the key "
                         f"{sorted(named, key=repr)[0]!r} ({type(next(iter(named))).__name__})")
    return {_unwrapped(key): value for key, value in state.items()}


def can_be_mapped(path: str) -> bool:
    """Whether ``torch.load(path, mmap=True)`` reads ``path`` right: torch's zip format (torch.save's since 1.6) with
    every record stored as is. The legacy format it cannot map; a zip whose records were compressed (repacked with
    ``zipfile.ZIP_DEFLATED``) it maps, compressed bytes taken for the tensors': an error, or wrong values."""
    try:
        with zipfile.ZipFile(path) as archive:  # reads the central directory only
            return all(record.compress_type == zipfile.ZIP_STORED for record in archive.infolist())
    except (zipfile.BadZipFile, OSError):
        return False


def _unwrapped(key: Any) -> Any:
    """A parameter's name without the prefixes of the wrappers it was saved in, as timm's loader reads it: DDP's
    ``module.`` and ``torch.compile``'s ``_orig_mod.`` (``module.blocks.0.mlp.fc1.weight`` was "no 'blocks.0...'")."""
    if not isinstance(key, str):
        return key
    key = key.replace("._orig_mod.", ".")
    while key.startswith(("module.", "_orig_mod.")):
        key = key.split(".", 1)[1]
    return key


def upcycle(
    dense: DenseSource,
    model: nn.Module,
    noise_std: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Load a dense ViT's weights into ``model`` (a Soft MoE ViT of its width and depth) and return it.

    Args:
        dense: the dense ViT as a module, a state dict, or a ``.pth``/``.bin``/``.safetensors`` path.
        model: a :class:`softmoe.SoftMoEVisionTransformer` of the dense model's width, depth, tokens and pooling;
            another image size, patch size, class count or input channels is fitted (:func:`fit_dense_state`).
        noise_std: standard deviation of Gaussian noise added to each expert's copied weights.
        generator: RNG for the noise.
    """
    require_module("model", model, "the Soft MoE ViT to load the upcycled weights into (an nn.Module)")
    if generator is not None and not isinstance(generator, torch.Generator):  # a seed is not a generator
        raise ValueError(f"generator must be a torch.Generator (torch.Generator().manual_seed(seed)) or None, got "
                         f"{generator!r}")
    fitted = fit_dense_state(load_state_dict(dense), model)
    model.load_state_dict(upcycle_state_dict(fitted.state, model, noise_std, generator, keep_init=fitted.keep_init))
    log_changes(fitted)
    return model


def log_changes(fitted: "FittedDense") -> None:
    """What fitting the dense checkpoint to the model changed, one log line each (a researcher should know that a
    classifier starts fresh or a position embedding was resampled)."""
    for change in fitted.changes:
        log.info("upcycling: %s", change)


class FittedDense(NamedTuple):
    """A dense ViT's state dict made to fit a model (:func:`fit_dense_state`)."""

    state: Dict[str, torch.Tensor]
    keep_init: Tuple[str, ...]  # the model's keys that keep their own value: a classifier the checkpoint cannot give
    changes: Tuple[str, ...]  # what was adapted, in words, for the run's log


def cfg_names(model: nn.Module, field: str, default: Tuple[str, ...] = ()) -> Tuple[str, ...]:
    """The module names the model's ``pretrained_cfg`` gives under ``field`` (``classifier``, ``first_conv``); a
    model built without timm's ``create_model`` has no ``pretrained_cfg``: ``default``."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get(field) or default
    return (names,) if isinstance(names, str) else tuple(names)


def fit_dense_state(dense_state: Mapping[str, torch.Tensor], model: nn.Module, *, timm_filter: bool = True,
                    adapt_channels: bool = True) -> FittedDense:
    """``dense_state`` made to fit ``model`` as timm's ``pretrained=True`` loader fits a ViT checkpoint, so that a
    dense ViT trained elsewhere (ImageNet at 224 px, 1,000 classes) upcycles into a model of another image size,
    patch size, class count or input channels: timm's ViT filter resamples the position and patch embeddings
    (``timm_filter=False``: the state has been through it), a classifier of another size or none is left out (the
    model's keeps its init) and, with ``adapt_channels``, the first convolution is adapted to the model's input
    channels (timm's ``adapt_input_conv``). Only the model's shapes are read (it may live on the meta device); the
    width, depth, tokens and pooling must match, and ``upcycle_sources`` names the first tensor that does not."""
    _require_tensors(dense_state)
    expert_key = next((key for key in dense_state if ".experts." in key), None)
    if expert_key is not None:  # before any other check: no setting of the model makes it a dense ViT's
        raise ValueError(moe_checkpoint_message(expert_key))
    target = model.state_dict()
    _require_same_tokens(dense_state, target)
    state = _timm_filtered(dense_state, model) if timm_filter else dict(dense_state)
    changes = [f"{key} resampled from {list(dense_state[key].shape)} to {list(state[key].shape)}"
               for key in state if key in dense_state and state[key].shape != dense_state[key].shape]
    left_out = sorted(set(dense_state) - set(state))
    if left_out:  # e.g. an old checkpoint's pre_logits, which timm's ViTs no longer have
        changes.append(f"left out by timm's ViT checkpoint filter: {', '.join(left_out)}")
    keep_init = _fit_classifiers(state, target, model, changes)
    for key in other_channels(state, model) if adapt_channels else ():
        source, channels = state[key], target[key].shape[1]
        state[key] = adapt_input_conv(channels, source, base_chans=source.shape[1])
        changes.append(f"{key}: the checkpoint's {source.shape[1]} input channels adapted to the model's {channels} "
                       "(timm's adapt_input_conv)")
    return FittedDense(state, tuple(keep_init), tuple(changes))


def _timm_filtered(dense_state: Mapping[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ViT checkpoint filter, its errors in one line."""
    try:
        return vit_checkpoint_filter_fn(dict(dense_state), model)
    except (RuntimeError, ValueError, AssertionError) as error:  # a grid it cannot resample: torch's reshape error
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"timm's ViT checkpoint filter cannot fit the dense checkpoint to the model ({first_line}): "
                         "its embeddings are of another layout") from None


def _fit_classifiers(state: Dict[str, torch.Tensor], target: Mapping[str, torch.Tensor], model: nn.Module,
                     changes: List[str]) -> List[str]:
    """Leave out of ``state`` each classifier that does not fit the model's (another class count, or a model without
    one), saying so in ``changes``; returns the model's classifier keys that keep their init (those of a classifier
    the checkpoint has none of, too: a backbone saved with ``num_classes=0``)."""
    keep_init: List[str] = []
    for name in cfg_names(model, "classifier", ("head",)):
        keys = [f"{name}.{kind}" for kind in ("weight", "bias")]
        own = [key for key in keys if key in target]
        if not any(key in state for key in keys):
            if own:
                keep_init += own
                changes.append(f"{name}: the model's own classifier at its init (the checkpoint has none)")
            continue
        if all(key in target and state[key].shape == target[key].shape for key in keys if key in state):
            continue  # the checkpoint's own classifier fits: copied
        dense_rows = state[keys[0]].shape[0] if keys[0] in state else "?"
        for key in keys:
            state.pop(key, None)
        keep_init += own
        if own:
            changes.append(f"{name}: the model's own {target[own[0]].shape[0]}-class classifier at its init (the "
                           f"checkpoint's has {dense_rows} classes)")
        else:  # num_classes=0: a backbone
            changes.append(f"{name}: the checkpoint's classifier left out (the model has none)")
    return keep_init


def other_channels(state: Mapping[str, torch.Tensor], model: nn.Module) -> List[str]:
    """The first convolutions (``pretrained_cfg``'s ``first_conv``) of ``state`` whose input channels alone differ
    from the model's (an RGB checkpoint, a grey model): timm's ``adapt_input_conv`` adapts them."""
    target, keys = model.state_dict(), []
    for name in cfg_names(model, "first_conv", ("patch_embed.proj",)):
        key = f"{name}.weight"
        source, own = state.get(key), target.get(key)
        if source is None or own is None or source.ndim != 4 or own.ndim != 4:
            continue
        if source.shape[1] != own.shape[1] and source[:, :1].shape == own[:, :1].shape:
            keys.append(key)
    return keys


def _require_tensors(dense_state: Mapping[str, Any]) -> None:
    """Every entry a tensor (was: an AttributeError naming no key, from ``.shape`` or ``.to``)."""
    not_a_tensor = next((key for key, value in dense_state.items() if not isinstance(value, torch.Tensor)), None)
    if not_a_tensor is not None:
        raise ValueError(f"the dense checkpoint's {not_a_tensor!r} is a {type(dense_state[not_a_tensor]).__name__}, "
                         "not a tensor: upcycle from a state dict of tensors (torch.load of a dense ViT's weights)")


def _require_same_tokens(dense_state: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> None:
    """Class or register tokens on one side only: timm's filter would read the position embedding as a grid of
    another size (a torch reshape error); say which setting to change instead."""
    if ("cls_token" in dense_state) != ("cls_token" in target):
        wanted = "cls_token" in dense_state
        raise ValueError(f"the dense checkpoint {'has a' if wanted else 'has no'} class token ('cls_token') and the "
                         f"model {'none' if wanted else 'one'}: build the model with class_token={wanted} "
                         f"(model.class_token={str(wanted).lower()} in a run's config) to upcycle from it")
    if ("reg_token" in dense_state) != ("reg_token" in target):
        wanted = dense_state["reg_token"].shape[1] if "reg_token" in dense_state else 0
        in_config = f"+model.reg_tokens={wanted}" if wanted else "no +model.reg_tokens"  # not a key of conf/model
        raise ValueError(f"the dense checkpoint has {wanted} register tokens ('reg_token') and the model "
                         f"{target['reg_token'].shape[1] if 'reg_token' in target else 0}: build the model with "
                         f"reg_tokens={wanted} ({in_config} in a run's config) to upcycle from it")


def upcycle_state_dict(
    dense_state: Mapping[str, torch.Tensor],
    model: nn.Module,
    noise_std: float = 0.0,
    generator: Optional[torch.Generator] = None,
    keep_init: Collection[str] = (),
) -> Dict[str, torch.Tensor]:
    """The full state dict of ``model`` upcycled from ``dense_state`` (nothing is loaded).

    Raises a ``ValueError`` naming the first key that does not fit. ``keep_init`` lists further keys of
    ``model`` that keep their own value, e.g. a classifier of a different size.
    """
    noise_std = require_number("noise_std", noise_std, minimum=0, inclusive=True)
    target = model.state_dict()
    state: Dict[str, torch.Tensor] = {}
    for key, source in upcycle_sources(dense_state, model, keep_init).items():
        if source.dense_key is None:
            state[key] = target[key]
            continue
        value = upcycled_value(dense_state, source, target[key].dtype)
        if noise_std > 0 and source.noisy:
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            value = value + noise_std * noise.to(value.device)
        state[key] = value
    return state


def upcycled_value(dense_state: Mapping[str, torch.Tensor], source: UpcycleSource, dtype: torch.dtype) -> torch.Tensor:
    """One entry of the upcycled state dict, before noise: the dense tensor ``source`` names, repeated over the
    experts for an expert bank. ``source.dense_key`` must not be None (that entry keeps the model's own value)."""
    value = dense_state[source.dense_key]
    if source.num_experts:
        value = value.T if source.transposed else value
        value = value.to(dtype).unsqueeze(0).repeat(source.num_experts, *([1] * value.ndim))
    return value


def check_upcycle(dense_state: Mapping[str, torch.Tensor], model: nn.Module, keep_init: Collection[str] = ()) -> None:
    """Raise the ``ValueError`` that upcycling ``model`` from ``dense_state`` would (after
    :func:`fit_dense_state`), copying nothing.

    Only shapes are read, so ``model`` may live on the meta device.
    """
    fitted = fit_dense_state(dense_state, model)
    upcycle_sources(fitted.state, model, (*keep_init, *fitted.keep_init))


def moe_checkpoint_message(expert_key: str) -> str:
    """Why a checkpoint holding experts (``expert_key``) is not upcycled, and what to do instead."""
    return (f"the checkpoint is of an MoE model ({expert_key!r}), not a dense ViT: upcycle from a dense ViT's "
            "checkpoint (e.g. a moe=dense run's last.pt), or continue an MoE run with trainer.resume=<its last.pt or "
            "best.pt> (an export's .safetensors holds the weights alone, which no run resumes from)")


def missing_dense_mlp(dense_state: Mapping[str, torch.Tensor], dense_key: str, name: str) -> str:
    """Why ``dense_state`` has no ``dense_key`` for the MoE layer ``name``, in one line: a Soft MoE checkpoint (its
    blocks hold experts), one of fewer blocks than the model, or some other model's."""
    expert_key = next((key for key in dense_state if ".experts." in key), None)
    if expert_key is not None:
        return moe_checkpoint_message(expert_key)
    blocks = {key.split(".")[1] for key in dense_state if key.startswith("blocks.") and key.count(".") > 1}
    block = name.split(".")[1] if name.startswith("blocks.") else None
    if blocks and block is not None and block not in blocks:
        counted = f"{len(blocks)} block{'' if len(blocks) == 1 else 's'}"
        return (f"the dense checkpoint has {counted}, and the model's MoE layer {name} is beyond them: upcycle into a "
                "model of the checkpoint's depth")
    return f"the dense checkpoint has no {dense_key!r} to copy into the experts of {name}"


def _pooled(key: str, dense_state: Mapping[str, torch.Tensor]) -> str:
    """For a final norm the checkpoint lacks: the pooling setting that gives the model the checkpoint's. timm's ViT
    normalises before pooling (``norm``: ``global_pool='token'``, or ``fc_norm=False``) or after (``fc_norm``, its
    default for ``global_pool='avg'``)."""
    if key.startswith("fc_norm.") and "norm.weight" in dense_state:
        return (": it normalises before pooling ('norm'), the model after ('fc_norm', global_pool='avg'); build the "
                "model with fc_norm=False (+model.fc_norm=false in a run's config) to take its 'norm'")
    if key.startswith("norm.") and "fc_norm.weight" in dense_state:
        return (": it normalises after pooling ('fc_norm', global_pool='avg'), the model before ('norm'); build the "
                "model with global_pool='avg' (model.global_pool=avg in a run's config)")
    return ""


def upcycle_sources(
    dense_state: Mapping[str, torch.Tensor], model: nn.Module, keep_init: Collection[str] = ()
) -> Dict[str, UpcycleSource]:
    """For every key of ``model``'s state dict, where its upcycled value comes from; checks every shape (only
    shapes are read: ``model`` may live on the meta device)."""
    _require_tensors(dense_state)
    target = model.state_dict()
    sources: Dict[str, UpcycleSource] = {key: UpcycleSource(None) for key in keep_init if key in target}
    for name, layer in moe_layers(model).items():
        if not isinstance(layer.experts, BatchedMlp):
            raise ValueError(f"upcycling needs MLP experts, but {name} has {type(layer.experts).__name__}")
        for dense_name, expert_name, transposed, noisy in EXPERT_PARAMETERS:
            key = f"{name}.experts.{expert_name}"
            if key not in target:  # e.g. no bias, no norm
                continue
            dense_key = f"{name}.{dense_name}"
            if dense_key not in dense_state:
                raise ValueError(missing_dense_mlp(dense_state, dense_key, name))
            shape = tuple(dense_state[dense_key].shape)
            one_expert = tuple(target[key].shape[1:])
            if (shape[::-1] if transposed else shape) != one_expert:
                raise ValueError(
                    f"shape mismatch for {dense_key!r}: dense {list(shape)}, one expert "
                    f"{list(one_expert[::-1] if transposed else one_expert)}"
                )
            sources[key] = UpcycleSource(dense_key, layer.experts.num_experts, transposed, noisy)
        # everything else in the MoE layer is its router (Φ and scale, or a sparse router): keep its init
        for key in target:
            if key.startswith(f"{name}.") and key not in sources:
                sources[key] = UpcycleSource(None)

    for key, value in target.items():
        if key in sources:
            continue
        if key not in dense_state:
            raise ValueError(f"the dense checkpoint has no {key!r} (needed by the Soft MoE model)"
                             f"{_pooled(key, dense_state)}")
        if tuple(dense_state[key].shape) != tuple(value.shape):
            raise ValueError(
                f"shape mismatch for {key!r}: dense {list(dense_state[key].shape)}, Soft MoE {list(value.shape)}"
            )
        sources[key] = UpcycleSource(key)
    used = {source.dense_key for source in sources.values()} | set(keep_init)
    unused = sorted(set(dense_state) - used)
    if unused:
        raise ValueError(f"dense checkpoint entries with no place in the Soft MoE model: {unused[:5]}")
    return sources
