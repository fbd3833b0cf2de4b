"""Calls of a module whose weights are replaced by new tensors between calls, as ``torch.func.functional_call``
and ``load_state_dict(assign=True)`` replace them: a new weight often takes the address the one it replaces just
freed, with the same version counter, which a cache keyed on address and version takes for the old weight."""

from typing import Callable, Iterator

import torch
from torch import nn

WAYS = ["functional_call", "load_state_dict(assign=True)"]


def call_with(module: nn.Module, way: str, weights: dict, inputs: tuple) -> torch.Tensor:
    """``module(*inputs)`` with ``weights`` put in place the ``way`` named (one of :data:`WAYS`)."""
    if way == "functional_call":
        return torch.func.functional_call(module, weights, inputs)
    module.load_state_dict(weights, assign=True)
    return module(*inputs)


def calls_at_freed_addresses(module: nn.Module, way: str, new_weights: Callable[[int], dict], inputs: tuple,
                             calls: int = 10) -> Iterator[tuple[int, torch.Tensor]]:
    """(seed, the output of a call with ``new_weights(seed)``) for ``calls`` seeds, each call after another with
    other weights (seed + 100), whose address the next weights often take."""
    for seed in range(calls):
        call_with(module, way, new_weights(seed + 100), inputs)
        if way != "functional_call":  # loading frees the weights the last call read, before these are made
            module.load_state_dict(new_weights(seed + 200), assign=True)
        yield seed, call_with(module, way, new_weights(seed), inputs)
