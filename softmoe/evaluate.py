"""Evaluate a finished (or running) training run, and save its routing for the notebooks.

    python -m softmoe.evaluate run_dir=outputs/runs/2025-01-01/12-00-00
    python -m softmoe.evaluate run_dir=... checkpoint=last save_routing=true

The run is rebuilt from its checkpoint alone: the resolved config saved inside it and the weights.
Results go to ``<run_dir>/evaluate/``: ``evaluation.json`` and, with ``save_routing=true``, ``routing.pt``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from softmoe import capture_routing
from softmoe.harness.checkpoint import CheckpointError, load_checkpoint, saved_config
from softmoe.harness.config import ConfigError, resolve_device
from softmoe.harness.data import build_datasets, build_loader
from softmoe.harness.loop import evaluate
from softmoe.harness.model import build_model
from softmoe.train import USER_ERRORS

log = logging.getLogger("softmoe.evaluate")


def evaluate_run(
    run_dir: Path,
    output_dir: Path,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    batch_size: Optional[int] = None,
    data_dir: Optional[str] = None,
    save_routing: bool = False,
    routing_examples: int = 16,
) -> dict[str, Any]:
    """Test metrics of ``<run_dir>/<checkpoint>.pt``; writes ``evaluation.json`` (and ``routing.pt``) to ``output_dir``."""
    if checkpoint not in ("best", "last"):
        raise ConfigError(f"checkpoint={checkpoint}: must be best or last")
    path = Path(run_dir) / f"{checkpoint}.pt"
    if not path.is_file():
        raise CheckpointError(f"run_dir={run_dir}: holds no {checkpoint}.pt (is it a training run directory?)")
    state = load_checkpoint(path)
    config = OmegaConf.create(saved_config(state))
    torch_device = resolve_device(device)

    data = build_datasets(config.data, data_dir or config.paths.data_dir)
    model = build_model(config.model, config.moe)
    model.load_state_dict(state["model"])
    model.to(torch_device).eval()
    loader = build_loader(data.test, batch_size or config.trainer.eval_batch_size, train=False)
    metrics = evaluate(model, loader, torch_device, config.trainer.precision)
    result = {
        "checkpoint": str(path),
        "step": state["step"],
        "test/loss": metrics["loss"],
        "test/acc": metrics["acc"],
        "test/examples": len(data.test),
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")

    if save_routing:
        images, labels = next(iter(build_loader(data.test, routing_examples, train=False)))
        with torch.no_grad(), capture_routing(model) as records:
            logits = model(images.to(torch_device))
        routing = {
            "images": images,  # [b, C, H, W], as the model saw them (normalised)
            "labels": labels,  # [b]
            "predictions": logits.argmax(dim=-1).cpu(),  # [b]
            # module name (e.g. "blocks.2.mlp") -> weights [b, tokens, experts, slots_per_expert]
            "dispatch": {name: record.dispatch.cpu() for name, record in records.items()},
            "combine": {name: record.combine.cpu() for name, record in records.items()},
            "config": state["config"],  # the run's resolved config, a JSON string
            "step": state["step"],
        }
        torch.save(routing, output_dir / "routing.pt")
        result["routing"] = str(output_dir / "routing.pt")
    return result


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    try:
        result = evaluate_run(
            Path(cfg.run_dir),
            Path(HydraConfig.get().runtime.output_dir),
            checkpoint=cfg.checkpoint,
            device=cfg.device,
            batch_size=cfg.batch_size,
            data_dir=cfg.data_dir,
            save_routing=cfg.save_routing,
            routing_examples=cfg.routing_examples,
        )
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    log.info(
        "%s (step %d): test accuracy %.2f%%, test loss %.4f on %d images",
        result["checkpoint"],
        result["step"],
        100 * result["test/acc"],
        result["test/loss"],
        result["test/examples"],
    )
    if "routing" in result:
        log.info("routing weights saved to %s", result["routing"])
    return result["test/acc"]


if __name__ == "__main__":
    main()
