"""Recording the routing weights of every Soft MoE layer during a forward pass."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Dict, Iterator

import torch
from torch import nn

from ._checks import require_module


@dataclass
class RoutingRecord:
    """One layer's routing weights for the last batch it saw, each [batch, tokens, experts, slots_per_expert]."""

    dispatch: torch.Tensor
    combine: torch.Tensor


def is_routing_layer(module: nn.Module) -> bool:
    """A Soft MoE or sparse MoE layer: anything with a routing recorder."""
    return hasattr(module, "_routing_recorder")


def moe_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The routing layers of ``model`` (:func:`is_routing_layer`), by module name."""
    model = require_module("model", model, "an nn.Module holding MoE layers")
    return {name: module for name, module in model.named_modules() if is_routing_layer(module)}


# The router's own parameters in every routing layer: Soft MoE's Φ and scale, the sparse routers' weight and scale.
ROUTER_PARAMETER_NAMES = ("phi", "scale", "router_weight")


def router_parameters(model: nn.Module) -> Dict[str, nn.Parameter]:
    """The routers' parameters of every MoE layer of ``model``, by full parameter name (e.g.
    ``"blocks.3.mlp.phi"``): what a separate optimizer group (learning rate, weight decay) addresses."""
    return {
        f"{layer_name}.{name}": parameter
        for layer_name, layer in moe_layers(model).items()
        for name, parameter in layer.named_parameters(recurse=False)
        if name in ROUTER_PARAMETER_NAMES
    }


def block_index(module_name: str) -> int:
    """The transformer block a module belongs to: ``"blocks.7.mlp"`` -> 7."""
    if not isinstance(module_name, str):
        raise ValueError(f"module_name must be a module's name such as 'blocks.7.mlp', got {module_name!r}")
    parts = module_name.split(".")
    if "blocks" in parts:
        position = parts.index("blocks") + 1
        if position < len(parts) and parts[position].isdigit():
            return int(parts[position])
    raise ValueError(f"module name {module_name!r} is not inside a 'blocks.<index>' container")


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[Dict[str, RoutingRecord]]:
    """Record the dispatch and combine weights of each MoE layer of ``model`` inside the ``with`` block.

    Yields a dict from module name (e.g. ``"blocks.7.mlp"``) to a :class:`RoutingRecord`, filled as
    the forward pass runs (a layer called twice keeps its latest call). The weights are detached
    tensors in the router's precision (float32, or float64 for a float64 model).
    On exit the layers stop recording; the dict stays with the caller only.
    """
    records: Dict[str, RoutingRecord] = {}
    layers = moe_layers(model)

    def recorder_for(name: str, layer: nn.Module):
        def record(dispatch: torch.Tensor, combine: torch.Tensor) -> None:
            # [b, m, n * slots] -> [b, m, n, slots]; slots per expert is the layer's capacity for sparse layers
            # (spelled out, not -1: an empty batch has no elements to infer it from)
            shape = (*dispatch.shape[:2], layer.num_experts, dispatch.shape[-1] // layer.num_experts)
            records[name] = RoutingRecord(dispatch=dispatch.detach().view(shape), combine=combine.detach().view(shape))

        return record

    previous = {name: layer._routing_recorder for name, layer in layers.items()}
    try:
        for name, layer in layers.items():
            layer._routing_recorder = recorder_for(name, layer)
        yield records
    finally:
        for name, layer in layers.items():
            layer._routing_recorder = previous[name]
