"""Memory per rank of each way to lay a training run out over W GPUs: what ``python -m softmoe.plan`` prints.

The model is built on the meta device (no memory, real shapes), so the counts below follow the real parameters:

- **Exact** (checked against the real tensors in ``tests/test_plan.py``): parameters, gradients and optimizer
  state, in float32 as the trainer keeps them (``trainer.precision=bf16`` is autocast: the weights stay float32).
  AdamW holds two moments and a float32 ``step`` per tensor, SGD with momentum one buffer.
- **Estimated**: activations saved for the backward pass (an element count per block, below), DDP's gradient
  buckets (one float32 copy of the gradients it averages) and, under bf16/fp16 autocast, the half-precision copy of
  each of the rank's weights the step computes with, and FSDP's working set (the largest block unsharded, twice for
  prefetching, in bf16 under ``trainer.precision=bf16`` as FSDP's mixed-precision policy gathers it, plus its
  float32 unsharded gradient; with ``trainer.reshard_after_forward=false`` every block's parameters stay gathered
  from the forward to the backward, plus the largest block's gradient).

Layouts, with ``E`` ranks per expert group (``trainer.expert_parallel_size``) and ``W`` ranks in all:

- ``DDP``: every rank holds everything.
- ``EP E``: each rank holds ``num_experts / E`` experts of every MoE layer; everything else is replicated.
- ``FSDP``: every tensor is split along its first dimension over the ``W`` ranks, as FSDP2's ``fully_shard``
  does (``ceil(rows / W)`` rows on each rank, the last ranks padded).
- ``FSDP+EP E``: the experts split over ``E`` ranks, and each expert shard split again over the ``W / E``
  data-parallel replicas; the other tensors split over all ``W`` ranks (torchtitan's layout). The same state per
  rank as ``FSDP``, but the working set gathers only ``1 / E`` of a block's experts.

Activation elements saved per image, for a block of ``t`` tokens, width ``d``, MLP width ``h``, ``a`` heads and
(Soft MoE) ``s = num_experts x slots_per_expert`` slots, with fused attention (no ``t x t`` score matrix):
attention ``6td`` (norm input and output, q, k, v, attention output); a dense MLP ``2td + 2th``; a Soft MoE MLP
``3td + 3ts + 2sd + 2sh`` (norm, normalised tokens, logits, dispatch and combine weights, slots, expert hidden
activations, expert outputs). Bytes per element: 4 in fp32; 2 under bf16/fp16 autocast, but 4 for what autocast
keeps in float32: each block's two norm inputs (the residual stream) and, in a Soft MoE block, the normalised tokens
and the routing's ``3ts`` (its softmaxes run in float32). With
``trainer.activation_checkpointing`` (each block recomputed in the backward pass) a block keeps only its input,
``td``, and one block's activations are alive at a time, while it is recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import torch
from torch import nn

from softmoe.capture import moe_layers

from .model import build_model, moe_blocks, num_tokens
from .rules import counted

GIB = 1024**3
FLOAT32 = 4
STRATEGIES = ("ddp", "ep", "fsdp", "fsdp+ep")


@dataclass(frozen=True)
class Layout:
    strategy: str  # one of STRATEGIES
    expert_parallel_size: int = 1

    def __str__(self) -> str:
        name = {"ddp": "DDP", "ep": "EP", "fsdp": "FSDP", "fsdp+ep": "FSDP+EP"}[self.strategy]
        return f"{name} {self.expert_parallel_size}" if "ep" in self.strategy else name


@dataclass
class RankMemory:
    """Bytes on one rank (the most loaded one: FSDP pads the last shards, rank 0 holds full ones)."""

    layout: Layout
    parameters: int
    gradients: int
    optimizer: int
    activations: int  # estimate
    buffers: int  # estimate: DDP's buckets or FSDP's unsharded working set

    @property
    def state(self) -> int:
        """Parameters, gradients and optimizer state: the exact part."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.activations + self.buffers


@dataclass
class ModelShapes:
    """The parameter shapes of a model by block, the experts' apart, and what its activations depend on."""

    replicated: list[torch.Size]  # every parameter that is not an expert's
    experts: list[torch.Size]  # expert parameters, each leading with num_experts
    block_params: list[tuple[list[torch.Size], list[torch.Size]]]  # per block: (replicated, experts)
    tokens: int
    width: int
    mlp_width: int
    slots: int  # num_experts x slots_per_expert
    moe_block_count: int
    depth: int
    num_experts: int
    activation_bytes: int  # per element
    optimizer_states: int  # per-element buffers: AdamW 2, SGD with momentum 1
    optimizer_state_bytes: int  # bytes per element of each: 4, or 2 for optimizer.state_dtype=bfloat16
    optimizer_scalars: bool  # a float32 `step` per tensor (Adam)
    activation_checkpointing: bool = False  # trainer.activation_checkpointing: each block recomputed in backward
    reshard_after_forward: bool = True  # trainer.reshard_after_forward (FSDP): gathered blocks freed after forward

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(shape) for shape in [*self.replicated, *self.experts])


