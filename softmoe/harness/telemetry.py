"""Run telemetry: ``metrics.jsonl`` in the run directory (always) and Weights & Biases (when enabled).

Each log event is one JSON object per line of ``metrics.jsonl``, written at once, with ``step`` and
``epoch``. W&B receives the same events when the checkpoint that covers them is on disk
(:meth:`Telemetry.commit`), so a run resumed from that checkpoint never sends a step twice; on resume
``metrics.jsonl`` drops the lines after the checkpoint's step for the same reason, and an offline run sends again
the steps a killed attempt sent but W&B never wrote to its file. W&B failing, at
start or mid-run, prints one warning and training goes on.
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Union
from urllib.parse import urlparse

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from softmoe import block_index, moe_layers, router_scale, routing_stats
from softmoe.capture import RoutingRecord
from softmoe.sparse import SparseMoE, sparse_routing_stats
from softmoe.stats import effective_experts, normalized_entropy

from .rules import counted
from .whole_files import replaced_whole

if TYPE_CHECKING:  # distributed.py imports the data and config modules, which need none of this one
    from .distributed import Distributed

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
WANDB_WRITE_TIMEOUT_S = 30  # how long a finished offline run may take to put its file on disk
ROUTING_SCALARS = ("dispatch_entropy", "combine_entropy", "dispatch_max", "combine_max", "effective_experts")
ROUTING_DISTRIBUTIONS = ("expert_utilisation", "slot_utilisation")
# The sparse layers' own statistics (softmoe.sparse.sparse_routing_stats), those present in each layer's.
SPARSE_SCALARS = ("dropped_fraction", "dropped_assignment_fraction", "importance_loss", "load_loss", "gshard_loss")
SPARSE_DISTRIBUTIONS = ("expert_load", "expert_importance")


# ----------------------------------------------------------------------------- what is logged


def routing_metrics(
    model: nn.Module, records: Mapping[str, RoutingRecord]
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Per MoE block i, from one forward pass's routing: scalars ``routing/block{i}/<statistic>`` (the
    :func:`softmoe.routing_stats` summaries and the router scale) and the utilisation distributions; for
    sparse layers also their dropped fractions, auxiliary losses and ``expert_load``/``expert_importance``
    distributions (:func:`softmoe.sparse.sparse_routing_stats`, of the layer's last forward: call this
    right after the pass that filled ``records``)."""
    layers = moe_layers(model)
    scalars: dict[str, float] = {}
    distributions: dict[str, torch.Tensor] = {}
    for name, record in sorted(records.items(), key=lambda item: block_index(item[0])):
        prefix = f"routing/block{block_index(name)}/"
        stats = routing_stats(record.dispatch, record.combine)
        scalars.update({prefix + key: stats[key] for key in ROUTING_SCALARS})
        scalars[prefix + "router_scale"] = router_scale(layers[name])
        distributions.update({prefix + key: stats[key] for key in ROUTING_DISTRIBUTIONS})
    for name, layer in sorted(layers.items(), key=lambda item: block_index(item[0])):
        if isinstance(layer, SparseMoE) and layer.last_stats is not None:
            prefix = f"routing/block{block_index(name)}/"
            stats = sparse_routing_stats(layer)
            scalars.update({prefix + key: stats[key] for key in SPARSE_SCALARS if key in stats})
            scalars.setdefault(prefix + "router_scale", router_scale(layer))  # once: a recorded layer has it above
            distributions.update({prefix + key: stats[key].float().cpu() for key in SPARSE_DISTRIBUTIONS})
    return scalars, distributions


