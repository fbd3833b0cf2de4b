"""Training on several processes: data parallel (DDP) and expert parallelism, launched by ``torchrun``.

    torchrun --standalone --nproc_per_node=4 -m softmoe.train trainer=gpu                 # data parallel
    torchrun --standalone --nproc_per_node=4 -m softmoe.train moe.expert_parallel=true    # + experts split
    torchrun --standalone --nproc_per_node=4 -m softmoe.train trainer.expert_parallel_size=2  # 2 replicas x 2

``trainer.strategy=auto`` trains data parallel exactly when ``torchrun`` started the process (``RANK``,
``WORLD_SIZE`` in the environment). ``trainer.batch_size`` is the global batch: every rank takes its
``batch_size / world_size`` share of each batch of the single-process order, so a step sees the examples the
single-process step would, and its averaged gradient is that step's gradient. Every rank evaluates its share
of the test examples and the sums are reduced. Rank 0 alone writes the run directory (checkpoints,
``metrics.jsonl``, W&B), after averaging the other ranks' training metrics and routing statistics.

Checkpoints always hold the single-process model and optimizer state: with expert parallelism the experts'
weights and Adam moments are gathered to rank 0 on save and each rank keeps its experts on load, so a run
saved on W ranks resumes on any number of ranks (and evaluates on one).

The training loop (:mod:`.loop`) calls a few coarse :class:`Distributed` methods: set up the run directory
(:meth:`~Distributed.claim_run_dir`), the model (:meth:`~Distributed.shard_model`, then
:meth:`~Distributed.wrap_model`) and the loaders (:meth:`~Distributed.build_loaders`); gather and load the
checkpointed state (:meth:`~Distributed.gather_state`, :meth:`~Distributed.load_state`); reduce across ranks
(:meth:`~Distributed.clip_grad_norm_`, :meth:`~Distributed.reduce_eval`, :meth:`~Distributed.share_signal`). On
one process they do nothing but return what the loop would have used.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.data import DataLoader, Dataset

from softmoe import parallel

from .checkpoint import LAST
from .config import check_launch, expert_group_size, resolve_device
from . import fsdp, sharded_checkpoint
from .data import DataBundle, build_loader
from .errors import ConfigError, RunDirInUseError
from .rules import counted
from .runs import RunDirLock
from .sampler import PaddedShard, ResumableSampler, ShardedSampler
from .sweep_console import show_only_this_ranks_own_warnings

log = logging.getLogger(__name__)

HYDRAS_LOGGERS = ("hydra", "hydra_plugins")  # Hydra's and its launchers' (the joblib and submitit plugins')
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def export_submitit_tasks() -> None:
    """Give the tasks of a SLURM job started by submitit (``launcher=slurm launcher.gpus_per_node=G``: a task per
    GPU) the variables ``torchrun`` would set (rank from ``SLURM_PROCID``, rank 0's node as the address, a port from
    the job id, ``LOCAL_WORLD_SIZE``), so they train data parallel as a torchrun launch does. Every task keeps every
    GPU of its node."""
    if launched_by_torchrun() or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_process_group() -> None:
    """Join the ``torchrun`` job's process group (once per process): gloo for CPU tensors, NCCL for CUDA ones."""
    if dist.is_initialized():
        return
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        backend = "cpu:gloo,cuda:nccl"
    dist.init_process_group(backend)
    atexit.register(_destroy_process_group)


