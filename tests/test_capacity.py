"""Sizes no process can hold are refused by the config check, in one line, before anything is built
(softmoe/harness/capacity.py); what a process can hold passes."""


import pytest
import torch
from omegaconf import OmegaConf

from softmoe.harness.capacity import (
    BLOCK_OBJECT_BYTES,
    WORKERS_PER_CPU,
    check_parameters_fit,
    parameters_lower_bound,
    physical_memory,
    run_capacity,
    usable_cpus,
)
from softmoe.harness.config import ConfigError, check_config
from softmoe.harness.model import build_model, moe_blocks
from softmoe.harness.rules import counted, plain



def refusal(compose_run, *overrides, on_this_machine=True) -> str:
    with pytest.raises(ConfigError) as raised:
        check_config(compose_run(*overrides), on_this_machine=on_this_machine)
    message = str(raised.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("overrides", [
    [],  # vit_micro, Soft MoE in the last half
    ["moe=dense"],
    ["model=vit_small", "data.img_size=32", "moe.num_experts=128", "model.depth=2"],
    ["moe=all", "moe.num_experts=4", "model.mlp_ratio=2.5", "+model.qkv_bias=false"],
    ["moe=every_other", "model.embed_dim=48", "model.num_heads=3", "model.depth=5", "routing=tokens_choice"],
])
def test_the_parameter_bound_is_below_the_built_models_count_and_close_to_it(compose_run, overrides):
    config = plain(compose_run(*overrides))
    with torch.device("meta"):
        network = build_model(config["model"], config["moe"], upcycle_weights=False)
    actual = sum(p.numel() for p in network.parameters())
    bound = parameters_lower_bound(config["model"], config["moe"], len(moe_blocks(config["moe"],
                                                                                 config["model"]["depth"])))
    assert 0.75 * actual < bound <= actual  # a lower bound, so it refuses no model that fits


def test_a_depth_no_memory_holds_is_refused_before_the_blocks_are_listed(compose_run):
    message = refusal(compose_run, "model.depth=1000000000000")  # listing 5e11 MoE blocks was a MemoryError
    assert message.startswith("model.depth=1000000000000: 1,000,000,000,000 blocks need at least ")
    assert "TiB for their Python objects alone" in message and "this machine's" in message
    fits = physical_memory() // BLOCK_OBJECT_BYTES
    assert refusal(compose_run, f"model.depth={fits + 1}").startswith(f"model.depth={fits + 1}: ")


@pytest.mark.parametrize("overrides,lead", [
    (["model.embed_dim=1000000000000"], "model.embed_dim=1000000000000: with model.depth=4, model.mlp_ratio=4.0 "
                                        "and moe.num_experts=16, the model has at least 2.88e+26 parameters"),
    (["model.mlp_ratio=1e30"], "model.mlp_ratio=1e+30: with model.depth=4, model.embed_dim=64 and "
                               "moe.num_experts=16, the model has at least "),
    (["moe.num_experts=100000000", "trainer.max_tokens_per_image=null"], "moe.num_experts=100000000: "),
    (["moe=dense", "model.embed_dim=1000000"], "model.embed_dim=1000000: with model.depth=4 and model.mlp_ratio=4.0, "),
])
def test_a_model_whose_parameters_no_memory_holds_names_the_key_furthest_beyond_the_papers(compose_run, overrides,
                                                                                           lead):
    message = refusal(compose_run, *overrides)
    assert message.startswith(lead)
    assert "in float32 built whole on every rank, more than this machine's" in message
    assert "or build it in shares over the ranks (trainer.init_device=meta)" in message


def test_with_meta_init_the_bound_is_a_ranks_share(compose_run, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU's memory would count as the bound")
    width = 1024
    while 4 * parameters_lower_bound({"depth": 4, "embed_dim": width, "mlp_ratio": 4.0}, {"num_experts": 16}, 2) \
            <= physical_memory():
        width *= 2  # the narrowest power of 2 this machine cannot hold
    config = plain(compose_run(f"model.embed_dim={width}", "model.num_heads=4", "trainer.init_device=meta"))
    bytes_whole = 4 * parameters_lower_bound(config["model"], config["moe"], 2)
    capacity = run_capacity(config)
    with pytest.raises(ConfigError, match="in float32 on each rank, more than"):
        check_parameters_fit(config, 2, capacity)
    monkeypatch.setenv("WORLD_SIZE", str(-(-bytes_whole // capacity.memory)))  # enough ranks to hold a share each
    check_parameters_fit(config, 2, capacity)


def test_threads_beyond_the_cpus_and_workers_beyond_four_per_cpu_are_refused(compose_run):
    cpus = usable_cpus()
    check_config(compose_run(f"trainer.num_threads={cpus}", f"trainer.num_workers={WORKERS_PER_CPU * cpus}"))
    message = refusal(compose_run, "trainer.num_threads=1000000000000")  # torch: "Overflow when unpacking long"
    assert message == (f"trainer.num_threads=1000000000000: more than the {counted(cpus, 'CPU')} this process may "
                       "use; threads beyond the cores take turns on them, each step slower (and thousands abort the "
                       f"process); use at most {cpus}, or null for torch's default")
    assert refusal(compose_run, f"trainer.num_threads={cpus + 1}").startswith(f"trainer.num_threads={cpus + 1}: ")
    message = refusal(compose_run, "trainer.num_workers=1000")  # forked until the OOM killer acted
    assert message.startswith(f"trainer.num_workers=1000: more than {WORKERS_PER_CPU} DataLoader worker processes "
                              f"per CPU (the {counted(cpus, 'CPU')} this process may use)")
    assert f"use at most {WORKERS_PER_CPU * cpus} (one per CPU, {cpus}, keeps them busy)" in message


def test_a_slurm_job_is_held_to_its_own_cpus_and_memory_not_the_login_nodes(compose_run):
    slurm = ["launcher=slurm", "launcher.cpus_per_task=64", "launcher.mem_gb=4096"]
    check_config(compose_run(*slurm, "trainer.num_threads=64", "trainer.num_workers=512", "model.embed_dim=40000",
                             "model.num_heads=4"))  # 2.6e10 parameters, 103 GB: more than this machine, not the job
    assert refusal(compose_run, *slurm, "trainer.num_workers=513").startswith(
        "trainer.num_workers=513: more than 8 DataLoader worker processes per CPU (the launcher.cpus_per_task=64 of "
        "each SLURM task)")
    assert "more than the launcher.mem_gb=64 of each SLURM node" in refusal(
        compose_run, "launcher=slurm", "model.embed_dim=40000", "model.num_heads=4")


def test_the_gpu_preset_runs_where_one_cpu_is_lent(compose_run, monkeypatch):
    # trainer=gpu's 8 workers were refused at 4 per CPU on a host that lends one CPU (a pinned pod)
    monkeypatch.setattr("softmoe.harness.capacity.usable_cpus", lambda: 1)
    check_config(compose_run("trainer=gpu", "trainer.device=cpu", "trainer.precision=fp32", "trainer.compile=false"))
    assert "(the 1 CPU this process may use)" in refusal(compose_run, "trainer.num_workers=9")


def test_a_plan_shares_a_meta_built_model_over_its_world_size(compose_run):
    """``python -m softmoe.plan ... world_size=4096``: each rank's share, not the whole model (was refused)."""
    from softmoe.plan import compose_plan_config

    huge = ["model=vit_huge", "data=imagefolder", "data.root=/tmp", "moe=all", "moe.num_experts=4096",
            "trainer.init_device=meta", "trainer.batch_size=4096", "gpu_memory_gb=80"]
    check_config(compose_plan_config([*huge, "world_size=4096"]), on_this_machine=False)
    with pytest.raises(ConfigError, match="6.25 TiB in float32 on each rank, more than the 2 TiB"):
        check_config(compose_plan_config([*huge, "world_size=1"]), on_this_machine=False)


def test_a_plan_for_another_machine_leaves_its_cpus_alone_and_still_refuses_the_impossible(compose_run):
    check_config(compose_run(f"trainer.num_threads={usable_cpus() + 1}"), on_this_machine=False)
    message = refusal(compose_run, "model.depth=1000000000000", on_this_machine=False)
    assert "more than the 2 TiB of memory one node holds" in message


def test_the_launcher_keys_are_checked_before_they_are_read(compose_run):
    cfg = compose_run("launcher=slurm")
    OmegaConf.update(cfg, "launcher.mem_gb", "lots")
    with pytest.raises(ConfigError, match=r"^launcher.mem_gb=lots: must be a positive integer"):
        check_config(cfg)