def model_shapes(config: Mapping[str, Any]) -> ModelShapes:
    """The shapes of the run ``config`` (a resolved train config) describes, from a model built on the meta device."""
    model_cfg, moe_cfg = config["model"], config["moe"]
    with torch.device("meta"):
        model = build_model(model_cfg, moe_cfg, upcycle_weights=False)
    return shapes_of(model, config)


def shapes_of(model: nn.Module, config: Mapping[str, Any]) -> ModelShapes:
    """:class:`ModelShapes` of a built (single-process) ``model`` trained as ``config`` says."""
    model_cfg, moe_cfg, optimizer = config["model"], config["moe"], config["optimizer"]
    expert_ids = {id(p) for layer in moe_layers(model).values() for p in _experts_of(layer).parameters()}
    replicated = [p.shape for p in model.parameters() if id(p) not in expert_ids]
    experts = [p.shape for p in model.parameters() if id(p) in expert_ids]
    block_params = [
        (
            [p.shape for p in block.parameters() if id(p) not in expert_ids],
            [p.shape for p in block.parameters() if id(p) in expert_ids],
        )
        for block in getattr(model, "blocks", [])
    ]
    target = optimizer["_target_"].rsplit(".", 1)[-1].lower()
    adam = "adam" in target
    return ModelShapes(
        replicated=replicated,
        experts=experts,
        block_params=block_params,
        tokens=num_tokens(model_cfg),
        width=model_cfg["embed_dim"],
        mlp_width=int(model_cfg["embed_dim"] * model_cfg["mlp_ratio"]),
        slots=moe_cfg["num_experts"] * moe_cfg["slots_per_expert"],
        moe_block_count=len(moe_blocks(moe_cfg, model_cfg["depth"])),
        depth=model_cfg["depth"],
        num_experts=moe_cfg["num_experts"],
        activation_bytes=FLOAT32 if config["trainer"]["precision"] == "fp32" else 2,
        optimizer_states=2 if adam else int(bool(optimizer.get("momentum", 0))),
        optimizer_scalars=adam,
        optimizer_state_bytes=2 if optimizer.get("state_dtype") == "bfloat16" else FLOAT32,
        activation_checkpointing=bool(config["trainer"].get("activation_checkpointing", False)),
        reshard_after_forward=bool(config["trainer"].get("reshard_after_forward", True)),
    )


def _experts_of(layer: nn.Module) -> nn.Module:
    experts = getattr(layer, "experts", None)
    return experts if isinstance(experts, nn.Module) else nn.Module()


def _numel(shape: torch.Size, shards: int = 1) -> int:
    """Elements of the largest shard when ``shape`` is split along its first dimension into ``shards``
    (FSDP2's padded chunks: ``ceil(rows / shards)`` rows each); a 0-d tensor is one row."""
    rows, rest = (shape[0], math.prod(shape[1:])) if len(shape) else (1, 1)
    return math.ceil(rows / shards) * rest


def _state_bytes(shapes: ModelShapes, elements: int, tensors: int) -> tuple[int, int, int]:
    """(parameter, gradient, optimizer) bytes of ``tensors`` float32 tensors of ``elements`` in all."""
    step_counters = tensors * FLOAT32 if shapes.optimizer_scalars else 0
    optimizer = shapes.optimizer_states * elements * shapes.optimizer_state_bytes + step_counters
    return elements * FLOAT32, elements * FLOAT32, optimizer


def activation_elements_per_image(shapes: ModelShapes) -> int:
    """Activation elements kept for the backward pass per image (see the module docstring)."""
    t, d, h, s = shapes.tokens, shapes.width, shapes.mlp_width, shapes.slots
    attention = 6 * t * d
    dense_mlp = 2 * t * d + 2 * t * h
    moe_mlp = 3 * t * d + 3 * t * s + 2 * s * d + 2 * s * h
    dense_blocks = shapes.depth - shapes.moe_block_count
    if shapes.activation_checkpointing:  # every block's input, and the one block being recomputed
        largest = attention + (moe_mlp if shapes.moe_block_count else dense_mlp if dense_blocks else 0)
        return shapes.depth * t * d + largest
    return shapes.depth * attention + dense_blocks * dense_mlp + shapes.moe_block_count * moe_mlp


