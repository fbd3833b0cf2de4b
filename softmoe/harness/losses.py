"""The training objective: softmax cross-entropy (timm's, the default) or vmoe's sigmoid cross-entropy.

vmoe trains with ``sigmoid_xent``: each class an independent binary decision, the per-class losses summed over the
classes and averaged over the examples; with its head's bias initialised to -log(classes) every class starts near
probability 1/classes (``model.weight_init=jax_nlhb``). Evaluation reports softmax cross-entropy for either, so that
``val/loss`` and ``test/loss`` compare across runs of both objectives."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("softmax", "sigmoid")


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, loss: str = "softmax",
                        label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean over the batch of ``loss`` (see :data:`LOSSES`) of float logits [batch, classes] against int labels
    [batch]. Label smoothing spreads ``label_smoothing`` of each target's mass evenly over the classes, as
    ``F.cross_entropy`` does, for both."""
    if loss == "softmax":
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if loss != "sigmoid":
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    classes = logits.shape[-1]
    targets = F.one_hot(labels, classes).to(logits.dtype) * (1 - label_smoothing) + label_smoothing / classes
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(dim=-1).mean()
