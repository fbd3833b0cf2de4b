"""Expert parallelism on two gloo processes, and on four as a data x expert mesh, against the single-process
model on the concatenated batch.

One set of processes runs every scenario of its size (starting processes costs more than the scenarios);
each scenario is reported as its own test. Within a scenario every rank runs all its collectives before
it asserts anything, so a failure on one rank cannot leave the other waiting in a collective.
"""

import copy
import json
import os
import socket
import sys
import time
import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from timm.layers import Mlp
from torch.utils._python_dispatch import TorchDispatchMode

from softmoe import BatchedMlp, SoftMoE, SoftMoELayerWrapper, SoftMoEVisionTransformer
from softmoe.parallel import (
    ExpertParallel,
    all_reduce_expert_grads,
    all_reduce_replicated_grads,
    clip_grad_norm_,
    distributed_data_parallel,
    expert_data_mesh,
    expert_parameter_names,
    gather_expert_parallel_state_dict,
    shard_state_dict,
    to_expert_parallel,
)

WORLD_SIZE = 2
PER_RANK_BATCH = 2
TINY_VIT = dict(
    img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0, num_classes=3,
    num_experts=4, slots_per_expert=2, moe_layer_index=1,
)
EXACT = dict(rtol=1e-10, atol=1e-12)  # float64 throughout: only the order of additions differs


def soft_moe_layer():
    return SoftMoE(8, hidden_features=16, num_experts=4, slots_per_expert=2).double()


def stacked_layer():  # any expert bank stacked over the experts, here timm Mlps under vmap
    layer = SoftMoELayerWrapper(8, num_experts=4, slots_per_expert=2, layer=Mlp, in_features=8, hidden_features=16)
    return layer.double()


def tiny_vit(seed):
    torch.manual_seed(seed)
    return SoftMoEVisionTransformer(**TINY_VIT).double()


def local_slice(rank, batch_sizes):
    start = sum(batch_sizes[:rank])
    return slice(start, start + batch_sizes[rank])


def single_process_name(name):
    """The single-process name of an expert-parallel parameter, and whether it is an expert shard."""
    return name.replace(".local_experts", ""), ".local_experts." in name


def assert_grads_match(model, reference, rank, factor=1.0):
    """Every parameter's gradient equals ``factor`` x the single-process one (experts: this rank's slice)."""
    reference_params = dict(reference.named_parameters())
    for name, param in model.named_parameters():
        full_name, is_expert = single_process_name(name)
        expected = reference_params[full_name].grad * factor
        if is_expert:
            count = expected.shape[0] // WORLD_SIZE
            expected = expected[rank * count : (rank + 1) * count]
        torch.testing.assert_close(param.grad, expected, **EXACT, msg=lambda m: f"{name}: {m}")


# Scenarios, run on every rank -------------------------------------------------------------------


def layer_matches_single_process(rank):
    """Forward output and input/parameter gradients of an expert-parallel layer, for two kinds of bank."""
    for make_layer in (soft_moe_layer, stacked_layer):
        torch.manual_seed(0)
        reference = make_layer()
        layer = to_expert_parallel(copy.deepcopy(reference))
        assert isinstance(layer.experts, ExpertParallel) and layer.experts.num_local_experts == 2
        x = torch.randn(WORLD_SIZE * PER_RANK_BATCH, 6, 8, dtype=torch.float64)  # the global batch
        target = torch.randn(WORLD_SIZE * PER_RANK_BATCH, 6, 8, dtype=torch.float64)
        mine = local_slice(rank, [PER_RANK_BATCH] * WORLD_SIZE)

        x_ref = x.clone().requires_grad_()
        output_ref = reference(x_ref)
        F.mse_loss(output_ref, target).backward()  # the mean over the global batch ...

        x_local = x[mine].clone().requires_grad_()
        output = layer(x_local)
        F.mse_loss(output, target[mine]).backward()  # ... is the mean over ranks of the local means
        all_reduce_replicated_grads(layer)

        torch.testing.assert_close(output, output_ref[mine], **EXACT)
        # d(global mean)/dx = d(local mean)/dx / world size
        torch.testing.assert_close(x_local.grad, x_ref.grad[mine] * WORLD_SIZE, **EXACT)
        assert_grads_match(layer, reference, rank)