def float32_elements_per_image(shapes: ModelShapes) -> int:
    """Of :func:`activation_elements_per_image`, those autocast keeps in float32: each block's two norm inputs (the
    residual stream), and in a Soft MoE block the normalised tokens and the routing's logits, dispatch and combine
    weights (its softmaxes run in float32)."""
    t, d, s = shapes.tokens, shapes.width, shapes.slots
    block, moe_routing = 2 * t * d, t * d + 3 * t * s
    if shapes.activation_checkpointing:  # every block's input, and the fp32 part of the block being recomputed
        return shapes.depth * t * d + block + (moe_routing if shapes.moe_block_count else 0)
    return shapes.depth * block + shapes.moe_block_count * moe_routing


def activation_bytes_per_image(shapes: ModelShapes) -> int:
    """Bytes of the activations kept per image: every element at ``activation_bytes``, but the float32 ones under
    autocast (:func:`float32_elements_per_image`)."""
    elements = activation_elements_per_image(shapes)
    if shapes.activation_bytes == FLOAT32:
        return elements * FLOAT32
    kept = float32_elements_per_image(shapes)
    return (elements - kept) * shapes.activation_bytes + kept * FLOAT32


def rank_memory(shapes: ModelShapes, layout: Layout, world_size: int, batch_size: int) -> RankMemory:
    """The memory of the most loaded rank when ``world_size`` ranks train with a global ``batch_size``."""
    e, w = layout.expert_parallel_size, world_size
    sharded = layout.strategy in ("fsdp", "fsdp+ep")
    # elements on this rank: replicated tensors, then experts
    if layout.strategy == "ddp":
        replicated, experts = [_numel(s) for s in shapes.replicated], [_numel(s) for s in shapes.experts]
    elif layout.strategy == "ep":
        replicated, experts = [_numel(s) for s in shapes.replicated], [_numel(s) // e for s in shapes.experts]
    elif layout.strategy == "fsdp":
        replicated, experts = [_numel(s, w) for s in shapes.replicated], [_numel(s, w) for s in shapes.experts]
    else:  # fsdp+ep: experts over E, then each shard over the W / E replicas
        replicated = [_numel(s, w) for s in shapes.replicated]
        experts = [_numel(torch.Size([s[0] // e, *s[1:]]), w // e) for s in shapes.experts]
    elements, tensors = sum(replicated) + sum(experts), len(replicated) + len(experts)
    parameters, gradients, optimizer = _state_bytes(shapes, elements, tensors)

    low_precision = shapes.activation_bytes < FLOAT32  # bf16 / fp16 autocast
    if sharded:  # the largest block gathered (this block and the prefetched next one), and its full gradient
        gathered = [sum(map(_numel, rep)) + sum(_numel(s) // e for s in exp) for rep, exp in shapes.block_params]
        largest = max(gathered, default=0)
        # gathered in the policy's param_dtype (bf16 under trainer.precision=bf16); gradients reduced in float32
        gathered_bytes = shapes.activation_bytes if low_precision else FLOAT32
        # reshard_after_forward=false: every block stays gathered from its forward to its backward
        buffers = (2 * largest if shapes.reshard_after_forward else sum(gathered)) * gathered_bytes + largest * FLOAT32
    else:  # DDP's buckets: a copy of the gradients it averages (under EP, the replicated ones)
        buffers = (sum(replicated) + (sum(experts) if layout.strategy == "ddp" else 0)) * FLOAT32
        # autocast's half-precision copy of each weight for the step (the experts' kept per optimizer step)
        buffers += elements * shapes.activation_bytes if low_precision else 0
    local_batch = math.ceil(batch_size / w)
    activations = local_batch * activation_bytes_per_image(shapes)
    return RankMemory(layout, parameters, gradients, optimizer, activations, buffers)


def spans_nodes(expert_parallel_size: int, world_size: int, gpus_per_node: int) -> bool:
    """Whether an expert group of consecutive ranks crosses a node boundary: never when the whole world is one node
    (6 ranks of 8 GPUs per node, in groups of 3), else when the group size does not divide the node."""
    return world_size > gpus_per_node and gpus_per_node % expert_parallel_size != 0


def feasible_layouts(num_experts: int, world_size: int, gpus_per_node: int, moe: bool = True) -> list[Layout]:
    """Every layout of ``world_size`` ranks, in the order the planner prefers them, the least communication first:
    DDP (one gradient all-reduce); EP inside a node (the all_to_all on the node's links); FSDP+EP inside a node
    (parameters gathered every step, but only 1 / E of the experts); FSDP (every rank gathers every expert); then
    expert groups that span nodes. Smaller expert groups first within each. An expert group's size must divide
    the world and ``num_experts``; E = 1 is DDP (or FSDP)."""
    sizes = [e for e in range(2, world_size + 1) if world_size % e == 0 and num_experts % e == 0] if moe else []
    in_node = [e for e in sizes if not spans_nodes(e, world_size, gpus_per_node)]
    across = [e for e in sizes if spans_nodes(e, world_size, gpus_per_node)]
    return [
        Layout("ddp"),
        *(Layout("ep", e) for e in in_node),
        *(Layout("fsdp+ep", e) for e in in_node),
        Layout("fsdp"),
        *(Layout("ep", e) for e in across),
        *(Layout("fsdp+ep", e) for e in across),
    ]


@dataclass
class Plan:
    world_size: int
    gpus_per_node: int
    gpu_memory_gb: float
    batch_size: int
    shapes: ModelShapes
    rows: list[RankMemory] = field(default_factory=list)
    usable_fraction: float = 0.9  # kept free for the CUDA context, the allocator's fragmentation, NCCL

    @property
    def usable_bytes(self) -> float:
        return self.usable_fraction * self.gpu_memory_gb * GIB

    def fits(self, row: RankMemory) -> bool:
        return row.total <= self.usable_bytes

    @property
    def recommended(self) -> Optional[RankMemory]:
        return next((row for row in self.rows if self.fits(row)), None)


def make_plan(
    shapes: ModelShapes, world_size: int, batch_size: int, gpu_memory_gb: float, gpus_per_node: int = 8
) -> Plan:
    plan = Plan(world_size, gpus_per_node, gpu_memory_gb, batch_size, shapes)
    for layout in feasible_layouts(shapes.num_experts, world_size, gpus_per_node, moe=bool(shapes.experts)):
        plan.rows.append(rank_memory(shapes, layout, world_size, batch_size))
    return plan


def _count(value: int) -> str:
    return f"{value / 1e9:.3f} B" if value >= 1e9 else f"{value / 1e6:.1f} M"


def format_plan(plan: Plan, title: str) -> str:
    """The plan as a Markdown table, and its recommendation."""
    shapes = plan.shapes
    unit, size = ("GiB", GIB) if max(row.total for row in plan.rows) >= GIB else ("MiB", 1024**2)
    lines = [
        f"### {title}: {counted(plan.world_size, 'GPU')} of {plan.gpu_memory_gb:g} GB ({plan.gpus_per_node} per node), "
        f"global batch {plan.batch_size}",
        "",
        f"{_count(shapes.num_parameters)} parameters ({_count(sum(map(math.prod, shapes.experts)))} in "
        f"experts, {counted(shapes.moe_block_count, 'MoE block')} of {counted(shapes.num_experts, 'expert')}); "
        f"{counted(math.ceil(plan.batch_size / plan.world_size), 'image')} per rank.",
        "",
        f"{unit} per rank, most preferred layout first:",
        "",
        "| layout | parameters | gradients | optimizer | activations (est.) | buffers (est.) | total | fits |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in plan.rows:
        cells = [row.parameters, row.gradients, row.optimizer, row.activations, row.buffers, row.total]
        spans = row.layout.expert_parallel_size > 1 and spans_nodes(row.layout.expert_parallel_size,
                                                                   plan.world_size, plan.gpus_per_node)
        name = f"{row.layout}{' (spans nodes)' if spans else ''}"
        figures = " | ".join(f"{cell / size:.2f}" for cell in cells)
        lines.append(f"| {name} | {figures} | {'yes' if plan.fits(row) else 'no'} |")
    best = plan.recommended
    lines.append("")
    if best is None:
        checkpointing = "" if shapes.activation_checkpointing else ", or trainer.activation_checkpointing=true"
        lines.append(
            f"Nothing fits in {plan.usable_fraction:.0%} of {plan.gpu_memory_gb:g} GB: use more GPUs or a smaller "
            f"batch per GPU{checkpointing}."
        )
    else:
        lines.append(f"Recommended: **{best.layout}** ({best.total / size:.2f} {unit} per rank).")
    whole = next(row.parameters for row in plan.rows if row.layout.strategy == "ddp")  # every parameter, fp32
    if whole > plan.usable_bytes:
        # trainer.init_device=cpu builds the whole model on every rank (then moves it to the GPU) before sharding
        lines.append(
            f"Build it with trainer.init_device=meta: the whole model's parameters alone ({whole / GIB:.2f} GiB) do "
            "not fit on one GPU, and the default trainer.init_device=cpu builds the whole model on every rank "
            "before sharding it (docs/scale_out.md)."
        )
    return "\n".join(lines)
