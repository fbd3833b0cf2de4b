"""Memory and time of building the model through the trainer (``build_state``) at W CPU ranks under FSDP + expert
parallelism, with ``trainer.init_device=cpu`` (every rank builds the whole model, then keeps its part) or ``meta``
(built on the meta device, each rank draws only its pieces), as one JSON line per rank.

    torchrun --standalone --nproc_per_node=2 experiments/scale_out/measure_init.py --init-device meta --out init.jsonl

The model: Soft MoE S/4 at 32 px with 32 experts in blocks 6-11 (250 M parameters, 0.93 GiB in float32). Peak RSS is
the process's high-water mark (``ru_maxrss``): before the build (PyTorch, gloo, Hydra imported) and after it.
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path

import torch
import torch.distributed as dist
from hydra import compose, initialize_config_dir

from softmoe.bench.timing import at_least
from softmoe.harness.distributed import Distributed
from softmoe.harness.model import build_model
from softmoe.harness.rules import plain
from softmoe.harness.state import build_state

from measure import append_rows, local_bytes  # this folder's (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[2]
OVERRIDES = [
    "model=vit_small", "data=synthetic", "data.img_size=32", "model.patch_size=4", "trainer.strategy=fsdp",
    "scheduler=constant",
]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--init-device", choices=("cpu", "meta"), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--num-experts", type=at_least(1), default=32, help="per MoE block (the README's runs: 32)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    world_size = int(os.environ["WORLD_SIZE"])
    overrides = [*OVERRIDES, f"moe.num_experts={args.num_experts}", f"trainer.expert_parallel_size={world_size}",
                 f"trainer.init_device={args.init_device}"]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        config = plain(compose("train", overrides=overrides))
    distributed = Distributed.from_config(config)  # joins torchrun's process group
    dist.barrier()
    before = peak_rss_mib()
    started = time.perf_counter()
    model = build_state(config, distributed, total_steps=1)[0].model
    dist.barrier()
    seconds = time.perf_counter() - started
    pieces = local_bytes(model.parameters())
    with torch.device("meta"):  # the whole model's size, from its shapes
        whole = sum(p.nbytes for p in build_model(config["model"], config["moe"], upcycle_weights=False).parameters())
    row = {
        "init_device": args.init_device, "rank": distributed.rank, "world_size": world_size,
        "build_seconds": seconds, "model_mib": whole / 2**20, "pieces_mib": pieces / 2**20,
        "rss_before_build_mib": before, "peak_rss_mib": peak_rss_mib(), "load_average": os.getloadavg()[0],
    }
    append_rows(row, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
