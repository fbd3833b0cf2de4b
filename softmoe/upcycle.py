"""Sparse upcycling: start a Soft MoE ViT from a dense timm ViT's weights.

Every expert of an MoE block starts as that block's dense MLP (optionally plus Gaussian noise, so
the experts can diverge); everything else is copied; the router (Φ and scale, or a sparse
router's weights) keeps its fresh init.
"""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from .capture import moe_layers
from .experts import BatchedMlp

DenseSource = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]


def load_state_dict(source: DenseSource) -> Dict[str, torch.Tensor]:
    """A state dict from a module, a mapping, or a ``.safetensors``/``.pth`` file (never unpickles code)."""
    if isinstance(source, nn.Module):
        return source.state_dict()
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ValueError(f"dense checkpoint {path!r} does not exist")
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper_key in ("model", "state_dict"):  # common checkpoint layouts
        if wrapper_key in state and isinstance(state[wrapper_key], Mapping):
            state = dict(state[wrapper_key])
    return state


def upcycle(
    dense: DenseSource,
    model: nn.Module,
    noise_std: float = 0.0,
    generator: Optional[torch.Generator] = None,
) -> nn.Module:
    """Load a dense ViT's weights into ``model`` (a Soft MoE ViT of the same architecture) and return it.

    Args:
        dense: the dense ViT as a module, a state dict, or a ``.pth``/``.safetensors`` path.
        model: a :class:`softmoe.SoftMoEVisionTransformer` whose non-MoE shapes match the dense model.
        noise_std: standard deviation of Gaussian noise added to each expert's copied weights.
        generator: RNG for the noise.
    """
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    dense_state = load_state_dict(dense)
    target = model.state_dict()
    new_state: Dict[str, torch.Tensor] = {}
    used = set()

    for name, layer in moe_layers(model).items():
        if not isinstance(layer.experts, BatchedMlp):
            raise ValueError(f"upcycling needs MLP experts, but {name} has {type(layer.experts).__name__}")
        new_state.update(_expert_weights(name, layer, dense_state, noise_std, generator, used))
        # everything else in the MoE layer is its router (Φ and scale, or a sparse router): keep its init
        for key in target:
            if key.startswith(f"{name}.") and not key.startswith(f"{name}.experts."):
                new_state[key] = target[key]

    for key, value in target.items():
        if key in new_state:
            continue
        if key not in dense_state:
            raise ValueError(f"the dense checkpoint has no {key!r} (needed by the Soft MoE model)")
        if dense_state[key].shape != value.shape:
            raise ValueError(
                f"shape mismatch for {key!r}: dense {list(dense_state[key].shape)}, Soft MoE {list(value.shape)}"
            )
        new_state[key] = dense_state[key]
        used.add(key)
    unused = sorted(set(dense_state) - used)
    if unused:
        raise ValueError(f"dense checkpoint entries with no place in the Soft MoE model: {unused[:5]}")
    model.load_state_dict(new_state)
    return model


def _expert_weights(name, layer, dense_state, noise_std, generator, used):
    """The stacked expert tensors of one MoE layer, each expert a copy of the dense MLP."""
    experts: BatchedMlp = layer.experts
    stacked = {}
    # dense nn.Linear stores [out, in]; experts store [n, in, out]
    for dense_key, expert_name, transpose in (
        ("fc1.weight", "fc1_weight", True),
        ("fc1.bias", "fc1_bias", False),
        ("norm.weight", "norm_weight", False),
        ("norm.bias", "norm_bias", False),
        ("fc2.weight", "fc2_weight", True),
        ("fc2.bias", "fc2_bias", False),
    ):
        param = getattr(experts, expert_name)
        if param is None:
            continue
        key = f"{name}.{dense_key}"
        if key not in dense_state:
            raise ValueError(f"the dense checkpoint has no {key!r} to copy into the experts of {name}")
        value = dense_state[key].T if transpose else dense_state[key]
        if tuple(value.shape) != tuple(param.shape[1:]):
            raise ValueError(
                f"shape mismatch for {key!r}: dense {list(dense_state[key].shape)}, one expert {list(param.shape[1:])}"
            )
        value = value.to(param.dtype).unsqueeze(0).repeat(experts.num_experts, *([1] * value.ndim))
        if noise_std > 0 and "weight" in expert_name and "norm" not in expert_name:
            noise = torch.randn(value.shape, generator=generator, dtype=value.dtype)
            value = value + noise_std * noise.to(value.device)
        stacked[f"{name}.experts.{expert_name}"] = value
        used.add(key)
    return stacked
