"""Any layer as an expert bank: ``num_experts`` independent instances of it, run batched.

:class:`StackedExperts` stacks the instances' parameters (as ``torch.func.stack_module_state`` does) and runs the
layer under ``torch.func.vmap``, with a per-expert loop as the fallback for layers vmap cannot trace.
:class:`~softmoe.SoftMoELayerWrapper` builds one; the MLP experts of the paper use the faster
:class:`~softmoe.experts.BatchedMlp`. Like it, the bank maps slots [batch, num_experts, slots_per_expert, dim]
to [batch, num_experts, slots_per_expert, dim'], expert ``i`` seeing only ``slots[:, i]``.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from ._checks import is_exporting, require_expert_output, require_positive_int, require_slots


class StackedExperts(nn.Module):
    """``num_experts`` independent instances of any layer, run batched with ``torch.func.vmap``.

    ``self.layer`` is one instance of the layer whose parameters and buffers have been replaced by
    the stacked ``[num_experts, ...]`` tensors of all instances, so the state dict reads
    ``layer.<name>`` with a leading expert dimension. Each instance is built by ``layer_factory``
    and so initialised independently.
    """

    def __init__(self, num_experts: int, layer_factory: Callable[[], nn.Module]) -> None:
        super().__init__()
        self.num_experts = require_positive_int("num_experts", num_experts)
        instances = [layer_factory() for _ in range(num_experts)]
        if not isinstance(instances[0], nn.Module):
            raise ValueError(f"layer must build an nn.Module, but calling it returned {instances[0]!r}: pass an "
                             "nn.Module class, or a callable returning one such as functools.partial(MyLayer, ...)")
        params, buffers = stack_module_state(instances)  # a tensor the layer holds under two names: the first only
        self.layer = instances[0]
        tied = {**_names_of_each(self.layer.named_parameters(remove_duplicate=False)),
                **_names_of_each(self.layer.named_buffers(remove_duplicate=False))}
        for name, value in params.items():  # a frozen parameter stays frozen (nn.Parameter's default is trainable)
            self._replace(tied[name], nn.Parameter(value.detach(), requires_grad=value.requires_grad))
        for name, value in buffers.items():
            self._replace(tied[name], value)
        self.use_vmap = True  # switched off (with one warning) if vmap cannot run this layer

    def _replace(self, names: list[str], value: torch.Tensor) -> None:
        """Put the stacked ``value`` under every name of one tensor: tied weights stay tied, each expert's slice
        shared by its names, as in that expert's own instance (a second name kept expert 0's unstacked tensor)."""
        for name in names:
            owner_name, _, leaf = name.rpartition(".")
            owner = self.layer.get_submodule(owner_name) if owner_name else self.layer
            setattr(owner, leaf, value)

    def forward(self, slots: torch.Tensor) -> torch.Tensor:
        require_slots(slots, self.num_experts)
        return run_stacked_experts(self, slots)

    def _forward(self, slots: torch.Tensor) -> torch.Tensor:
        params = dict(self.layer.named_parameters())
        buffers = dict(self.layer.named_buffers())
        # torch.export cannot lift parameters out of vmap(functional_call) (torch 2.14): it exports the loop
        vmap_error = None
        if self.use_vmap and not is_exporting():
            try:
                outputs = vmap(self._call_one, in_dims=(0, 0, 1), out_dims=1, randomness="different")(
                    params, buffers, slots
                )
            except (RuntimeError, NotImplementedError, ValueError, AssertionError, TypeError) as error:
                vmap_error = error
            else:
                return require_expert_output(self._layer_name, outputs, slots, stacked=True)
        outputs = self._loop(params, buffers, slots)  # raises if the layer cannot run at all
        if vmap_error is not None:  # the loop ran where vmap could not: use it from now on
            self.use_vmap = False
            warnings.warn(
                f"{type(self.layer).__name__} cannot run under torch.func.vmap ({vmap_error}); "
                "falling back to a loop over experts for this layer",
                stacklevel=3,
            )
        return outputs

    def _loop(self, params, buffers, slots: torch.Tensor) -> torch.Tensor:
        """The experts one after the other; an expert that cannot take its slots raises naming the layer."""
        outputs = []
        for i in range(self.num_experts):
            expert_params, expert_buffers = {k: v[i] for k, v in params.items()}, {k: v[i] for k, v in buffers.items()}
            try:
                output = self._call_one(expert_params, expert_buffers, slots[:, i])
            except (RuntimeError, AssertionError, ValueError, TypeError) as error:
                if isinstance(error, torch.OutOfMemoryError):
                    raise
                # most often the layer's arguments do not fit the wrapper's dim (an in_features, a d_model), which
                # torch reports as a matmul's shapes or an assert, or its forward takes other arguments (a
                # TypeError): say which layer and which input. A bad argument (an assert) is a ValueError
                kind = next((kind for kind in (RuntimeError, TypeError) if isinstance(error, kind)), ValueError)
                raise kind(
                    f"expert {i} ({self._layer_name()}) cannot take its slots: each expert is called on a [batch, "
                    f"slots_per_expert, dim] tensor, here of shape {list(slots[:, i].shape)}, and raised: {error}. "
                    f"Check the layer's arguments against dim={slots.shape[-1]}"
                ) from error
            outputs.append(require_expert_output(self._layer_name, output, slots, stacked=False))
        return torch.stack(outputs, dim=1)

    def _layer_name(self) -> str:
        return repr(self.layer) if "\n" not in repr(self.layer) else type(self.layer).__name__

    def _call_one(self, params, buffers, expert_slots: torch.Tensor) -> torch.Tensor:
        """Expert ``i`` on its slots [batch, slots_per_expert, dim]."""
        return functional_call(self.layer, (params, buffers), (expert_slots,))


def _names_of_each(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list[str]]:
    """Each tensor's names, under its first (the one ``named_parameters()`` and ``stack_module_state`` keep)."""
    names: dict[int, list[str]] = {}
    for name, tensor in named:
        names.setdefault(id(tensor), []).append(name)
    return {every[0]: every for every in names.values()}


@torch.fx.wrap  # one call in a torch.fx graph: symbolic tracing cannot enter torch.func.vmap (torch.export can)
def run_stacked_experts(experts: StackedExperts, slots: torch.Tensor) -> torch.Tensor:
    """``experts(slots)``: slots [batch, num_experts, slots_per_expert, dim] ->
    [batch, num_experts, slots_per_expert, dim']."""
    return experts._forward(slots)
