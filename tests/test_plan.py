"""The memory planner (``python -m softmoe.plan``) against the real state tensors of small built models: exact for
parameters, gradients and optimizer state under DDP, expert parallelism and FSDP2's sharding; its layouts and
recommendation; its one-line errors. The GPU check against ``torch.cuda.max_memory_allocated`` is in
``tests/test_cuda.py``."""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore

from softmoe.harness.memory import Layout, feasible_layouts, rank_memory, shapes_of
from softmoe.harness.model import build_model
from softmoe.harness.optim import build_optimizer
from softmoe.parallel import _shard_bank_
from softmoe.plan import compose_plan_config, main, plan_run

TINY = ["model=vit_micro", "moe.num_experts=4", "moe.slots_per_expert=2", "trainer.batch_size=8"]


def real_state_bytes(model, optimizer):
    """(parameter, gradient, optimizer state) bytes of the tensors the model and optimizer hold after a step."""
    params = sum(p.untyped_storage().nbytes() for p in model.parameters())
    grads = sum(p.grad.untyped_storage().nbytes() for p in model.parameters() if p.grad is not None)
    state = sum(
        value.untyped_storage().nbytes()
        for per_param in optimizer.state.values()
        for value in per_param.values()
        if isinstance(value, torch.Tensor)
    )
    return params, grads, state


def built(overrides):
    config = compose_plan_config([*TINY, *overrides])
    torch.manual_seed(0)
    return build_model(config["model"], config["moe"]), config


