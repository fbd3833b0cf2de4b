"""The suite's ``optimizer`` section: AdamW's step alone over Soft MoE's parameters, torch's fused kernel with
float32 moments against :class:`softmoe.optim.AdamW` with bf16 moments (compiled where the suite compiles), side
by side, each beside the bytes it must move at the measured copy bandwidth.

Reported, without a target: issue 18 lists bf16 optimizer state as a way to lower the training step's floor
(28 bytes per parameter become 20); ``experiments/optimizer_state/`` measures what it costs in accuracy.
"""

from __future__ import annotations

import torch

from ..optim import AdamW
from .model import build_benchmark_model, make_optimizer
from .step_floor import ADAMW_BF16_STATE_BYTES_PER_PARAM, ADAMW_BYTES_PER_PARAM
from .timing import interleaved, median, paired_ratio

BYTES_PER_PARAM = {"float32_fused": ADAMW_BYTES_PER_PARAM, "bf16_state": ADAMW_BF16_STATE_BYTES_PER_PARAM}


def optimizer_section(suite, shape) -> dict:
    """Both optimizers stepping the Soft MoE model of ``shape`` on the same gradients, in interleaved rounds."""
    torch.manual_seed(0)
    model = build_benchmark_model(shape, "soft_moe", suite.device)
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:  # small, so the weights stay finite however many rounds step them
        param.grad = torch.randn_like(param).mul_(1e-3)
    backend = suite.config.compile_backend
    compiled = backend is not None and not suite.past_budget("bf16-state AdamW")
    optimizers = {"float32_fused": make_optimizer(model, "fused"),
                  "bf16_state": AdamW(params, lr=1e-4, weight_decay=0.05, compile=backend if compiled else False)}
    times = interleaved({name: optimizer.step for name, optimizer in optimizers.items()}, suite.config.rounds,
                        suite.config.warmup, suite.device)
    count = sum(p.numel() for p in params)
    bandwidth = suite.peak["copy_bytes_per_s"]
    steps = {}
    for name, per_param in BYTES_PER_PARAM.items():
        seconds = median(times[name]["total"])
        steps[name] = {"seconds": seconds, "bytes": per_param * count, "floor_s": per_param * count / bandwidth,
                       "over_floor": seconds * bandwidth / (per_param * count)}
    result = {"model": shape.soft_moe_model, "parameters": count, "bf16_state_compiled": compiled, "steps": steps,
              "bf16_state_over_float32_fused": paired_ratio(times["bf16_state"]["total"],
                                                            times["float32_fused"]["total"])}
    del optimizers, model, params
    return result


def optimizer_lines(section: dict) -> list:
    how = "compiled" if section["bf16_state_compiled"] else "eager"
    labels = {"float32_fused": "torch AdamW fused, float32 moments", "bf16_state": f"softmoe AdamW bf16 moments, {how}"}
    lines = [f"optimizer step alone, {section['model']} ({section['parameters']:,} parameters):"]
    for name, step in section["steps"].items():
        lines.append(f"  {labels[name]:40} {1e3 * step['seconds']:8.1f} ms; floor {1e3 * step['floor_s']:.1f} ms "
                     f"({step['bytes'] / 1e9:.1f} GB) -> {step['over_floor']:.2f}x")
    lines.append(f"  bf16 moments / float32 fused: {section['bf16_state_over_float32_fused']:.2f}x the time")
    return lines