def uneven_batches_match_single_process(rank):
    """With ``uneven_batches``, ranks may feed different batch sizes (3 and 1 examples here)."""
    torch.manual_seed(0)
    reference = soft_moe_layer()
    layer = to_expert_parallel(copy.deepcopy(reference), uneven_batches=True)
    batch_sizes = [3, 1]
    x = torch.randn(sum(batch_sizes), 5, 8, dtype=torch.float64)
    mine = local_slice(rank, batch_sizes)

    x_ref = x.clone().requires_grad_()
    output_ref = reference(x_ref)
    output_ref.pow(2).sum().backward()  # a sum over examples: the global loss is the sum of the ranks' losses

    x_local = x[mine].clone().requires_grad_()
    output = layer(x_local)
    output.pow(2).sum().backward()
    all_reduce_replicated_grads(layer)

    torch.testing.assert_close(output, output_ref[mine], **EXACT)
    torch.testing.assert_close(x_local.grad, x_ref.grad[mine], **EXACT)
    # parameter gradients are averaged over ranks, replicated and expert alike
    assert_grads_match(layer, reference, rank, factor=1.0 / WORLD_SIZE)


def autocast_after_an_autocast_forward_before_the_conversion(rank):
    """A layer that ran under autocast before the conversion (a sanity forward) kept bf16 copies of the whole bank;
    converted, it reads copies of this rank's experts: its autocast forward equals the single-process one's."""
    torch.manual_seed(0)
    reference = SoftMoE(8, hidden_features=16, num_experts=4, slots_per_expert=2)
    x = torch.randn(WORLD_SIZE * PER_RANK_BATCH, 6, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x)  # makes the whole bank's copies, then carried into the converted layer
    layer = to_expert_parallel(copy.deepcopy(reference))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = layer(x[local_slice(rank, [PER_RANK_BATCH] * WORLD_SIZE)])
    torch.testing.assert_close(output, expected[local_slice(rank, [PER_RANK_BATCH] * WORLD_SIZE)], rtol=0, atol=0)


