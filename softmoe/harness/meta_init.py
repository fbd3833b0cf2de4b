"""``trainer.init_device=meta``: build the model without storage, lay it out over the ranks, then give each rank its
own pieces only, so that no rank ever holds the whole model (torchtitan's order: meta device, parallelise,
``to_empty``, initialise the local shards).

Soft MoE-H/14 with 128 experts has 27.3 B parameters, 110 GB in float32: the default ``trainer.init_device=cpu``,
where every rank builds the whole model on its CPU before sharding it, cannot start it. Here:

1. the model is built on the meta device (shapes, no storage), and an unsharded copy kept as the template;
2. :meth:`~.distributed.Distributed.shard_model` keeps this rank's experts and ``fully_shard``s it, broadcasting
   nothing;
3. ``to_empty`` allocates this rank's pieces on its device, filled with NaN until something writes them;
4. each parameter in turn is made whole (:func:`draw_parameter`), its piece copied into the sharded model without
   communication, and the whole tensor freed: a rank holds its own pieces plus one whole parameter at a time (and
   that parameter's init scratch: torch 2.14's ``trunc_normal_`` compares the whole tensor with its bounds, three
   bool masks, 3/4 of its float32 bytes).

How a parameter is drawn: timm's own init for a model built on the meta device, ``init_weights(needs_reset=True)``
(every module's ``reset_parameters`` or ``init_weights``: the Linear layers, norms, position embedding and tokens,
each Soft MoE layer's router and experts), runs over the template with that one parameter real, whole and on this
rank's device, and every other parameter on the meta device, where the same calls do nothing. The generator is
seeded from (the run's ``seed``, the parameter's single-process name). So each parameter has exactly the
distribution the default build gives it, drawn by the same functions, and a value that depends on neither the mesh
nor the other parameters: one process and any layout of W ranks start from the same weights, bit for bit, on the
same kind of device (the CPU's and CUDA's generators draw different numbers).

They are not the default build's numbers. That build draws every parameter from one stream in construction order,
then most of them again in timm's init, so a parameter's values depend on every draw before it, which only building
the whole model reproduces. Compare a meta-initialised run with another meta-initialised run (one process
included), never with a default one: the two start from the same distributions, not the same weights.

Upcycling (``model.upcycle_from``): the parameters the dense checkpoint provides are its tensors (an expert bank
is the dense MLP repeated over the experts, plus ``model.upcycle_noise_std`` noise drawn expert by expert from the
parameter's own generator); only the routers are drawn. Resuming: nothing is drawn, the checkpoint (loaded
strictly) writes every piece.

Cost: one pass of timm's init over the meta template per parameter (12 ms each for H/14's 423 parameters on an AMD
EPYC Zen 3, load average 2.7: 5 s), and every rank draws every whole tensor on its device, the expert banks included.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import math
import os
from typing import Any, Iterator, Mapping, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from softmoe.parallel import local_tensor
from softmoe.upcycle import (FittedDense, UpcycleSource, fit_dense_state, load_state_dict, log_changes,
                             upcycle_sources, upcycled_value)

from .distributed import Distributed
from .errors import ConfigError
from .model import build_model
from .sharded_checkpoint import copy_piece, global_state

log = logging.getLogger(__name__)


def parameter_seed(seed: int, name: str) -> int:
    """The generator seed of parameter ``name`` in a run seeded ``seed``: the same in every process (unlike Python's
    salted ``hash``), unrelated between names."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@contextlib.contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """The default generators of the CPU and of ``device`` seeded with ``seed`` inside the block, restored after it
    (the run's own streams, seeded by ``seed_everything``, go on as if nothing was drawn)."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for index in cuda:
            torch.cuda.default_generators[index].manual_seed(seed)
        yield


class _SkipOnMeta(TorchFunctionMode):
    """In-place calls on meta tensors return at once: they change no value there, and torch's meta kernels for them
    (Python decompositions) made each pass of the init over the template 5 to 25 times slower. Calls that change a
    tensor's shape or strides still run."""

    KEEP = {"resize_", "resize_as_", "set_", "as_strided_", "t_", "transpose_", "squeeze_", "unsqueeze_",
            "swapdims_", "swapaxes_"}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        skip = name.endswith("_") and not name.endswith("__") and name not in self.KEEP
        if skip and args and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def draw_parameter(template: nn.Module, name: str, device: torch.device, seed: int) -> torch.Tensor:
    """Parameter ``name`` of ``template`` (a timm ViT on the meta device) drawn whole on ``device`` by timm's init, from
    a generator seeded from (``seed``, ``name``). Raises :class:`ConfigError` when the init leaves part of it unset."""
    owner_name, _, leaf = name.rpartition(".")
    owner = template.get_submodule(owner_name)
    meta = owner._parameters[leaf]
    whole = torch.full(meta.shape, math.nan, dtype=meta.dtype, device=device)
    owner._parameters[leaf] = nn.Parameter(whole, requires_grad=meta.requires_grad)
    try:
        with _seeded(device, parameter_seed(seed, name)), _SkipOnMeta():
            template.init_weights(needs_reset=True)
    finally:
        owner._parameters[leaf] = meta
    if whole.sum().isnan():  # a sum, not a mask: no second whole-size tensor
        raise ConfigError(
            f"trainer.init_device=meta: the init of {type(template).__name__} leaves {name} (partly) unset, so it "
            "cannot be drawn on its own; use trainer.init_device=cpu"
        )
    return whole


def _upcycled(dense_state: Mapping[str, torch.Tensor], source: UpcycleSource, name: str, dtype: torch.dtype,
              noise_std: float, seed: int) -> torch.Tensor:
    """Parameter ``name`` upcycled from ``dense_state`` (on the CPU), its noise drawn expert by expert."""
    whole = upcycled_value(dense_state, source, dtype)
    if noise_std > 0 and source.noisy:  # only expert banks are noisy: ``whole`` is a new tensor
        generator = torch.Generator().manual_seed(parameter_seed(seed, name))
        for expert in whole:
            expert.add_(torch.randn(expert.shape, generator=generator, dtype=expert.dtype), alpha=noise_std)
    return whole


def _local_bytes(tensors: Iterator[torch.Tensor]) -> int:
    return sum(local_tensor(t).nbytes for t in tensors)


@torch.no_grad()
def initialise(
    model: nn.Module, template: nn.Module, *, device: torch.device, seed: int, mesh: Any = None,
    dense: Optional[FittedDense] = None, noise_std: float = 0.0,
) -> None:
    """Fill this rank's pieces of ``model`` (laid out by :meth:`Distributed.shard_model` and allocated by
    ``to_empty``): each parameter of ``template`` drawn whole in turn (or upcycled from ``dense``), its piece
    copied, the whole tensor freed. No communication."""
    pieces = {key[len("model."):]: piece for key, piece in
              global_state(model, (dict(model.named_parameters()), {}), mesh).items()}  # single-process names
    names = [name for name, _ in template.named_parameters()]
    if sorted(names) != sorted(pieces):
        raise RuntimeError(f"the sharded model's parameters {sorted(pieces)} are not the template's {sorted(names)}")
    sources = upcycle_sources(dense.state, template, dense.keep_init) if dense is not None else {}
    draw_device = device if device.type in ("cpu", "cuda") else torch.device("cpu")  # generators we can seed
    largest = 0
    for name, meta in template.named_parameters():
        source = sources.get(name)
        if source is not None and source.dense_key is not None:
            whole = _upcycled(dense.state, source, name, meta.dtype, noise_std, seed)
        else:
            whole = draw_parameter(template, name, draw_device, seed)
        copy_piece(pieces[name], whole)
        largest = max(largest, whole.nbytes)
        del whole  # one whole parameter at a time
    log.info(
        "trainer.init_device=meta: this rank holds %.1f MiB of the model's %.1f MiB; each parameter was drawn whole in "
        "turn (the largest %.1f MiB)%s", _local_bytes(model.parameters()) / 2**20,
        sum(p.nbytes for p in template.parameters()) / 2**20, largest / 2**20,
        ", upcycled where the dense checkpoint provides it" if sources else "",
    )


def build_local_shards(config: Mapping[str, Any], distributed: Distributed, *, draw: bool = True) -> nn.Module:
    """The model of ``config`` laid out over the ranks (this rank's experts, FSDP's shards) on this rank's device, no
    rank ever holding the whole of it. ``draw=False`` (a run about to load its checkpoint): the pieces stay NaN."""
    model_cfg = config["model"]
    with torch.device("meta"):
        model = build_model(model_cfg, config["moe"], upcycle_weights=False)
    buffers = [name for name, _ in model.named_buffers()]
    if buffers:  # their values come from the constructor, which ran on the meta device
        raise ConfigError(f"trainer.init_device=meta: the model has buffers ({', '.join(buffers[:3])}), which "
                          "a meta-device build cannot restore; use trainer.init_device=cpu")
    template = copy.deepcopy(model) if draw else None  # unsharded, on the meta device
    model.set_grad_checkpointing(config["trainer"]["activation_checkpointing"])
    model = distributed.shard_model(model, broadcast=False)
    model.to_empty(device=distributed.device)
    with torch.no_grad():
        for param in model.parameters():  # a piece nothing writes stays NaN: the first save refuses it
            local_tensor(param).fill_(math.nan)
    if draw:
        source = model_cfg.get("upcycle_from")
        dense = None
        if source is not None:  # fitted as the default build's upcycle() fits it: a classifier keeps its (drawn) init
            dense = fit_dense_state(load_state_dict(os.path.expanduser(source)), template)
            log_changes(dense)
        initialise(model, template, device=distributed.device, seed=config["seed"], mesh=distributed.mesh,
                   dense=dense, noise_std=model_cfg.get("upcycle_noise_std", 0.0))
    else:
        log.info("trainer.init_device=meta: no weights drawn, the checkpoint provides them")
    return model