def _destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class SharedRunDir(Callback):
    """A Hydra callback (``conf/hydra/default.yaml``) giving every rank of a ``torchrun`` launch rank 0's run directory.

    ``hydra.run.dir`` holds ``${now:...}``, which each rank would resolve at its own moment; here rank 0
    resolves the run (and sweep) directory and the other ranks adopt its resolver cache, so every ``${now:}``
    has rank 0's value (a sweep's job directories too: Hydra copies the cache into each job's config).
    (Ranks other than 0 write no ``.hydra/`` files: the trainer writes them on the rank holding the run
    directory.) On ranks other than 0 it also quiets Hydra's own INFO lines (a sweep's "Launching 2 jobs" and each
    job's overrides), which rank 0 prints. Without ``torchrun``, or with ``trainer.strategy=single``, it does nothing.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._share(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._share(config)

    @staticmethod
    def _share(config: DictConfig) -> None:
        if not launched_by_torchrun() or OmegaConf.select(config, "trainer.strategy") == "single":
            return
        init_process_group()
        cache = None
        if dist.get_rank() == 0:
            for key in ("hydra.run.dir", "hydra.sweep.dir"):
                OmegaConf.select(config, key, throw_on_resolution_failure=False)  # fills the cache
            cache = OmegaConf.get_cache(config)
        shared = [cache]
        dist.broadcast_object_list(shared, src=0)
        if dist.get_rank() != 0:
            OmegaConf.set_cache(config, shared[0])
            for name in HYDRAS_LOGGERS:  # levels outlast the handlers Hydra configures again around each job
                logging.getLogger(name).setLevel(logging.WARNING)


def quiet_other_ranks() -> None:
    """On ranks other than 0: errors and the rank's own warnings on the console only, no ``<run dir>/train.log``."""
    if not (dist.is_initialized() and dist.get_rank() != 0):
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.FileHandler):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(logging.WARNING)
    show_only_this_ranks_own_warnings()


@dataclass
class Loaders:
    """The loaders of a run, each yielding this rank's share (all of it on one process)."""

    train: DataLoader
    sampler: ResumableSampler  # the training order: resumable mid-epoch (``set_epoch(epoch, skip=...)``)
    test: DataLoader
    val: Optional[DataLoader]  # None when data.val_size=0
    eval_batches: Optional[int]  # the ``max_batches`` to evaluate val and test with


def warn_if_expert_groups_span_nodes(expert_parallel_size: int) -> None:
    """Expert groups are consecutive ranks: inside a node exactly when their size divides the processes per node."""
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "0"))
    if per_node and per_node % expert_parallel_size:
        log.warning(
            "expert groups of %d ranks span nodes of %d processes: every MoE layer's all_to_all crosses the network; "
            "set trainer.expert_parallel_size to a divisor of %d",
            expert_parallel_size, per_node, per_node,
        )


