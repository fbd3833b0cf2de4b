"""Mixed precision: the one autocast helper the trainer, the evaluator and the benchmark use."""

from __future__ import annotations

import contextlib
import logging
from typing import Optional

import torch

from softmoe.runtime import cpu_has_native_bf16

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bf16"``, the name ``trainer.precision`` takes."""
    return {dtype: name for name, dtype in PRECISIONS.items()}[dtype]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` (``fp32``: none) on ``device``'s type. Matmuls run in bf16/fp16; the Soft
    MoE routing softmaxes stay in float32 (softmoe/layer.py)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def slow_precision_warning(device: torch.device, precision: str) -> Optional[str]:
    """The warning to give when ``precision`` will be slower than fp32 on ``device``, else None."""
    if device.type == "cpu" and precision == "bf16" and cpu_has_native_bf16() is False:
        return ("trainer.precision=bf16: this CPU has no native bf16 instructions (avx512_bf16, AMX or Arm bf16), "
                "so bf16 runs emulated and will be slower than fp32 here; use trainer.precision=fp32")
    return None


def warn_if_slow(device: torch.device, precision: str) -> None:
    message = slow_precision_warning(device, precision)
    if message:
        log.warning("%s", message)