def state_dict_round_trip(rank):
    """Gathering the shards gives the single-process state dict; sharding it gives every rank's part back."""
    reference = tiny_vit(seed=0)
    model = to_expert_parallel(tiny_vit(seed=rank))  # rank 1 starts elsewhere: rank 0's weights are broadcast
    gathered = gather_expert_parallel_state_dict(model)
    local = shard_state_dict(reference.state_dict(), model)
    restored = to_expert_parallel(tiny_vit(seed=7 + rank), broadcast=False)
    restored.load_state_dict(local)
    ema_copy = copy.deepcopy(restored)  # an EMA of the model deep-copies it: the process group must not be copied

    images = torch.randn(WORLD_SIZE * PER_RANK_BATCH, 3, 8, 8, dtype=torch.float64)
    mine = local_slice(rank, [PER_RANK_BATCH] * WORLD_SIZE)
    with torch.no_grad():
        expected, restored_out, copy_out = reference(images)[mine], restored(images[mine]), ema_copy(images[mine])

    if rank == 0:
        assert list(gathered) == list(reference.state_dict())
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(gathered[key], value, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    else:
        assert gathered is None
    for key, value in model.state_dict().items():
        torch.testing.assert_close(local[key], value, rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(restored_out, expected, **EXACT)
    torch.testing.assert_close(copy_out, expected, **EXACT)
    assert set(expert_parameter_names(model)) == {
        f"blocks.1.mlp.experts.local_experts.{name}" for name in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    }


def _train(model, images, labels, reduce_and_clip_grads, steps=3):
    """SGD with momentum and weight decay; returns the losses and the gradient norms before clipping."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    losses, norms = [], []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        norms.append(reduce_and_clip_grads())
        optimizer.step()
        losses.append(loss.detach())
    return torch.stack(losses), torch.stack(norms)


def _training_matches_single_process(rank, wrap_ddp, norm_type):
    """A few steps on 2 x 2 examples equal single-process steps on the 4 examples, clipping included."""
    reference = tiny_vit(seed=0)
    model = to_expert_parallel(copy.deepcopy(reference))
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(WORLD_SIZE * PER_RANK_BATCH, 3, 8, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 3, (WORLD_SIZE * PER_RANK_BATCH,), generator=generator)
    mine = local_slice(rank, [PER_RANK_BATCH] * WORLD_SIZE)
    max_norm = 0.01  # small enough that clipping acts on every step

    def clip_reference():
        return torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm, norm_type)

    def reduce_and_clip():
        if not wrap_ddp:  # DDP averages the replicated gradients during backward
            all_reduce_replicated_grads(model)
        return clip_grad_norm_(trained, max_norm, norm_type)

    trained = distributed_data_parallel(model) if wrap_ddp else model
    losses_ref, norms_ref = _train(reference, images, labels, clip_reference)
    losses, norms = _train(trained, images[mine], labels[mine], reduce_and_clip)
    dist.all_reduce(losses)
    gathered = gather_expert_parallel_state_dict(trained)

    assert (norms_ref > max_norm).all()
    torch.testing.assert_close(losses / WORLD_SIZE, losses_ref, **EXACT)
    torch.testing.assert_close(norms, norms_ref, **EXACT)
    if rank == 0:
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(gathered[key], value, **EXACT, msg=lambda m: f"{key}: {m}")


def training_with_manual_grad_reduction(rank):
    _training_matches_single_process(rank, wrap_ddp=False, norm_type=float("inf"))


def training_with_ddp(rank):
    _training_matches_single_process(rank, wrap_ddp=True, norm_type=2.0)


class _AllToAllInputs(TorchDispatchMode):
    """Records whether each all_to_all's input is contiguous, forward and backward."""

    def __init__(self):
        super().__init__()
        self.contiguous = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "all_to_all" in func.name():
            self.contiguous.append(args[0].is_contiguous())
        return func(*args, **(kwargs or {}))


def collectives_get_contiguous_inputs(rank):
    """torch 2.11's all_to_all (the GPU machines' torch) refuses a non-contiguous input where 2.14's copies it;
    the experts return a transposed view, so the layer must pass its outputs contiguous, forward and backward."""
    for make_layer in (soft_moe_layer, stacked_layer):
        layer = to_expert_parallel(make_layer())
        x = torch.randn(PER_RANK_BATCH, 6, 8, dtype=torch.float64, requires_grad=True)
        with _AllToAllInputs() as recorded:
            layer(x).square().sum().backward()
        assert len(recorded.contiguous) == 4, recorded.contiguous  # two forward, two backward
        assert all(recorded.contiguous), f"{make_layer.__name__}: contiguous inputs {recorded.contiguous}"


def clear_errors(rank):
    """Argument errors are raised on every rank before any collective."""
    with pytest.raises(ValueError, match=r"num_experts divisible by the world size: .* num_experts=3, world size is 2"):
        to_expert_parallel(SoftMoE(8, num_experts=3))
    with pytest.raises(ValueError, match="has no MoE layer"):
        to_expert_parallel(Mlp(8, 16))
    with pytest.raises(ValueError, match="must stack every parameter and buffer over the experts"):
        ExpertParallel(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.Linear(4, 8)))
    layer = to_expert_parallel(SoftMoE(8, num_experts=4))
    with pytest.raises(ValueError, match="SoftMoE is already expert-parallel: to_expert_parallel splits the experts"):
        to_expert_parallel(layer)
    with pytest.raises(ValueError, match=r"slots must have shape \[batch, num_experts=4, .* got \[2, 2, 1, 8\]"):
        layer.experts(torch.randn(2, 2, 1, 8))
    wrong = {**SoftMoE(8, num_experts=2).state_dict(), "phi": layer.phi.detach()}
    message = r"'experts.fc1_weight' must stack num_experts=4 experts .* got shape \[2, 8, 8\]"
    with pytest.raises(ValueError, match=message):
        shard_state_dict(wrong, layer)
    with pytest.raises(ValueError, match="no expert-parallel layers: call to_expert_parallel first"):
        all_reduce_replicated_grads(SoftMoE(8, num_experts=4))


SCENARIOS = {
    fn.__name__: fn
    for fn in (
        layer_matches_single_process,
        uneven_batches_match_single_process,
        autocast_after_an_autocast_forward_before_the_conversion,
        state_dict_round_trip,
        training_with_manual_grad_reduction,
        training_with_ddp,
        collectives_get_contiguous_inputs,
        clear_errors,
    )
}


# One rank: an expert group of one (FSDP over ranks whose trainer.expert_parallel_size=1) ------------


def one_rank_returns_its_experts_outputs_not_a_view(rank):
    """With one rank the exchange's buffer reshapes to the output without a copy: a view, on which FSDP2 warned at
    every call ("can cause backward to fail or produce wrong gradients")."""
    torch.manual_seed(0)
    reference = soft_moe_layer()
    layer = to_expert_parallel(copy.deepcopy(reference))
    slots = torch.randn(2, 4, 2, 8, dtype=torch.float64)
    output = layer.experts(slots)
    assert not output._is_view()
    torch.testing.assert_close(output, reference.experts(slots), **EXACT)


ONE_RANK_SCENARIOS = {fn.__name__: fn for fn in (one_rank_returns_its_experts_outputs_not_a_view,)}


# Four ranks: a data x expert mesh ---------------------------------------------------------------

MESH_WORLD_SIZE = 4


def _training_on_a_mesh_matches_single_process(rank, expert_parallel_size, wrap_ddp):
    """3 SGD steps on 4 x 2 examples, on a (4 / E) x E mesh, equal single-process steps on the 8 examples."""
    mesh = expert_data_mesh("cpu", expert_parallel_size)
    expert_group, data_group = mesh["expert"].get_group(), mesh["data"].get_group()
    reference = tiny_vit(seed=0)
    model = to_expert_parallel(tiny_vit(seed=rank), expert_group, data_group=data_group)  # rank 0's weights
    layer = model.blocks[1].mlp.experts
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(MESH_WORLD_SIZE * PER_RANK_BATCH, 3, 8, 8, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 3, (MESH_WORLD_SIZE * PER_RANK_BATCH,), generator=generator)
    mine = local_slice(rank, [PER_RANK_BATCH] * MESH_WORLD_SIZE)
    max_norm = 0.01

    def clip_reference():
        return torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm)

    def reduce_and_clip():
        if not wrap_ddp:
            all_reduce_replicated_grads(model)
        all_reduce_expert_grads(model)
        return clip_grad_norm_(trained, max_norm)

    trained = distributed_data_parallel(model) if wrap_ddp else model
    losses_ref, norms_ref = _train(reference, images, labels, clip_reference)
    losses, norms = _train(trained, images[mine], labels[mine], reduce_and_clip)
    dist.all_reduce(losses)
    gathered = gather_expert_parallel_state_dict(trained)  # on the first rank of every replica

    count = 4 // expert_parallel_size
    assert (layer.num_local_experts, layer.first_expert) == (count, rank % expert_parallel_size * count)
    assert layer.data_world_size == MESH_WORLD_SIZE // expert_parallel_size
    assert (norms_ref > max_norm).all()
    torch.testing.assert_close(losses / MESH_WORLD_SIZE, losses_ref, **EXACT)
    torch.testing.assert_close(norms, norms_ref, **EXACT)
    assert (gathered is not None) == (rank % expert_parallel_size == 0)
    if gathered is not None:
        for key, value in reference.state_dict().items():
            torch.testing.assert_close(gathered[key], value, **EXACT, msg=lambda m: f"{key}: {m}")