@dataclass
class Distributed:
    """How this process takes part in the run: rank, world size, device and the parallelism in use."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    data_parallel: bool = False  # DDP over the world
    expert_parallel: bool = False  # each rank holds num_experts / (ranks per expert group) experts
    find_unused_parameters: bool = False
    fsdp: bool = False  # trainer.strategy=fsdp: FSDP2 instead of DDP, sharded (DCP) checkpoints
    reshard_after_forward: bool = True
    precision: str = "fp32"
    mesh: Optional[DeviceMesh] = None  # (data, expert) under expert parallelism: replicas x ranks per expert group

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run directory."""
        return self.rank == 0

    # ------------------------------------------------------------------------- setup

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Distributed":
        """Check the launch against ``trainer.strategy`` and expert parallelism (:func:`~.config.check_launch`), join
        the process group, pick this rank's device and mesh. Raises :class:`ConfigError` before anything is built."""
        trainer, moe = config["trainer"], config["moe"]
        export_submitit_tasks()
        torchrun = launched_by_torchrun()
        world_size = int(os.environ["WORLD_SIZE"]) if torchrun else 1
        check_launch(config, torchrun=torchrun, world_size=world_size)  # the same error on every rank
        data_parallel = torchrun and trainer["strategy"] != "single"
        device = resolve_device(trainer["device"])
        if not data_parallel:
            return cls(device=device)

        init_process_group()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        size = expert_group_size(config, world_size)  # None: no expert parallelism
        mesh = None
        if size is not None:
            mesh = parallel.expert_data_mesh(device.type, size)
            warn_if_expert_groups_span_nodes(size)
        # Soft MoE with dispatch and combine both fixed never uses its router: DDP must not wait for its gradients.
        unused_router = moe["router"] == "soft" and "soft" not in (moe["dispatch"], moe["combine"])
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            device=device,
            data_parallel=True,
            expert_parallel=size is not None,
            find_unused_parameters=unused_router,
            fsdp=trainer["strategy"] == "fsdp",
            reshard_after_forward=trainer["reshard_after_forward"],
            precision=trainer["precision"],
            mesh=mesh,
        )

    def claim_run_dir(self, run_dir: str) -> Optional[RunDirLock]:
        """Check that every rank was given the same run directory, and lock it for this run: rank 0 takes its
        :class:`~.runs.RunDirLock` (returned; None on the other ranks). Raises the same error on every rank."""
        problem = None
        if self.data_parallel:
            dirs: list[Optional[str]] = [None] * self.world_size
            dist.all_gather_object(dirs, os.path.abspath(run_dir))
            if len(set(dirs)) > 1:
                raise ConfigError(
                    f"hydra.run.dir={run_dir}: the ranks resolved different run directories {sorted(set(dirs))}; "
                    "set hydra.run.dir to a fixed path"
                )
        lock = None
        if self.is_main:
            try:
                lock = RunDirLock(run_dir).acquire()
            except RunDirInUseError as error:
                problem = str(error)
        if self.data_parallel:
            shared = [problem]
            dist.broadcast_object_list(shared, src=0)
            problem = shared[0]
        if problem is not None:
            raise RunDirInUseError(problem)
        return lock

    # ------------------------------------------------------------------------- data

    def build_loaders(self, data: DataBundle, trainer: Mapping[str, Any], seed: int) -> Loaders:
        """The training loader (this rank's share of every global batch, in an order drawn from ``seed`` and
        the epoch) and the validation and test loaders (this rank's share of their examples)."""
        if self.data_parallel:
            sampler = ShardedSampler(len(data.train), seed, trainer["batch_size"], self.rank, self.world_size)
        else:
            sampler = ResumableSampler(len(data.train), seed)
        options = dict(num_workers=trainer["num_workers"], pin_memory=self.device.type == "cuda")
        local_batch_size = trainer["batch_size"] // self.world_size
        train = build_loader(data.train, local_batch_size, train=True, seed=seed, sampler=sampler, **options)
        eval_sizes = trainer["eval_batch_size"], trainer["eval_batches"]
        test, eval_batches = self._eval_loader(data.test, *eval_sizes, **options)
        val = None
        if data.val is not None:
            val, _ = self._eval_loader(data.val, *eval_sizes, **options)
        return Loaders(train=train, sampler=sampler, test=test, val=val, eval_batches=eval_batches)

    def _eval_loader(
        self, dataset: Dataset, batch_size: int, eval_batches: Optional[int], **loader_kwargs
    ) -> tuple[DataLoader, Optional[int]]:
        """A validation or test loader and the ``max_batches`` to evaluate it with.

        Several ranks split the examples a single process would evaluate (the first ``eval_batches`` batches):
        rank r takes examples r, r+W, ..., padded to an equal count with ignored examples, so every rank runs
        the same number of equal batches (expert parallelism's all_to_all needs them).
        """
        if not self.data_parallel:
            return build_loader(dataset, batch_size, train=False, **loader_kwargs), eval_batches
        size = len(dataset) if eval_batches is None else min(len(dataset), eval_batches * batch_size)
        per_rank = math.ceil(size / self.world_size)
        positions = list(range(self.rank, per_rank * self.world_size, self.world_size))
        shard = PaddedShard(dataset, positions, size)
        local = max(1, math.ceil(batch_size / self.world_size))
        return build_loader(shard, local, train=False, **loader_kwargs), None

    def reduce_eval(self, metrics: Mapping[str, float], loader: DataLoader) -> dict[str, float]:
        """Every rank's :func:`loop.evaluate` result (over its padded shard) as the metrics of all examples."""
        if not self.data_parallel:
            return dict(metrics)
        shard: PaddedShard = loader.dataset
        seen = len(shard)
        correct = round(metrics["acc"] * seen)  # padding is never correct: its label is ignored
        totals = torch.tensor([metrics["loss"] * seen, correct], dtype=torch.float64, device=self.device)
        dist.all_reduce(totals)  # on the training device: NCCL reduces CUDA tensors only
        return {"loss": totals[0].item() / shard.size, "acc": totals[1].item() / shard.size}

    # ------------------------------------------------------------------------- model and step

    def shard_model(self, model: nn.Module, *, broadcast: bool = True) -> nn.Module:
        """The module every rank optimizes and checkpoints, from ``model`` on this rank's device (or on the meta
        device, with ``broadcast=False``): with expert parallelism this rank's experts only, under FSDP its shards
        (DTensors). ``broadcast``: every rank takes rank 0's initial weights (DDP's convention)."""
        if self.expert_parallel:
            expert_group, data_group = self.mesh["expert"].get_group(), self.mesh["data"].get_group()
            model = parallel.to_expert_parallel(model, expert_group, data_group=data_group, broadcast=broadcast)
            replicas, size = self.mesh.shape
            log.info("expert parallel: %s x %s", counted(replicas, "data-parallel replica"),
                     counted(size, "expert rank"))
        if self.fsdp:
            size = self.mesh.shape[1] if self.expert_parallel else None
            log.info("FSDP2 over %s%s (reshard_after_forward=%s)", counted(self.world_size, "rank"),
                     f", experts over {counted(self.world_size // size, 'replica')}" if size else "",
                     self.reshard_after_forward)
            model = fsdp.shard_model(model, self.device.type, expert_mesh=self.mesh, precision=self.precision,
                                     reshard_after_forward=self.reshard_after_forward, broadcast=broadcast)
        return model

    def wrap_model(self, model: nn.Module, compile: bool = False) -> nn.Module:
        """What the loop calls forward on, from :meth:`shard_model`'s module once its weights are in place: wrapped
        in DDP when data parallel without FSDP (for the replicated parameters only, under expert parallelism), then
        ``torch.compile``d when ``compile``."""
        forward = model
        if self.data_parallel and not self.fsdp:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            kwargs = dict(device_ids=device_ids, find_unused_parameters=self.find_unused_parameters)
            if self.expert_parallel:
                forward = parallel.distributed_data_parallel(model, **kwargs)
            else:
                forward = nn.parallel.DistributedDataParallel(model, **kwargs)
        return torch.compile(forward) if compile else forward

    def average_expert_grads(self, model: nn.Module) -> None:
        """Average each expert shard's gradient over its copies in the other data-parallel replicas (DDP, which
        averages the replicated parameters, leaves the experts alone). Call after backward; collective."""
        if self.expert_parallel and not self.fsdp:  # FSDP's reduce-scatter over mesh["data"] averages them
            parallel.all_reduce_expert_grads(model)

    def clip_grad_norm_(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """The global gradient norm, clipped: over every rank's experts under expert parallelism."""
        if self.fsdp:
            return fsdp.clip_grad_norm_(model, max_norm)
        if self.expert_parallel:
            return parallel.clip_grad_norm_(model, max_norm)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def share_signal(self, preemption: Any) -> None:
        """Set ``preemption.requested`` on every rank when any rank received a preemption signal, so that all
        save and stop after the same step (a rank stopping alone would leave the others in a collective). Sent:
        ``received``, which the handler never clears, so a signal that arrives during this exchange (after this
        rank sent its value) stops every rank at the next one."""
        if not self.data_parallel:
            return
        # a CPU tensor goes over gloo (the process group is "cpu:gloo,cuda:nccl" on GPUs): reading it back waits
        # for the other ranks' hosts, never for this GPU's queued kernels
        signal = torch.tensor([preemption.received or 0])
        dist.all_reduce(signal, op=dist.ReduceOp.MAX)
        preemption.requested = int(signal.item()) or None

    # ------------------------------------------------------------------------- checkpoints

    @property
    def last_checkpoint(self) -> str:
        """The name of the checkpoint a stop saves and a resume continues from."""
        return sharded_checkpoint.directory(Path(), LAST).name if self.fsdp else LAST

    def checkpoint_format(self, best: bool = True) -> str:
        """How this run's checkpoints are written, chosen by the strategy (said in the run's log); ``best=False``: a
        run without a validation split, which writes no best checkpoint."""
        if self.fsdp:
            names = "last.dcp/ and best.dcp/" if best else "last.dcp/"
            return f"sharded (torch.distributed.checkpoint): every rank writes its shards to {names}"
        names = "last.pt and best.pt" if best else "last.pt"
        return f"one file, {names}, written by rank 0" + (" (gathered)" if self.data_parallel else "")

    def gather_state(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[Optional[dict[str, torch.Tensor]], Optional[dict[str, Any]]]:
        """The single-process model and optimizer state dicts, on rank 0 (under expert parallelism every rank
        sends its experts' weights and Adam moments; None on the other ranks). Collective. Under FSDP: (None, None),
        each rank writes its own shards instead (:mod:`.sharded_checkpoint`)."""
        if self.fsdp:
            return None, None
        if not self.expert_parallel:
            return model.state_dict(), optimizer.state_dict()
        model_state = parallel.gather_expert_parallel_state_dict(model)
        return model_state, self._gather_optimizer_state(optimizer, model)

    def load_state(
        self,
        model: nn.Module,
        model_state: Mapping[str, torch.Tensor],
        optimizer: Optional[torch.optim.Optimizer] = None,
        optimizer_state: Optional[dict[str, Any]] = None,
    ) -> None:
        """Load single-process state dicts (a checkpoint's) into this rank's model and optimizer: under expert
        parallelism each rank keeps its own experts' weights and moments. ``model_state`` may instead be a sharded
        checkpoint's directory (any world size): each rank reads its pieces, whatever its strategy."""
        if isinstance(model_state, (str, os.PathLike)):
            sharded_checkpoint.load(model_state, model, optimizer, self.mesh)
            return
        if self.fsdp:
            sharded_checkpoint.load_full(model, optimizer, self.mesh, model_state, optimizer_state)
            return
        if self.expert_parallel:
            model_state = parallel.shard_state_dict(model_state, model)
        model.load_state_dict(model_state)
        if optimizer is not None:
            self._load_optimizer_state(optimizer, model, optimizer_state)

    def _gather_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module) -> Optional[dict[str, Any]]:
        """The single-process optimizer state: each expert shard's per-parameter state (Adam's moments) gathered
        along the experts to the first rank of each expert group (rank 0 keeps it). Collective under expert
        parallelism."""
        state = optimizer.state_dict()
        for index, layer in self._expert_shards(optimizer, model).items():
            whole = {}  # a new dict: state_dict() shares each parameter's state dict with the optimizer
            first = layer.rank == 0
            for key, value in state["state"].get(index, {}).items():
                if _per_expert(value, layer):
                    parts = [torch.empty_like(value) for _ in range(layer.world_size)] if first else None
                    dist.gather(value.contiguous(), parts, dst=dist.get_global_rank(layer.group, 0), group=layer.group)
                    value = torch.cat(parts) if first else value
                whole[key] = value
            if index in state["state"]:
                state["state"][index] = whole
        return state if self.is_main else None

    def _load_optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module, state: dict[str, Any]) -> None:
        if self.expert_parallel:
            shards = self._expert_shards(optimizer, model)
            state = {**state, "state": dict(state["state"])}
            for index, layer in shards.items():
                first, count = layer.first_expert, layer.num_local_experts
                state["state"][index] = {
                    key: value[first : first + count] if _whole_bank(value, layer) else value
                    for key, value in state["state"].get(index, {}).items()
                }
        optimizer.load_state_dict(state)

    @staticmethod
    def _expert_shards(optimizer: torch.optim.Optimizer, model: nn.Module) -> dict[int, parallel.ExpertParallel]:
        """Optimizer state index -> the expert-parallel layer, for every expert shard the optimizer holds."""
        owner = {id(p): layer for layer in parallel.expert_parallel_layers(model).values() for p in layer.parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]  # state_dict's numbering
        return {index: owner[id(p)] for index, p in enumerate(params) if id(p) in owner}


def _per_expert(value: Any, layer: parallel.ExpertParallel) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == layer.num_local_experts


def _whole_bank(value: Any, layer: parallel.ExpertParallel) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == layer.num_experts
