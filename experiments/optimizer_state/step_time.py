"""AdamW's step alone on CPU, side by side: torch's for-loop and fused kernels (float32 moments) against
softmoe.optim.AdamW with bf16 moments, eager and compiled, over one Soft MoE S/16 block's expert bank
(128 experts x 2 x 384 x 1536 = 151 M parameters; the whole model's 923 M with four optimizers' state would not
fit in this machine's memory).

    python experiments/optimizer_state/step_time.py --rounds 5

Prints one JSON line: the median seconds of each, the ratio to torch's for-loop step (the CPU trainer's default)
per round, the bytes each must move per step and the load average before and after.
"""

import argparse
import json
import os

import torch

from softmoe.bench.environment import machine_info
from softmoe.bench.step_floor import ADAMW_BF16_STATE_BYTES_PER_PARAM, ADAMW_BYTES_PER_PARAM
from softmoe.bench.timing import at_least, interleaved, median, paired_ratio
from softmoe.optim import AdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=at_least(1), default=5)
    parser.add_argument("--experts", type=at_least(1), default=128)
    args = parser.parse_args()
    load = os.getloadavg()
    generator = torch.Generator().manual_seed(0)
    shapes = [(args.experts, 384, 1536), (args.experts, 1536), (args.experts, 1536, 384), (args.experts, 384)]
    optimizers = {}
    for name in ("torch_for_loop", "torch_fused", "bf16_eager", "bf16_compiled"):
        params = [torch.nn.Parameter(torch.randn(shape, generator=generator) * 0.02) for shape in shapes]
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator) * 1e-3
        if name.startswith("torch"):
            optimizers[name] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, foreach=False,
                                                 fused=name == "torch_fused")
        else:
            optimizers[name] = AdamW(params, lr=1e-4, weight_decay=0.05, compile=name == "bf16_compiled")
    times = interleaved({name: optimizer.step for name, optimizer in optimizers.items()}, args.rounds, 1,
                        torch.device("cpu"))
    count = sum(p.numel() for p in optimizers["torch_fused"].param_groups[0]["params"])
    print(json.dumps({
        "parameters": count, "rounds": args.rounds, "threads": torch.get_num_threads(),
        "seconds": {name: median(t["total"]) for name, t in times.items()},
        "over_torch_for_loop": {name: paired_ratio(t["total"], times["torch_for_loop"]["total"])
                                for name, t in times.items()},
        "bytes_per_step": {"float32_moments": ADAMW_BYTES_PER_PARAM * count,
                           "bf16_moments": ADAMW_BF16_STATE_BYTES_PER_PARAM * count},
        "load_average": [load[0], os.getloadavg()[0]], "machine": machine_info(torch.device("cpu"))}))


if __name__ == "__main__":
    main()