def two_replicas_of_two_expert_ranks_with_ddp(rank):
    _training_on_a_mesh_matches_single_process(rank, expert_parallel_size=2, wrap_ddp=True)


def two_replicas_of_two_expert_ranks_manual_reduction(rank):
    _training_on_a_mesh_matches_single_process(rank, expert_parallel_size=2, wrap_ddp=False)


def one_group_of_four_expert_ranks(rank):  # the flat layout, as a 1 x 4 mesh
    _training_on_a_mesh_matches_single_process(rank, expert_parallel_size=4, wrap_ddp=True)


def four_replicas_of_one_expert_rank(rank):  # every rank holds every expert: data parallel through the mesh
    _training_on_a_mesh_matches_single_process(rank, expert_parallel_size=1, wrap_ddp=True)


def mesh_errors(rank):
    with pytest.raises(ValueError, match="expert_parallel_size=3 must divide the world size 4"):
        expert_data_mesh("cpu", 3)
    for size in (0, 1.0, True):
        with pytest.raises(ValueError, match=f"expert_parallel_size must be a positive integer, got {size!r}"):
            expert_data_mesh("cpu", size)
    mesh = expert_data_mesh("cpu", 2)
    message = r"the experts' group \(4 ranks\) x their data-parallel group \(2\) must span the world of 4 ranks"
    with pytest.raises(ValueError, match=message):
        ExpertParallel(BatchedMlp(4, 8), dist.group.WORLD, data_group=mesh["data"].get_group())


MESH_SCENARIOS = {
    fn.__name__: fn
    for fn in (
        two_replicas_of_two_expert_ranks_with_ddp,
        two_replicas_of_two_expert_ranks_manual_reduction,
        one_group_of_four_expert_ranks,
        four_replicas_of_one_expert_rank,
        mesh_errors,
    )
}


# Process management -----------------------------------------------------------------------------


