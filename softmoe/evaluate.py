"""Evaluate a finished (or running) training run, and save its routing for the notebooks.

    python -m softmoe.evaluate run_dir=outputs/runs/2025-01-01/12-00-00
    python -m softmoe.evaluate run_dir=... checkpoint=last save_routing=true

The run is rebuilt from its checkpoint alone: the resolved config saved inside it and the weights.
Results go to ``<run_dir>/evaluate/``: ``evaluation_<checkpoint>_step<step>.json`` (one per checkpoint, so a
second evaluation keeps the first; ``..._all_images.json`` for ``images=all`` of a run that evaluated a subset)
and, with ``save_routing=true``, ``routing.pt`` (validation images).
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.utils.data import Dataset, Subset

from softmoe import capture_routing
from softmoe.harness.data import build_loader
from softmoe.harness.config import check_evaluate
from softmoe.harness.errors import (USER_ERRORS, CheckpointWriteError, ConfigError, MissingDataError, run_command,
                                    write_failure)
from softmoe.harness.loop import evaluate
from softmoe.harness.output_dirs import no_directory_reason, output_dir
from softmoe.harness.overrides import compose_config, composition_error
from softmoe.harness.plausibility import CONF_DIR
from softmoe.harness.rules import counted, plain
from softmoe.harness.runs import checkpoint_path, load_run
from softmoe.harness.whole_files import replaced_whole

log = logging.getLogger("softmoe.evaluate")


def evaluate_run(
    run_dir: Path,
    output_dir: Path,
    *,
    checkpoint: str = "best",
    device: str = "auto",
    batch_size: Optional[int] = None,
    images: str = "run",
    data_dir: Optional[str] = None,
    data_root: Optional[str] = None,
    save_routing: bool = False,
    routing_examples: int = 16,
) -> dict[str, Any]:
    """Validation and test metrics of ``<run_dir>/<checkpoint>.pt`` (``best``: the best-on-validation checkpoint,
    ``last``: the final model); writes ``evaluation_<checkpoint>_step<step>.json`` (and ``routing.pt``) to
    ``output_dir``. ``images="run"`` evaluates the images the run evaluated (the first ``trainer.eval_batches`` x
    ``trainer.eval_batch_size`` of each split where it set ``eval_batches``), whatever ``batch_size``: the figures
    are then the run's own; ``"all"`` every image of each split.

    The routing saved for the notebooks is that of validation images: looking inside the model selects nothing,
    but it need not read the test split either."""
    check_evaluate({"checkpoint": checkpoint, "device": device, "batch_size": batch_size, "images": images,
                    "data_dir": data_dir, "data_root": data_root, "save_routing": save_routing,
                    "routing_examples": routing_examples})
    try:
        run = load_run(run_dir, checkpoint, device=device, data_dir=data_dir, data_root=data_root)
    except MissingDataError as error:  # its remedy is train's (data.root=...), a key evaluate does not take
        raise MissingDataError(f"{error} (evaluate reads the run's saved config: name the folder that holds the "
                               "files now with data_root=<folder>)") from None
    # the images evaluated: the run's (its trainer.eval_batches, null for every image) or all
    result = {"checkpoint": str(run.checkpoint), "step": run.step, "images": images,
              "eval_batches": run.cfg.trainer.get("eval_batches") if images == "run" else None}
    for split, dataset in (("val", run.data.val), ("test", run.data.test)):
        if dataset is None:  # data.val_size=0
            continue
        if images == "run":
            dataset = the_runs_images(dataset, run.cfg.trainer)
        loader = build_loader(dataset, batch_size or run.cfg.trainer.eval_batch_size, train=False)
        metrics = evaluate(run.model, loader, run.device, run.cfg.trainer.precision)
        result.update(
            {f"{split}/loss": metrics["loss"], f"{split}/acc": metrics["acc"], f"{split}/examples": len(dataset)}
        )
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # one file per checkpoint and step: evaluating best.pt, then last.pt (or best.pt again after it moved) keeps both;
    # and per set of images, where the run evaluated a subset (images=all overwrote the run's figures)
    every_image = "_all_images" if images == "all" and run.cfg.trainer.get("eval_batches") is not None else ""
    result_file = output_dir / f"evaluation_{Path(run.checkpoint).stem}_step{run.step}{every_image}.json"
    write_result(result_file, lambda path: path.write_text(json.dumps(result, indent=2) + "\n"))
    result["file"] = str(result_file)

    if save_routing:
        shown = run.data.val if run.data.val is not None else run.data.test
        images, labels = next(iter(build_loader(shown, routing_examples, train=False)))
        with torch.no_grad(), capture_routing(run.model) as records:
            logits = run.model(images.to(run.device))
        routing = {
            "images": images,  # [b, C, H, W], as the model saw them (normalised)
            "labels": labels,  # [b]
            "predictions": logits.argmax(dim=-1).cpu(),  # [b]
            # module name (e.g. "blocks.2.mlp") -> weights [b, tokens, experts, slots_per_expert]
            "dispatch": {name: record.dispatch.cpu() for name, record in records.items()},
            "combine": {name: record.combine.cpu() for name, record in records.items()},
            "config": json.dumps(plain(run.cfg)),  # the run's resolved config, a JSON string
            "step": run.step,
        }
        write_result(output_dir / "routing.pt", lambda path: torch.save(routing, path))
        result["routing"] = str(output_dir / "routing.pt")
    return result


def write_result(path: Path, write: Any) -> None:
    """Call ``write(temporary)``, then put what it wrote in place of ``path`` whole (a stop mid-write keeps the
    previous file: it left a half-written ``routing.pt``), naming what is in the way or the failure in one line: a
    folder of that name, a full disk (were: ``IsADirectoryError``'s traceback, or torch's "enforce fail")."""
    if path.is_dir():
        raise CheckpointWriteError(f"{path}: a folder, where this writes a file; move it away, or give "
                                   "hydra.run.dir=<a folder for the results>")
    try:
        with replaced_whole(path) as temporary:
            write(temporary)
    except (OSError, RuntimeError) as error:
        cause = write_failure(error)
        if cause is None:
            raise
        raise CheckpointWriteError(f"{path}: could not be written ({cause.strerror or cause}); give "
                                   "hydra.run.dir=<a folder for the results> on a disk with room") from None


def the_runs_images(dataset: Dataset, trainer: Any) -> Dataset:
    """The first images of ``dataset`` that a run with ``trainer``'s settings evaluated: its first ``eval_batches``
    batches of ``eval_batch_size`` (all of them where it set no ``eval_batches``)."""
    if trainer.get("eval_batches") is None:
        return dataset
    return Subset(dataset, range(min(len(dataset), trainer.eval_batches * trainer.eval_batch_size)))


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> float:
    try:
        result = evaluate_run(
            Path(cfg.run_dir),
            Path(HydraConfig.get().runtime.output_dir),
            checkpoint=cfg.checkpoint,
            device=cfg.device,
            batch_size=cfg.batch_size,
            images=cfg.images,
            data_dir=cfg.data_dir,
            data_root=cfg.data_root,
            save_routing=cfg.save_routing,
            routing_examples=cfg.routing_examples,
        )
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    which = "" if result["eval_batches"] is None else (  # a subset: said, so that no one takes it for the split
        f" (the first, as the run evaluated them: trainer.eval_batches={result['eval_batches']}; images=all for all)")
    for split in ("val", "test"):
        if f"{split}/acc" in result:
            log.info(
                "%s (step %d): %s accuracy %.2f%%, loss %.4f on %s%s",
                result["checkpoint"], result["step"], "validation" if split == "val" else "test",
                100 * result[f"{split}/acc"], result[f"{split}/loss"], counted(result[f"{split}/examples"], "image"),
                which,
            )
    log.info("written to %s", result["file"])
    if "routing" in result:
        log.info("routing weights saved to %s", result["routing"])
    return result.get("val/acc", float("nan"))  # a sweeper over checkpoints selects on validation, never on test


def missing_run_error(argv: list[str]) -> Optional[str]:
    """Why the command line's ``run_dir``/``checkpoint`` cannot be evaluated, or None.

    Checked before Hydra starts: Hydra creates ``<run_dir>/evaluate/`` first thing, so a mistyped
    ``run_dir`` would otherwise leave a new directory tree behind it."""
    values = {}
    for argument in argv:
        key, sep, value = argument.partition("=")
        if sep:
            values[key.lstrip("+")] = value
    name_it = ("name the training run directory to evaluate: "
               "python -m softmoe.evaluate run_dir=outputs/runs/<date>/<time>")
    if "run_dir" not in values:
        if any(argument.startswith("-") for argument in argv):
            return None  # --help, --cfg job, ...: Hydra's own flags, which need no run
        # Hydra would fail on hydra.run.dir (${run_dir}/evaluate) before it could say what is missing
        return f"run_dir: missing; {name_it}"
    if values["run_dir"].strip().strip("'\"") == "":  # an unset shell variable: the current directory, and /evaluate
        return f"run_dir=: empty (an unset shell variable?); {name_it}"
    run_dir = Path(values["run_dir"])
    try:
        checkpoint_path(run_dir, values.get("checkpoint", "best"))
    except USER_ERRORS as error:
        return str(error)
    planned = output_dir(argv, "evaluate")  # <run_dir>/evaluate, or hydra.run.dir
    problem = no_directory_reason(planned[1]) if planned and planned[1] else None
    if problem and "hydra.run.dir" in values:
        return f"hydra.run.dir={planned[1]}: {problem}; name a folder that takes the results"
    if problem:  # a run on a read-only disk: Hydra's mkdir traceback
        subject = f"{planned[1]} " if problem.startswith("takes no new files") else ""  # the others name a path
        return (f"run_dir={run_dir}: its results go to {planned[1]}, but {subject}{problem}; copy the run to a folder "
                "that takes files, or give hydra.run.dir=<a folder for the results>")
    return full_disk_error(planned[1]) if planned and planned[1] else None


# Room the results need: Hydra's .hydra/ and evaluate.log, the result JSON (a few KB), routing.pt (a batch's routing)
MIN_FREE_BYTES = 16 << 20


def full_disk_error(results: Path) -> Optional[str]:
    """Why ``results`` has no room for evaluate's files, or None: Hydra writes its ``.hydra/`` first, and met a full
    disk with its traceback, before this command's code ran."""
    folder = next(place for place in (results, *results.parents) if place.is_dir())
    free = shutil.disk_usage(folder).free
    if free >= MIN_FREE_BYTES:
        return None
    return (f"{results}: its disk is full ({free // 1024} KiB free, where evaluate writes up to "
            f"{MIN_FREE_BYTES >> 20} MiB); free some space, or give hydra.run.dir=<a folder for the results> on "
            "another disk")


def argument_error(argv: list[str]) -> Optional[str]:
    """A bad value of the command line's arguments (``batch_size=0``, ``device=cuda`` without one), checked as
    :func:`evaluate_run` checks them, but before Hydra starts: it would create ``<run_dir>/evaluate/`` first."""
    if any(argument.startswith("-") for argument in argv):
        return None  # Hydra's own flags
    try:
        check_evaluate(plain(compose_config("evaluate", argv, CONF_DIR)))
    except ConfigError as error:
        return str(error)
    return None


def command_line() -> None:
    """``python -m softmoe.evaluate``: the checks Hydra would make too late, then Hydra's main."""
    argv = sys.argv[1:]
    error = composition_error(argv, "evaluate") or missing_run_error(argv) or argument_error(argv)
    if error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()


if __name__ == "__main__":
    run_command(command_line)
