"""Step time and memory per rank of one layout (DDP, EP, FSDP, FSDP+EP) at W CPU ranks, as one JSON line.

    torchrun --standalone --nproc_per_node=4 experiments/scale_out/measure.py --layout fsdp_ep --out results.jsonl

Every layout trains the same Soft MoE ViT (AdamW, clipping, float32) on the same global batch; run.sh runs each
layout 3 times and report.py writes the README's table from the JSON lines. Memory per rank: the bytes of this
rank's parameters, gradients and AdamW state (exact: the tensors it holds) and the process's peak resident memory
(everything: PyTorch, the interpreter, gloo buffers, activations).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from softmoe import SoftMoEVisionTransformer
from softmoe.bench.timing import at_least
from softmoe.harness import fsdp
from softmoe.parallel import (
    all_reduce_expert_grads,
    clip_grad_norm_,
    distributed_data_parallel,
    expert_data_mesh,
    to_expert_parallel,
)

MODEL = dict(img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=10, num_experts=32,
             slots_per_expert=1, moe_layer_index=(3, 4, 5))
LAYOUTS = ("ddp", "ep", "fsdp", "fsdp_ep")


def build(layout: str):
    """(the module to train, a function reducing and clipping the gradients after backward)."""
    torch.manual_seed(0)
    model = SoftMoEVisionTransformer(**MODEL)
    if layout == "ddp":
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        return ddp, lambda: torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
    if layout == "ep":  # every rank one group: the flat layout
        model = to_expert_parallel(model)
        ddp = distributed_data_parallel(model)
        return ddp, lambda: clip_grad_norm_(ddp, 1.0)
    mesh = None
    if layout == "fsdp_ep":  # 2 replicas x 2 expert ranks at 4 ranks
        mesh = expert_data_mesh("cpu", 2)
        model = to_expert_parallel(model, mesh["expert"].get_group(), data_group=mesh["data"].get_group())
    model = fsdp.shard_model(model, "cpu", expert_mesh=mesh)
    return model, lambda: fsdp.clip_grad_norm_(model, 1.0)


def local_bytes(tensors) -> int:
    total = 0
    for tensor in tensors:
        tensor = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += tensor.numel() * tensor.element_size()
    return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", choices=LAYOUTS, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-per-rank", type=at_least(1), default=16)
    parser.add_argument("--steps", type=at_least(1), default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, reduce_and_clip = build(args.layout)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    images = torch.randn(args.batch_per_rank, 3, 32, 32, generator=generator)
    labels = torch.randint(0, 10, (args.batch_per_rank,), generator=generator)
    seconds = []
    for step in range(args.steps + 2):  # 2 warm-up steps
        dist.barrier()
        started = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        if args.layout == "ep":
            all_reduce_expert_grads(model)  # nothing to do on the flat layout; kept for the step's shape
        reduce_and_clip()
        optimizer.step()
        dist.barrier()
        seconds.append(time.perf_counter() - started)
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    row = {
        "layout": args.layout, "rank": rank, "world_size": world_size, "batch_per_rank": args.batch_per_rank,
        "step_seconds": statistics.median(seconds[2:]),
        "parameters_mib": local_bytes(params) / 2**20,
        "gradients_mib": local_bytes(p.grad for p in params if p.grad is not None) / 2**20,
        "optimizer_mib": local_bytes(state) / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "load_average": os.getloadavg()[0],
    }
    append_rows(row, args.out)
    dist.destroy_process_group()


def append_rows(row: dict, out: str) -> None:
    """Every rank's ``row``, appended by rank 0 to ``out`` as JSON lines, in rank order. Collective."""
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, row)
    if dist.get_rank() == 0:
        with open(out, "a") as file:
            for each in rows:
                file.write(json.dumps(each) + "\n")


if __name__ == "__main__":
    main()