def _worker(rank, port, results_dir, world_size, scenarios, cwd):
    os.chdir(cwd)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    shared = os.path.join(results_dir, SHARED_FILE)
    if os.path.exists(shared):  # what the parent prepared: into the SHARED dict of the scenarios' module
        modules = {sys.modules[scenario.__module__] for scenario in scenarios.values()}
        for module in modules:
            module.SHARED.update(torch.load(shared, weights_only=False))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60))
    results = {}
    try:
        for name, scenario in scenarios.items():
            try:
                scenario(rank)
                results[name] = None
            except BaseException:  # pytest's failures are BaseExceptions
                results[name] = traceback.format_exc()
            dist.barrier()
    finally:
        with open(os.path.join(results_dir, f"rank{rank}.json"), "w") as file:
            json.dump(results, file)
        dist.destroy_process_group()


def free_port():
    """A TCP port free on this host now, for a process group's rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SHARED_FILE = "shared.pt"
# Modules the rank processes need, imported once by the fork server rather than by every rank
FORK_SERVER_PRELOAD = ["torch", "torch.distributed", "timm", "softmoe", "softmoe.harness.fsdp", "test_expert_parallel"]


def fork_server():
    """The multiprocessing context whose processes fork from a fork server (see ``run_scenarios`` for why); the
    server imports ``FORK_SERVER_PRELOAD`` when it starts, once per pytest process."""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return context


def start_two_ranks(function, *args):
    """``function(rank, *args)`` in 2 processes until both return (an error in either fails the test), forked from
    the fork server: a fresh interpreter per rank spent seconds importing torch and softmoe, a test's own work a
    second or two."""
    fork_server()
    mp.start_processes(function, args=args, nprocs=2, join=True, start_method="forkserver")


def run_scenarios(results_dir, world_size, scenarios, shared=None):
    """{scenario: {rank: None, or the traceback of its failure}} after every rank ran every scenario.

    The ranks start from a fork server, not by forking this test process, so they never inherit what earlier
    tests in the same pytest-xdist worker left behind: an autograd engine that refuses to run in forked children
    (tests/conftest.py explains when, and guards the tests that must fork), OpenMP's thread pool, global state.
    The server is started once per pytest process with torch, timm and softmoe imported, so each rank starts in
    well under a second. The scenarios are pickled by name (they are module-level functions); what they need from
    the parent is ``shared``, which every rank finds in its module's ``SHARED`` dict.
    """
    if shared is not None:
        torch.save(shared, results_dir / SHARED_FILE)
    fork_server()
    context = mp.start_processes(
        _worker, args=(free_port(), str(results_dir), world_size, scenarios, os.getcwd()), nprocs=world_size,
        join=False, start_method="forkserver",
    )
    deadline = time.monotonic() + 240
    try:
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                pytest.fail("the expert-parallel worker processes did not finish within 240 s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
    results = {}
    for rank in range(world_size):
        with open(results_dir / f"rank{rank}.json") as file:
            for name, error in json.load(file).items():
                results.setdefault(name, {})[rank] = error
    return results


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("expert_parallel"), WORLD_SIZE, SCENARIOS)


@pytest.fixture(scope="module")
def one_rank_results(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("one_rank"), 1, ONE_RANK_SCENARIOS)


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    return run_scenarios(tmp_path_factory.mktemp("mesh"), MESH_WORLD_SIZE, MESH_SCENARIOS)


def assert_passed_on_every_rank(results, scenario, world_size):
    outcome = results.get(scenario)
    assert outcome is not None and len(outcome) == world_size, f"{scenario} did not run on every rank"
    failures = {rank: error for rank, error in outcome.items() if error}
    assert not failures, "\n".join(f"rank {rank}:\n{error}" for rank, error in failures.items())


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks(two_rank_results, scenario):
    assert_passed_on_every_rank(two_rank_results, scenario, WORLD_SIZE)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(ONE_RANK_SCENARIOS))
def test_one_rank(one_rank_results, scenario):
    assert_passed_on_every_rank(one_rank_results, scenario, 1)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", list(MESH_SCENARIOS))
def test_four_ranks_on_a_data_by_expert_mesh(mesh_results, scenario):
    assert_passed_on_every_rank(mesh_results, scenario, MESH_WORLD_SIZE)


def test_needs_an_initialised_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        to_expert_parallel(SoftMoE(8, num_experts=4))
    with pytest.raises(RuntimeError, match="call torch.distributed.init_process_group"):
        ExpertParallel(BatchedMlp(2, 8))
