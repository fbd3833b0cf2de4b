"""What the trainer tells its user beyond the metrics: the upcycling it did, each MoE block's final dispatch entropy,
and what to run next on the finished run.

    upcycled from dense.pth: every block's weights, and the experts of 2 MoE blocks [2, 3] start from their
        block's dense MLP, noise std 0.01
    final dispatch entropy (1 = uniform): block 2 0.52, block 3 0.66
    next: python -m softmoe.evaluate run_dir=outputs/runs/...       # validation and test accuracy, routing.pt
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from softmoe import block_index, moe_layers

from . import sharded_checkpoint
from .resume_hint import shown_path
from .rules import counted
from .telemetry import METRICS_FILE, json_lines

DISPATCH_ENTROPY = re.compile(r"^routing/block(\d+)/dispatch_entropy$")


def describe_upcycling(model_cfg: Mapping[str, Any], model: nn.Module) -> Optional[str]:
    """One line confirming sparse upcycling (``model.upcycle_from``), or None when the run starts from scratch."""
    source = model_cfg.get("upcycle_from")
    if source is None:
        return None
    blocks = sorted(block_index(name) for name in moe_layers(model))
    if not blocks:  # a dense ViT from a dense checkpoint: the upcycling study's dense arm
        return f"started from {source}: every weight (a dense ViT: no experts to upcycle)"
    return (
        f"upcycled from {source}: every block's weights, and the experts of {counted(len(blocks), 'MoE block')} "
        f"{blocks} start from their block's dense MLP, noise std {model_cfg.get('upcycle_noise_std', 0.0):g}"
    )


def final_dispatch_entropy(run_dir: Union[str, Path]) -> Optional[str]:
    """Each MoE block's last logged dispatch entropy (``metrics.jsonl``), in one line; None when none was logged."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return None
    last: dict[int, float] = {}
    for event in json_lines(path):
        for key, value in event.items():
            match = DISPATCH_ENTROPY.match(key)
            if match:
                last[int(match.group(1))] = value
    if not last:
        return None
    blocks = ", ".join(f"block {block} {last[block]:.2f}" for block in sorted(last))
    return f"final dispatch entropy (1 = uniform): {blocks}"


ROUTING_NOTEBOOK = "notebooks/routing_analysis.ipynb"
# this checkout's copy, named so that the printed command works from any directory (an install without the
# repository's notebooks/ prints ROUTING_NOTEBOOK, to run from a clone's root)
_CHECKOUT_NOTEBOOK = Path(__file__).resolve().parents[2] / ROUTING_NOTEBOOK


def next_steps(run_dir: Union[str, Path], routed: bool = True) -> list[str]:
    """The commands that look further at a finished single run, as a sweep's end names ``collect``; the routing
    notebook only for a model with a router (``routed``: not ``moe.placement=none``, where the notebook refuses)."""
    shown, absolute = shown_path(run_dir), str(Path(run_dir).resolve())
    source = shown_path(_CHECKOUT_NOTEBOOK) if _CHECKOUT_NOTEBOOK.is_file() else ROUTING_NOTEBOOK
    best = sharded_checkpoint.latest(run_dir, "best.pt")  # best.dcp under trainer.strategy=fsdp
    checkpoint = "SOFTMOE_CHECKPOINT=last " if best is None else ""  # the notebook loads best.pt unless told
    notebook = (
        f"cp {shlex.quote(source)} /tmp/ && {checkpoint}SOFTMOE_RUN_DIR={shlex.quote(absolute)} "
        "jupyter execute --inplace /tmp/routing_analysis.ipynb"
    )
    if best is None:  # data.val_size=0: nothing selected, no best.pt
        evaluate = f"python -m softmoe.evaluate run_dir={shlex.quote(shown)} checkpoint=last        # the final model's"
    else:
        evaluate = f"python -m softmoe.evaluate run_dir={shlex.quote(shown)}        # {best.name}'s validation and test"
    return [
        f"{evaluate} accuracy",
        *([f"{notebook}        # the routing notebook, headless"] if routed else []),
        f"python -m softmoe.collect {shlex.quote(shown)}        # results.md and results.png of this run",
    ]
