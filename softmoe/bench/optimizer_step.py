"""The suite's ``optimizer`` section: AdamW's step over Soft MoE's parameters, each followed by what the next
forward must do to the expert banks' bf16 copies, side by side, each beside the bytes it must move at the measured
copy bandwidth:

* ``float32_fused``: torch's fused AdamW (the trainer's ``trainer=gpu`` choice), after which the banks recast their
  copies (read 4 bytes, write 2 per expert weight);
* ``float32_writes_copies``: :class:`softmoe.optim.AdamW` with float32 moments, compiled, writing the copies in its
  update (2 bytes per expert weight), so nothing is recast;
* ``bf16_state``: the same with bf16 moments (20 bytes per parameter instead of 28).

Reported, without a target: issue 18 lists both as ways to lower the training step's floor;
``experiments/optimizer_state/`` measures what bf16 moments cost in accuracy.
"""

from __future__ import annotations

import torch

from ..experts import BatchedMlp
from ..optim import AdamW
from .model import build_benchmark_model, make_optimizer
from .step_floor import (
    ADAMW_BF16_STATE_BYTES_PER_PARAM,
    ADAMW_BYTES_PER_PARAM,
    CAST_BYTES_PER_PARAM,
    COPY_WRITE_BYTES,
    parameter_counts,
)
from .timing import interleaved, median, paired_ratio

# bytes per parameter, and per expert weight that a bank keeps a bf16 copy of
BYTES = {"float32_fused": (ADAMW_BYTES_PER_PARAM, CAST_BYTES_PER_PARAM),
         "float32_writes_copies": (ADAMW_BYTES_PER_PARAM, COPY_WRITE_BYTES),
         "bf16_state": (ADAMW_BF16_STATE_BYTES_PER_PARAM, COPY_WRITE_BYTES)}
LABELS = {"float32_fused": "torch AdamW fused + the banks' recast", "float32_writes_copies":
          "softmoe AdamW float32, writes the copies", "bf16_state": "softmoe AdamW bf16 moments, writes the copies"}


def _banks(model):
    return [module for module in model.modules() if isinstance(module, BatchedMlp)]


def _refresh_copies(banks, device) -> None:
    """What the next autocast forward does to the banks' copies: recast each one the step left stale."""
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        for bank in banks:
            for name in bank.WEIGHT_NAMES:
                bank.compute_weight(name)


def optimizer_section(suite, shape) -> dict:
    """The three optimizers stepping the Soft MoE model of ``shape`` on the same gradients, in interleaved rounds,
    each step followed by the copies' refresh."""
    torch.manual_seed(0)
    model = build_benchmark_model(shape, "soft_moe", suite.device)
    params = [p for p in model.parameters() if p.requires_grad]
    for param in params:  # small, so the weights stay finite however many rounds step them
        param.grad = torch.randn_like(param).mul_(1e-3)
    banks = _banks(model)
    _refresh_copies(banks, suite.device)  # the banks keep their copies from here on
    backend = suite.config.compile_backend
    compiled = backend is not None and not suite.past_budget("softmoe AdamW")
    optimizers = {"float32_fused": make_optimizer(model, "fused")}
    for name, state_dtype in (("float32_writes_copies", "float32"), ("bf16_state", "bfloat16")):
        optimizers[name] = AdamW(params, lr=1e-4, weight_decay=0.05, state_dtype=state_dtype,
                                 compile=backend if compiled else False)

    def stepping(optimizer):
        def step():
            optimizer.step()
            _refresh_copies(banks, suite.device)
        return step

    times = interleaved({name: stepping(optimizer) for name, optimizer in optimizers.items()}, suite.config.rounds,
                        suite.config.warmup, suite.device)
    counts = parameter_counts(model, expert_grads_written_in_float32=True)
    count, copied = counts.total, counts.expert_weights
    bandwidth = suite.peak["copy_bytes_per_s"]
    steps = {}
    for name, (per_param, per_copy) in BYTES.items():
        seconds, moved = median(times[name]["total"]), per_param * count + per_copy * copied
        steps[name] = {"seconds": seconds, "bytes": moved, "floor_s": moved / bandwidth,
                       "over_floor": seconds * bandwidth / moved}
    fused = times["float32_fused"]["total"]
    result = {"model": shape.soft_moe_model, "parameters": count, "expert_weights_copied": copied,
              "compiled": compiled, "steps": steps,
              "over_float32_fused": {name: paired_ratio(times[name]["total"], fused) for name in BYTES
                                     if name != "float32_fused"}}
    del optimizers, model, params
    return result


def optimizer_lines(section: dict) -> list:
    how = "compiled" if section["compiled"] else "eager"
    lines = [f"optimizer step + the expert copies' refresh, {section['model']} ({section['parameters']:,} parameters,"
             f" {section['expert_weights_copied']:,} in bf16 copies; softmoe AdamW {how}):"]
    for name, step in section["steps"].items():
        lines.append(f"  {LABELS[name]:46} {1e3 * step['seconds']:8.1f} ms; floor {1e3 * step['floor_s']:.1f} ms "
                     f"({step['bytes'] / 1e9:.1f} GB) -> {step['over_floor']:.2f}x")
    for name, ratio in section["over_float32_fused"].items():
        lines.append(f"  {LABELS[name]} / torch fused: {ratio:.2f}x the time")
    return lines
