"""Several runs on one GPU: each process's share of the device's memory (``trainer.cuda_memory_fraction``).

    python -m softmoe.train -m experiment=fashion_converged trainer=gpu launcher=joblib launcher.n_jobs=5 \
        trainer.cuda_memory_fraction=0.19

Small models leave a large GPU idle between kernel launches; N processes on the one device fill those gaps.
Each caps its caching allocator at ``fraction`` of the device's memory, so a run that outgrows its share
fails alone with an out-of-memory error instead of starving the others. ``trainer.data_on_device=auto``
sizes its copy of the training split from the same share.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)


def cap_cuda_memory(device: torch.device, fraction: Optional[float]) -> None:
    """Limit this process to ``fraction`` of ``device``'s memory (no cap for None); a CPU run ignores it, so a
    GPU sweep's command also runs where there is none."""
    if fraction is None:
        return
    if device.type != "cuda":
        log.warning("trainer.cuda_memory_fraction=%s: ignored on %s (it caps a CUDA device's memory)", fraction, device)
        return
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def memory_share(device: torch.device, fraction: Optional[float]) -> Optional[int]:
    """The bytes of ``device``'s memory this process may use (None: not a CUDA device, no known limit)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory * (fraction or 1.0))