def one_step(model, config):
    """A real optimizer (the config's) after one step on zero gradients: its state is allocated."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer = build_optimizer(config["optimizer"], model, config["moe"])
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_bf16", "sgd"])
def test_ddp_figures_are_the_bytes_of_the_real_parameters_gradients_and_optimizer_state(optimizer):
    model, config = built([f"optimizer={optimizer}"])
    shapes = shapes_of(model, config)  # the planner builds on the meta device; the same shapes
    assert shapes == plan_run([*TINY, f"optimizer={optimizer}", "world_size=1"]).shapes
    planned = rank_memory(shapes, Layout("ddp"), world_size=1, batch_size=8)
    assert (planned.parameters, planned.gradients, planned.optimizer) == real_state_bytes(
        model, one_step(model, config)
    )


@pytest.mark.parametrize("expert_parallel_size", [2, 4])
def test_expert_parallel_figures_are_the_bytes_of_one_ranks_real_shard(expert_parallel_size):
    model, config = built([])
    shapes = shapes_of(model, config)
    count = 4 // expert_parallel_size
    for block in model.blocks:
        if hasattr(block.mlp, "experts"):
            _shard_bank_(block.mlp.experts, 0, count)  # what to_expert_parallel keeps on rank 0
    planned = rank_memory(shapes, Layout("ep", expert_parallel_size), world_size=4, batch_size=8)
    assert (planned.parameters, planned.gradients, planned.optimizer) == real_state_bytes(
        model, one_step(model, config)
    )


@pytest.fixture
def fake_world_of_4():
    """A process group of 4 ranks in which this process is rank 0 and collectives do nothing: FSDP2 shards
    exactly as it would on 4 GPUs."""
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        yield init_device_mesh("cpu", (4,))
    finally:
        dist.destroy_process_group()


def test_fsdp_parameter_figures_are_the_bytes_of_fully_shards_rank_0_shards(fake_world_of_4):
    # a head of 3 rows over 4 ranks: rank 0 holds 1, rank 3 none
    model, config = built(["data=synthetic", "data.num_classes=3"])
    shapes = shapes_of(model, config)
    for block in model.blocks:
        fully_shard(block, mesh=fake_world_of_4)
    fully_shard(model, mesh=fake_world_of_4)
    real = sum(p.to_local().untyped_storage().nbytes() for p in model.parameters())
    planned = rank_memory(shapes, Layout("fsdp"), world_size=4, batch_size=8)
    assert planned.parameters == real
    assert planned.gradients == real  # sharded like the parameters (reduce-scatter)
    assert planned.optimizer == 2 * real + 4 * len(list(model.parameters()))  # AdamW: two moments and a step each


def test_layouts_need_expert_groups_that_divide_the_world_and_the_experts_and_prefer_ones_inside_a_node():
    names = [str(layout) for layout in feasible_layouts(num_experts=8, world_size=16, gpus_per_node=4)]
    assert names == ["DDP", "EP 2", "EP 4", "FSDP+EP 2", "FSDP+EP 4", "FSDP", "EP 8", "FSDP+EP 8"]  # 16: 8 experts
    assert [str(layout) for layout in feasible_layouts(8, 6, 8)] == ["DDP", "EP 2", "FSDP+EP 2", "FSDP"]
    assert [str(layout) for layout in feasible_layouts(8, 4, 8, moe=False)] == ["DDP", "FSDP"]


def test_expert_groups_of_a_world_inside_one_node_never_span_nodes(capsys):
    # 6 ranks on a node of 8: groups of 3 and 6 stay on it (were listed last, as spanning nodes)
    assert [str(layout) for layout in feasible_layouts(12, 6, 8)] == [
        "DDP", "EP 2", "EP 3", "EP 6", "FSDP+EP 2", "FSDP+EP 3", "FSDP+EP 6", "FSDP"]
    assert [str(layout) for layout in feasible_layouts(12, 12, 8)][-6:] == [  # 2 nodes: these cross them
        "EP 3", "EP 6", "EP 12", "FSDP+EP 3", "FSDP+EP 6", "FSDP+EP 12"]
    main(["world_size=6", "trainer.batch_size=60", "moe.num_experts=12"])
    assert "spans nodes" not in capsys.readouterr().out
    main(["world_size=6", "gpus_per_node=2", "trainer.batch_size=60", "moe.num_experts=12"])  # 3 nodes of 2
    assert "spans nodes" in capsys.readouterr().out


@pytest.mark.parametrize("moe", ["last_half", "dense"])
def test_bf16_activations_and_weight_copies_are_what_an_autocast_forward_saves(moe):
    """Under bf16 autocast the planner counted every saved element at 2 bytes (12-19% low: the residual stream and
    the routing stay float32) and left out the weights' bf16 copies. Measured: the storages a CPU forward saves for
    backward, at two batch sizes (per image: the slope; the weights' copies: what does not grow with the batch)."""
    from softmoe.harness.memory import activation_bytes_per_image, model_shapes

    model, config = built([f"moe={moe}", "trainer.precision=bf16", "model.drop_path_rate=0"])
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes(batch):
        storages = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in weights:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        images = torch.randn(batch, config["model"]["in_chans"], config["model"]["img_size"],
                             config["model"]["img_size"])
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", torch.bfloat16):
            model(images)
        return sum(storages.values())

    small, large = saved_bytes(8), saved_bytes(16)
    per_image, copies = (large - small) / 8, small - 8 * (large - small) / 8
    shapes = model_shapes(config)
    assert activation_bytes_per_image(shapes) == pytest.approx(per_image, rel=0.05)
    planned = rank_memory(shapes, Layout("ddp"), world_size=1, batch_size=8)
    buckets = planned.gradients  # DDP's float32 copy of the gradients
    assert planned.buffers - buckets == pytest.approx(copies, rel=0.05)


def test_the_recommendation_is_the_first_layout_that_fits():
    plan = plan_run([*TINY, "world_size=4", "gpu_memory_gb=80"])
    assert plan.recommended.layout == Layout("ddp")  # a tiny model fits anywhere
    tight = plan_run([*TINY, "world_size=4", f"gpu_memory_gb={plan.rows[0].total / 1024**3 / 0.9 * 0.99}"])
    fitting = [row for row in tight.rows if tight.fits(row)]
    assert tight.recommended is fitting[0] and tight.recommended.layout != Layout("ddp")
    state = {str(row.layout): row.state for row in tight.rows}
    assert state["EP 4"] < state["EP 2"] < state["DDP"] and state["FSDP"] == state["FSDP+EP 4"] < state["EP 4"]


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["world_size=0"], "error: world_size=0: must be a positive integer"),
        (["gpu_memory_gb=-1"], "error: gpu_memory_gb=-1: must be a number > 0"),
        (["model=vit_enormous"], "error: model=vit_enormous: not an option of model (options: vit_base, "),
        (["trainer.batch_sise=4"], "error: trainer.batch_sise=4: not a key of the config; did you mean "
                                   "trainer.batch_size?"),
        (["world_sise=4"], "error: world_sise=4: not a key of the config; did you mean world_size?"),
        (["--world-size", "4"], "error: --world-size: python -m softmoe.plan takes the train command's overrides"),
        # were: timm's AssertionError traceback; a plan of runs the train command refuses
        (["model.num_heads=5"], "error: model.num_heads=5: must divide model.embed_dim="),
        (["model=vit_base"], "error: model.patch_size=16: must divide the image size data.img_size="),
        (["world_size=3", "trainer.batch_size=64"], "error: trainer.batch_size=64: the global batch must be divisible "
                                                    "by the 3 processes (WORLD_SIZE=3)"),
        (["trainer.device=gpu"], "error: trainer.device=gpu: must be auto, cpu, cuda, cuda:<index> or mps"),
    ],
)
def test_bad_values_stop_with_one_line_and_status_2(capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_status:
        main([*TINY, *overrides])
    assert exit_status.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith(message) and error.count("\n") == 1


def test_a_run_for_gpus_is_planned_on_a_machine_without_one(capsys):
    main([*TINY, "world_size=4", "trainer.device=cuda", "trainer.precision=fp16"])  # the GPUs are the job's
    assert "Recommended: **DDP**" in capsys.readouterr().out


def test_help_prints_the_commands_usage(capsys):
    main(["--help"])
    assert capsys.readouterr().out.startswith("Plan the memory of a run on many GPUs")


def test_the_command_prints_every_layout_and_its_recommendation(capsys):
    main([*TINY, "world_size=4"])
    printed = capsys.readouterr().out
    for name in ("| DDP |", "| EP 2 |", "| EP 4 |", "| FSDP |", "| FSDP+EP 2 |", "| FSDP+EP 4 |"):
        assert name in printed
    assert "Recommended: **DDP**" in printed


@pytest.mark.slow
def test_the_plans_in_docs_scale_out_are_the_planners_current_output():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs" / "scale_out_plans.py"
    spec = importlib.util.spec_from_file_location("scale_out_plans", path)
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    page = generator.PAGE.read_text()
    assert generator.page_with_plans(page) == page, "stale: run python docs/scale_out_plans.py"
    assert page.count("Recommended: **") + page.count("Nothing fits") == 3 * 3 + 1  # and B/16 with bf16 moments


def test_a_model_no_gpu_holds_whole_is_told_to_build_on_the_meta_device(capsys):
    main([*TINY, "world_size=4"])
    assert "trainer.init_device=meta" not in capsys.readouterr().out  # a tiny model: the default build is fine
    whole_gib = plan_run([*TINY, "world_size=4"]).rows[0].parameters / 1024**3
    main([*TINY, "world_size=4", f"gpu_memory_gb={whole_gib / 0.9 * 0.99}"])  # just too small for the whole model
    printed = capsys.readouterr().out
    advice = f"Build it with trainer.init_device=meta: the whole model's parameters alone ({whole_gib:.2f} GiB)"
    assert advice in printed


def test_activation_checkpointing_and_reshard_after_forward_change_the_plan(capsys):
    """Both were read by the trainer, not the planner: the same rows either way, and a plan that did not fit told a
    run already checkpointing its activations to checkpoint them."""
    from softmoe.harness.memory import activation_elements_per_image, model_shapes

    base = [*TINY, "world_size=4"]
    plain, checkpointed = plan_run(base), plan_run([*base, "trainer.activation_checkpointing=true"])
    shapes = model_shapes(compose_plan_config(base))
    t, d = shapes.tokens, shapes.width
    full = activation_elements_per_image(shapes)
    # every block's input, and one MoE block's activations (the largest) while it is recomputed
    s, h = shapes.slots, shapes.mlp_width
    moe_block = 6 * t * d + 3 * t * d + 3 * t * s + 2 * s * d + 2 * s * h
    for row, kept in zip(checkpointed.rows, plain.rows):
        assert row.activations == kept.activations * (shapes.depth * t * d + moe_block) // full < kept.activations
    gathered = {str(row.layout): row.buffers for row in plan_run([*base, "trainer.reshard_after_forward=false"]).rows}
    for row in plain.rows:  # every block stays gathered under FSDP; DDP's and EP's buckets are the same
        assert gathered[str(row.layout)] > row.buffers if row.layout.strategy.startswith("fsdp") else \
            gathered[str(row.layout)] == row.buffers
    tight = f"gpu_memory_gb={checkpointed.rows[-1].total / 1024**3 / 10}"  # nothing fits
    main([*base, tight])
    (advice,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Nothing fits")]
    assert advice.endswith("use more GPUs or a smaller batch per GPU, or trainer.activation_checkpointing=true.")
    main([*base, tight, "trainer.activation_checkpointing=true"])
    (advice,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Nothing fits")]
    assert advice.endswith("use more GPUs or a smaller batch per GPU.")