def effective_experts_of(scalars: Mapping[str, float], distributions: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """``scalars`` with each block's ``effective_experts`` recomputed from its ``expert_utilisation`` in
    ``distributions``: under data parallelism both are averaged over the ranks, and the mean of the ranks'
    exp-entropies is not the exp-entropy of the averaged utilisation, which is the whole batch's (was: lower)."""
    suffix = "effective_experts"
    recomputed = dict(scalars)
    for key in scalars:
        shares = distributions.get(key[: -len(suffix)] + "expert_utilisation") if key.endswith(suffix) else None
        if shares is not None:
            recomputed[key] = effective_experts(shares)
    return recomputed


def distribution_summary(name: str, shares: torch.Tensor) -> dict[str, float]:
    """``<name>_min``, ``_max`` and ``_entropy`` (normalised by log(size): 1 = balanced) of a distribution [size]."""
    shares = shares.double().reshape(-1)
    return {
        f"{name}_min": shares.min().item(),
        f"{name}_max": shares.max().item(),
        f"{name}_entropy": normalized_entropy(shares, dim=0).item(),
    }


def dispatch_maps(
    image: torch.Tensor, records: Mapping[str, RoutingRecord], model: nn.Module, slots: int = 8
) -> np.ndarray:
    """W&B's ``val/dispatch_maps``: an RGB image [H, W, 3] uint8 of :func:`.figures.plot_dispatch_maps` for one
    image, a row per MoE block, the same figure the notebooks draw (one colour scale, colorbar, uniform level)."""
    from .figures import plot_dispatch_maps, render

    return render(plot_dispatch_maps(image[None], records, model, num_slots=slots))


# ----------------------------------------------------------------------------- where it goes


def has_wandb_credentials() -> bool:
    """An API key in ``WANDB_API_KEY`` or in the netrc file ``wandb login`` writes."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_wandb_mode(mode: str) -> tuple[str, str]:
    """``logger.mode`` as a W&B mode, and why: ``auto`` follows ``WANDB_MODE`` when set, else is online
    with credentials and offline without."""
    if mode != "auto":
        return mode, f"logger.mode={mode}"
    if os.environ.get("WANDB_MODE") in ("online", "offline", "disabled"):
        return os.environ["WANDB_MODE"], "WANDB_MODE"
    if has_wandb_credentials():
        return "online", "W&B credentials found"
    return "offline", "no W&B credentials found"


def truncate_after(path: Path, step: int) -> None:
    """Drop the lines of a metrics file logged after ``step`` (by an interrupted run past its checkpoint), and a
    torn line (a run killed while writing it)."""
    if not path.is_file():
        return
    # damaged bytes (not UTF-8) make their lines no events, dropped as a torn one is (was: a UnicodeDecodeError)
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True)
    steps = [_event_step(line) for line in lines]  # each line parsed once
    kept = [line for line, at in zip(lines, steps) if line.endswith("\n") and at is not None and at <= step]
    damaged = steps[:-1].count(None)  # the last may be torn by a kill
    if damaged:
        log.warning("%s: dropped %s holding no event (damaged bytes?)", path, counted(damaged, "line"))
    if len(kept) != len(lines):
        with replaced_whole(path) as temporary:
            temporary.write_text("".join(kept))


def json_lines(path: Union[str, Path]) -> Iterator[dict[str, Any]]:
    """The JSON objects of a JSON-lines file (``metrics.jsonl``) in order. A line cut short by a kill (no newline
    at its end, or not JSON) is skipped: each event is written as one line, newline included; so is a line that is
    JSON but no object (``null``, ``3``: no event; its readers stopped on it in a traceback)."""
    for line in Path(path).read_text().splitlines(keepends=True):
        if not line.endswith("\n"):
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict):
            yield event


def offline_run_dirs(wandb_dir: Union[str, Path], run_id: str) -> list[Path]:
    """The offline W&B directories of run ``run_id`` below ``wandb_dir``, oldest first: a resumed run leaves one per
    attempt (``offline-run-<date>_<time>-<id>``), and ``wandb sync`` must upload them all, in this order."""
    return sorted(Path(wandb_dir).glob(f"offline-run-*-{run_id}"))


def offline_run_dir(wandb_dir: Union[str, Path], run_id: str, started: float) -> Path:
    """The directory W&B gives an offline attempt of run ``run_id`` started at ``started`` (``time.time()``): named
    by the local date and time to the second, ``offline-run-<YYYYmmdd>_<HHMMSS>-<id>``."""
    return Path(wandb_dir) / f"offline-run-{datetime.fromtimestamp(started):%Y%m%d_%H%M%S}-{run_id}"


def wait_for_free_offline_dir(wandb_dir: Union[str, Path], run_id: str) -> None:
    """Return once an attempt of run ``run_id`` starting now gets an offline directory of its own. An attempt
    resumed within the second its previous attempt started (a run preempted and resumed at once) would get that
    attempt's name: W&B (0.31) then appends ``-1`` to it, which :func:`offline_run_dirs`, and so the ``wandb sync``
    command, would not list. Waiting for the next second keeps one ``offline-run-<date>_<time>-<id>`` directory
    per attempt, in the order they started."""
    now = time.time()
    while offline_run_dir(wandb_dir, run_id, now).exists():
        time.sleep(math.floor(now) + 1 - now)
        now = time.time()


def init_wandb(wandb, **settings) -> Any:
    """``wandb.init(**settings)``. A W&B service this process inherited (``WANDB_SERVICE``: a detached ``wandb beta
    core``, or the service of the process that started this one) keeps the stream of an attempt of this run that was
    killed, and refuses the run's id ("run ID ... is in use"). The run directory's lock rules out a live attempt, so
    this one then logs through a service of its own."""
    try:
        return wandb.init(**settings)
    except Exception as error:
        if "is in use" not in str(error) or not os.environ.get("WANDB_SERVICE"):
            raise
        log.info("W&B: the service named by WANDB_SERVICE still holds run %s (%s), from an attempt that was "
                 "killed; this attempt starts its own", settings["id"], error)
        os.environ.pop("WANDB_SERVICE")
        wandb.teardown()
        wandb_dir = Path(settings["dir"]) / "wandb"
        for refused in offline_run_dirs(wandb_dir, settings["id"]):  # the refused start's folder holds no run file
            if not any(refused.glob("run-*.wandb")):
                shutil.rmtree(refused, ignore_errors=True)
        wait_for_free_offline_dir(wandb_dir, settings["id"])  # else W&B names this start's folder <refused>-1
        return wandb.init(**settings)


def _event_step(line: str) -> Optional[int]:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


class Telemetry:
    """The run's log: ``metrics.jsonl`` at once, W&B at each :meth:`commit` (called after each checkpoint).

    Args:
        run_dir: the run directory (``metrics.jsonl`` and W&B's files go there).
        logger_cfg: the ``logger`` config group, plain.
        config: the resolved run config, sent to W&B.
        resume_step: the checkpoint's step when resuming (later lines of ``metrics.jsonl`` are dropped), else 0.
        run_id: the W&B run to continue, from the checkpoint; None starts a new one.
        group, name: the W&B group and run name when ``logger.group``/``logger.name`` are null.
    """

    def __init__(
        self,
        run_dir: Path,
        logger_cfg: Mapping[str, Any],
        config: Mapping[str, Any],
        *,
        resume_step: int = 0,
        run_id: Optional[str] = None,
        group: Optional[str] = None,
        name: Optional[str] = None,
    ) -> None:
        self.metrics_path = Path(run_dir) / METRICS_FILE
        truncate_after(self.metrics_path, resume_step)
        self._resumed = resume_step > 0 and run_id is not None
        self._metrics = open(self.metrics_path, "a")
        self._pending: list[tuple[int, dict[str, Any]]] = []
        self.wandb = None  # the W&B run, or None
        self._offline_dir: Optional[Path] = None  # this attempt's offline W&B directory
        self.run_id = run_id
        self.group = logger_cfg.get("group") or group  # the W&B run's group and name (logger.group/.name first)
        self.name = logger_cfg.get("name") or name
        if logger_cfg["backend"] == "wandb":
            self._start_wandb(Path(run_dir), logger_cfg, config)

    def _start_wandb(self, run_dir, cfg, config) -> None:
        mode, why = resolve_wandb_mode(cfg["mode"])
        if mode == "disabled":
            return
        try:
            import wandb
            from wandb.sdk.lib.runid import generate_id  # from `secrets`: draws nothing from the training RNGs

            self.run_id = self.run_id or generate_id()
            if mode == "offline":
                wait_for_free_offline_dir(run_dir / "wandb", self.run_id)
            self.wandb = init_wandb(
                wandb,
                project=cfg["project"],
                entity=cfg["entity"],
                group=self.group,
                name=self.name,
                tags=cfg["tags"],
                config=dict(config),
                dir=str(run_dir),
                id=self.run_id,
                resume="allow",  # the same id continues the same run after a resume
                mode=mode,
                reinit="finish_previous",  # the basic launcher runs a sweep's jobs in one process
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as error:  # W&B down or misconfigured: train anyway
            log.warning("W&B could not start (%s); training continues, logging to %s only", error, self.metrics_path)
            self.wandb = None
            return
        self._log_images = cfg["log_images"]
        if mode == "offline":
            self._offline_dir = Path(self.wandb.settings.sync_dir)
            if self._resumed:
                self._send_what_earlier_attempts_lost()
            directory, command = self._offline_dir, self.sync_command
            log.info("W&B: offline (%s); this run is saved in %s; upload it with: %s", why, directory, command)
        else:
            log.info("W&B: %s", self.wandb.url)

    def _send_what_earlier_attempts_lost(self) -> None:
        """Send again, from ``metrics.jsonl``, the steps up to this resume's checkpoint that no earlier attempt's run
        file holds. A killed attempt had sent them (:meth:`commit`, after the checkpoint), but W&B's writer puts
        its file on disk in 32 KiB blocks, and the rest died with it: without this those steps were never in W&B.
        They go as ``metrics.jsonl`` has them: scalars, each utilisation as its ``_min``/``_max``/``_entropy``
        rather than a histogram, no images. Offline runs only: the earlier attempts' files are here to read."""
        from .wandb_files import history_steps

        earlier = [path for folder in offline_run_dirs(self._offline_dir.parent, self.run_id)
                   if folder != self._offline_dir for path in folder.glob("run-*.wandb")]
        try:
            sent = {step for path in earlier for step in history_steps(path)}
        except (ValueError, OSError) as error:  # not a run file, unreadable: send nothing twice
            log.warning("W&B: could not read the earlier attempts' run files (%s); not sending their steps again",
                        error)
            return
        lost = [event for event in json_lines(self.metrics_path) if event["step"] not in sent]
        for event in lost:
            self.wandb.log({key: value for key, value in event.items() if key != "step"}, step=event["step"])
        if lost:
            steps = sorted({event["step"] for event in lost})
            log.info("W&B: sent again %d step(s) an earlier, killed attempt had sent but not written (%d to %d)",
                     len(steps), steps[0], steps[-1])

    @property
    def run_path(self) -> Optional[str]:
        """The W&B run as ``entity/project/id`` (offline: ``project/id``), or None without W&B."""
        return self.wandb.path if self.wandb is not None else None

    @property
    def sync_command(self) -> Optional[str]:
        """``wandb sync`` with every part of an offline run, oldest first (a resumed run has one per attempt)."""
        if self._offline_dir is None:
            return None
        parts = offline_run_dirs(self._offline_dir.parent, self.run_id) or [self._offline_dir]
        return "wandb sync " + " ".join(str(part) for part in parts)

    @property
    def logs_images(self) -> bool:
        return self.wandb is not None and self._log_images

    def log(
        self,
        step: int,
        epoch: int,
        scalars: Mapping[str, float],
        distributions: Optional[Mapping[str, torch.Tensor]] = None,
        images: Optional[Mapping[str, np.ndarray]] = None,
    ) -> None:
        """One event: ``scalars`` everywhere; ``distributions`` as W&B histograms and as min/max/entropy
        scalars in ``metrics.jsonl``; ``images`` to W&B only."""
        distributions = distributions or {}
        record = {"step": step, "epoch": epoch, **scalars}
        for name, shares in distributions.items():
            record.update(distribution_summary(name, shares))
        try:
            self._metrics.write(json.dumps(record) + "\n")
            self._metrics.flush()
        except OSError as error:  # a full disk: named in the run's one line (errors.disk_full)
            error.filename = error.filename or str(self.metrics_path)
            raise
        if self.wandb is not None:
            self._pending.append((step, {"epoch": epoch, **scalars, **distributions, **(images or {})}))

    def commit(self) -> None:
        """Send the events logged since the last commit to W&B: call once they are covered by a checkpoint."""
        pending, self._pending = self._pending, []
        if self.wandb is None:
            return
        try:
            import wandb

            for step, values in pending:
                converted = {key: self._to_wandb(wandb, key, value) for key, value in values.items()}
                self.wandb.log(converted, step=step)
        except Exception as error:
            log.warning("W&B logging failed (%s); training continues, logging to %s only", error, self.metrics_path)
            self._stop_wandb()

    @staticmethod
    def _to_wandb(wandb, key: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return wandb.Histogram(value.double().numpy())
        if isinstance(value, np.ndarray):
            return wandb.Image(value, caption=key)
        return value

    def summary(self, values: Mapping[str, Any]) -> None:
        """Final numbers for the W&B run summary."""
        if self.wandb is not None:
            try:
                self.wandb.summary.update(dict(values))
            except Exception as error:
                log.warning("W&B summary failed (%s)", error)

    def finish(self) -> None:
        """Close ``metrics.jsonl`` and the W&B run. Events not yet committed are not sent: no checkpoint covers
        them, so a resumed run logs them again."""
        self._pending = []
        self._metrics.close()
        self._stop_wandb()
        if self._offline_dir is not None:
            log.info("W&B: offline; upload this run with: %s", self.sync_command)
            self._offline_dir = None

    def _stop_wandb(self) -> None:
        run, self.wandb = self.wandb, None
        if run is None:
            return
        try:
            run.finish()
        except Exception as error:
            log.warning("W&B finish failed (%s)", error)
            return
        from .wandb_files import wait_for_exit_record  # imports wandb, which logger=none never needs

        # the file is whole before training returns, for `collect` or the next attempt to read
        if self._offline_dir is not None and not wait_for_exit_record(self._offline_dir, WANDB_WRITE_TIMEOUT_S):
            log.warning("W&B's offline file in %s lacks its exit record %d s after the run finished: it may miss "
                        "the last steps", self._offline_dir, WANDB_WRITE_TIMEOUT_S)


# ----------------------------------------------------------------------------- every rank logs, rank 0 writes

# Summed over ranks (the others are averaged): a rate of the whole job.
SUMMED_METRICS = ("train/throughput",)


class RankZeroTelemetry:
    """Rank 0's :class:`Telemetry`, fed by every rank (pass None as ``telemetry`` on the other ranks).

    :meth:`log` is collective: the scalars and distributions of all ranks are averaged (throughput summed)
    before rank 0 writes them, and returned (the console shows those, not rank 0's own); every other call goes
    to rank 0's telemetry and is a no-op elsewhere.
    """

    def __init__(self, telemetry: Optional[Telemetry], distributed: Distributed) -> None:
        self._telemetry = telemetry
        self._distributed = distributed
        logs_images = [telemetry.logs_images if telemetry is not None else False]
        if distributed.data_parallel:  # ranks must agree: the dispatch-map panel is a forward pass of all ranks
            dist.broadcast_object_list(logs_images, src=0)
        self.logs_images = logs_images[0]

    def log(self, step, epoch, scalars, distributions=None, images=None) -> dict[str, Any]:
        """Log on rank 0; returns the scalars as logged (reduced over the ranks), for the console."""
        if self._distributed.data_parallel:
            scalars, distributions = self._reduce(scalars), self._reduce(distributions or {})
            scalars = effective_experts_of(scalars, distributions)
        if self._telemetry is not None:
            self._telemetry.log(step, epoch, scalars, distributions, images)
        return dict(scalars)

    def _reduce(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The mean over ranks of each value (a number or a tensor), the sum for :data:`SUMMED_METRICS`."""
        if not values:
            return {}
        keys = sorted(values)  # every rank logs the same keys
        device = self._distributed.device  # NCCL reduces tensors on the rank's CUDA device only
        flat = torch.cat([torch.as_tensor(values[key], dtype=torch.float64).reshape(-1).to(device) for key in keys])
        dist.all_reduce(flat)
        flat = flat.cpu()
        reduced, offset = {}, 0
        for key in keys:
            original = values[key]
            size = original.numel() if isinstance(original, torch.Tensor) else 1
            total = flat[offset : offset + size]
            offset += size
            mean = total if key in SUMMED_METRICS else total / self._distributed.world_size
            if isinstance(original, torch.Tensor):
                reduced[key] = mean.view(original.shape).to(original.dtype)
            else:
                reduced[key] = mean.item()
        return reduced

    # rank 0's W&B run (its id, path, group, name); None on the other ranks
    run_id = property(lambda self: self._rank_zero("run_id"))
    run_path = property(lambda self: self._rank_zero("run_path"))
    group = property(lambda self: self._rank_zero("group"))
    name = property(lambda self: self._rank_zero("name"))

    def _rank_zero(self, attribute: str) -> Any:
        return getattr(self._telemetry, attribute) if self._telemetry is not None else None

    def __getattr__(self, name: str) -> Any:
        # commit, summary, finish, ...: rank 0's methods; no-ops on the other ranks
        telemetry = self.__dict__.get("_telemetry")
        if telemetry is not None:
            return getattr(telemetry, name)
        return lambda *args, **kwargs: None
