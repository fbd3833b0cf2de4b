"""Parameter groups (weight decay by name) and the learning-rate schedules."""

import math

import pytest
import torch
from omegaconf import OmegaConf

from softmoe import SoftMoEVisionTransformer
from softmoe.harness.optim import constant, decays, param_groups, warmup_cosine, warmup_rsqrt_cooldown


def test_weight_decay_skips_biases_norms_tokens_and_position_embedding_but_not_the_router():
    model = SoftMoEVisionTransformer(
        num_experts=4, moe_layer_index=1, img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2, reg_tokens=1,
        num_classes=3,
    )
    names = dict(model.named_parameters())
    for name in [
        "pos_embed", "cls_token", "reg_token", "blocks.0.norm1.weight", "blocks.0.norm1.bias", "norm.weight",
        "blocks.1.mlp.experts.fc1_bias", "blocks.1.mlp.experts.fc2_bias", "blocks.0.attn.qkv.bias", "head.bias",
    ]:
        assert name in names and not decays(name), name
    for name in ["blocks.1.mlp.phi", "blocks.1.mlp.scale", "blocks.1.mlp.experts.fc1_weight", "blocks.0.mlp.fc1.weight",
                 "blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "head.weight"]:
        assert name in names and decays(name), name
    assert not decays("blocks.1.mlp.experts.norm_weight")  # stacked per-expert LayerNorm [n, h]: 2-d, still a norm
    layer_scale = SoftMoEVisionTransformer(num_experts=4, moe_layer_index=1, img_size=8, patch_size=4, embed_dim=16,
                                           depth=2, num_heads=2, init_values=0.1)  # timm's LayerScale: ls1.gamma
    gammas = [name for name, _ in layer_scale.named_parameters() if name.endswith(".gamma")]
    assert gammas and not any(decays(name) for name in gammas)

    groups = param_groups(model, weight_decay=0.1, lr=1e-3)
    # by default the router's group trains exactly as the decayed weights do (vmoe)
    assert [(g["name"], g["weight_decay"], g.get("lr", 1e-3)) for g in groups] == [
        ("decay", 0.1, 1e-3), ("no_decay", 0.0, 1e-3), ("router", 0.1, 1e-3)
    ]
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    assert [id(p) for p in groups[2]["params"]] == [id(names["blocks.1.mlp.phi"]), id(names["blocks.1.mlp.scale"])]


def test_the_routers_learning_rate_and_weight_decay_are_their_own_knobs():
    from omegaconf import OmegaConf

    from softmoe.harness.optim import build_optimizer, build_scheduler

    model = SoftMoEVisionTransformer(
        num_experts=4, moe_layer_index=1, img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2
    )
    optimizer_cfg = OmegaConf.create(
        {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 2e-3, "weight_decay": 0.05}
    )
    optimizer = build_optimizer(optimizer_cfg, model, {"router_lr_mult": 10.0, "router_weight_decay": 0.0})
    router = optimizer.param_groups[2]
    assert router["name"] == "router" and router["lr"] == pytest.approx(2e-2) and router["weight_decay"] == 0.0
    assert {id(p) for p in router["params"]} == {id(model.blocks[1].mlp.phi), id(model.blocks[1].mlp.scale)}
    # the schedule scales every group's own rate, so the router keeps 10x the rest at every step
    scheduler_cfg = OmegaConf.create(
        {"_target_": "softmoe.harness.optim.warmup_cosine", "_partial_": True, "warmup_steps": 2}
    )
    scheduler = build_scheduler(scheduler_cfg, optimizer, total_steps=10)
    for _ in range(5):
        optimizer.step()
        scheduler.step()
        rates = scheduler.get_last_lr()
        assert rates[2] == pytest.approx(10 * rates[0]) and rates[0] > 0
    # a dense model has no router group
    from timm.models.vision_transformer import VisionTransformer

    dense = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=2)
    assert [g["name"] for g in param_groups(dense, 0.1, 1e-3, router_lr_mult=10)] == ["decay", "no_decay"]


def test_phi_weight_decay_gives_phi_its_own_group_and_zero_is_vmoes_split():
    """vmoe's Soft MoE decays the router scale (0.03) and not Φ, whose name ("mu") no decay rule matches; the
    harness decayed both, as the docs said vmoe did. phi_weight_decay=0 is vmoe's split; None keeps one group."""
    from softmoe.harness.optim import build_optimizer

    model = SoftMoEVisionTransformer(num_experts=4, moe_layer_index=[0, 1], img_size=8, patch_size=4, embed_dim=16,
                                     depth=2, num_heads=2)
    phis = {id(model.blocks[i].mlp.phi) for i in (0, 1)}
    scales = {id(model.blocks[i].mlp.scale) for i in (0, 1)}
    optimizer_cfg = OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3,
                                      "weight_decay": 0.03})
    groups = {g["name"]: g for g in build_optimizer(optimizer_cfg, model, {"router_lr_mult": 2.0,
                                                                            "phi_weight_decay": 0.0}).param_groups}
    assert list(groups) == ["decay", "no_decay", "router", "router_phi"]
    assert {id(p) for p in groups["router"]["params"]} == scales and groups["router"]["weight_decay"] == 0.03
    assert {id(p) for p in groups["router_phi"]["params"]} == phis and groups["router_phi"]["weight_decay"] == 0.0
    assert groups["router_phi"]["lr"] == groups["router"]["lr"] == pytest.approx(2e-3)
    # the same decay as the router's (or none given): one router group, as in every checkpoint before the option
    for same in (None, 0.03):
        names = [g["name"] for g in param_groups(model, 0.03, 1e-3, phi_weight_decay=same)]
        assert names == ["decay", "no_decay", "router"]


def test_scale_init_sets_the_routers_starting_scale_in_every_router():
    from softmoe import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE

    for layer_class in (SoftMoE, TokensChoiceMoE, ExpertsChoiceMoE):
        layer = layer_class(16, num_experts=4, scale_init=7.5)
        assert layer.scale.item() == 7.5
        layer.scale.data.fill_(1.0)
        layer.init_weights()  # the re-init (timm's init_weights) restores it
        assert layer.scale.item() == 7.5
    for bad in (0, -1.0, float("inf"), "10", True):
        with pytest.raises(ValueError, match=r"scale_init must be a finite number > 0, got"):
            SoftMoE(16, num_experts=4, scale_init=bad)


def multipliers(make, total_steps, **kwargs):
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    scheduler = make(optimizer, total_steps=total_steps, **kwargs)
    rates = []
    for _ in range(total_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_cosine_rises_linearly_then_decays_to_the_floor():
    rates = multipliers(warmup_cosine, 110, warmup_steps=10, min_lr_ratio=0.1)
    assert rates[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert rates[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[60] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the decay
    assert rates[-1] == pytest.approx(0.1, abs=1e-3)


def test_rsqrt_follows_the_inverse_square_root_then_cools_down_to_zero():
    rates = multipliers(warmup_rsqrt_cooldown, 200, warmup_steps=10, cooldown_steps=50, timescale=20)
    assert rates[9] == pytest.approx(1.0)
    assert rates[10 + 20] == pytest.approx(1 / math.sqrt(2))  # one timescale after the warmup
    assert rates[149] == pytest.approx(1 / math.sqrt(1 + 139 / 20))  # the last step before the cooldown
    assert rates[175] == pytest.approx(1 / math.sqrt(1 + 165 / 20) * 25 / 50)
    assert rates[-1] == pytest.approx(1 / math.sqrt(1 + 189 / 20) / 50)


def test_constant_after_warmup():
    assert multipliers(constant, 6, warmup_steps=2) == pytest.approx([0.5, 1, 1, 1, 1, 1])


def test_a_warmup_longer_than_the_run_is_shortened_with_a_warning(caplog):
    rates = multipliers(warmup_cosine, 5, warmup_steps=50)
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert "scheduler.warmup_steps=50 is longer than this run allows" in caplog.text


# A run of a few seconds: 64 synthetic 8x8 images, batches of 8, a 2-block model
SMALL_RUN = ["data=synthetic", "data.img_size=8", "data.in_chans=1", "data.train_size=64", "data.test_size=16",
             "model.depth=2", "trainer.batch_size=8", "logger=none", "trainer.progress_bar=false"]


def test_a_checkpoint_of_another_optimizer_is_refused_before_the_data_loads(compose_run, tmp_path):
    """SGD's state has no Adam moments: resuming an AdamW run with optimizer=sgd failed at its first step."""
    from softmoe.harness.checkpoint import CheckpointError
    from softmoe.harness.loop import train

    train(compose_run(*SMALL_RUN, "trainer.max_steps=2"), tmp_path)
    # named as the user picks an optimizer (was: optimizer._target_=torch.optim.SGD ... rerun with
    # optimizer._target_=torch.optim.AdamW)
    refused = (f"optimizer=sgd: this run directory's checkpoint {tmp_path / 'last.pt'} was saved with optimizer=adamw, "
               "and a run directory resumes only the experiment it holds; rerun with optimizer=adamw, or give this run "
               "a new run directory")
    with pytest.raises(CheckpointError) as raised:
        train(compose_run(*SMALL_RUN, "trainer.max_steps=4", "optimizer=sgd"), tmp_path)
    assert str(raised.value).startswith(refused)
    # a target no option of conf/optimizer/ names is spelled as it was set
    with pytest.raises(CheckpointError) as raised:
        train(compose_run(*SMALL_RUN, "trainer.max_steps=4", "optimizer._target_=torch.optim.Adam"), tmp_path)
    assert str(raised.value).startswith("optimizer._target_=torch.optim.Adam: this run directory's checkpoint ")


@pytest.mark.parametrize("before,after", [(False, True), (True, False)])
def test_a_resumed_run_steps_with_its_own_kernel_choice_not_the_checkpoints(compose_run, tmp_path, before, after,
                                                                            resumed_from):
    """optimizer.fused is configuration: a checkpoint of the other kernel resumes, and trains as one run would."""
    from softmoe.harness.checkpoint import load_checkpoint
    from softmoe.harness.loop import train

    run = [*SMALL_RUN, "scheduler=constant"]  # a constant rate: a 3-step run is the first half of a 6-step one
    train(compose_run(*run, "trainer.max_steps=3", f"optimizer.fused={before}"), tmp_path / "first")
    resume = f"trainer.resume={tmp_path / 'first' / 'last.pt'}"
    train(compose_run(*run, "trainer.max_steps=6", f"optimizer.fused={after}", resume), tmp_path / "switched")
    assert resumed_from() == [(tmp_path / "first" / "last.pt", 3)]
    train(compose_run(*run, "trainer.max_steps=6", f"optimizer.fused={after}"), tmp_path / "whole")
    switched, whole = (load_checkpoint(tmp_path / name / "last.pt") for name in ("switched", "whole"))
    assert {group["fused"] for group in switched["optimizer"]["param_groups"]} == {after}
    for name, weight in whole["model"].items():  # the kernels round differently (measured: 3.5e-6 at most)
        torch.testing.assert_close(switched["model"][name], weight, rtol=0, atol=1e-5, msg=name)


def test_optimizer_fused_null_means_fused_on_a_gpu_and_pytorchs_choice_on_a_cpu(compose_run):
    from softmoe.harness.optim import build_optimizer, fused_by_default

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_by_default(torch.optim.AdamW, cuda) and fused_by_default(torch.optim.SGD, cuda)
    assert not fused_by_default(torch.optim.AdamW, cpu)  # CPU runs keep the kernel they were measured with
    assert not fused_by_default(torch.optim.RMSprop, cuda)  # no found_inf-aware fused kernel to choose
    model = SoftMoEVisionTransformer(num_experts=4, moe_layer_index=1, img_size=8, patch_size=4, embed_dim=16,
                                     depth=2, num_heads=2, num_classes=3)
    for fused, expected in (("null", None), ("true", True), ("false", False)):
        cfg = compose_run(f"optimizer.fused={fused}")
        optimizer = build_optimizer(cfg.optimizer, model, cfg.moe)
        assert {group["fused"] for group in optimizer.param_groups} == {expected}, fused


def test_the_paper_recipe_preset_decays_the_router_scale_not_phi_and_inits_the_head_as_vmoe(compose_run):
    """experiment=imagenet_soft_moe_s16 claims vmoe's recipe: Φ undecayed beside the decayed scale, qk-norm, and the
    JAX init (the head's kernel 0, its bias -log(classes)). Built at toy size (the preset's own keys kept)."""
    from softmoe.harness.model import build_model
    from softmoe.harness.optim import build_optimizer

    cfg = compose_run("experiment=imagenet_soft_moe_s16", "data.root=/nowhere", "data.img_size=32",
                      "data.num_classes=10", "model.depth=2", "moe.num_experts=4", "moe.layers=[1]")
    model = build_model(*(OmegaConf.to_container(cfg[section], resolve=True) for section in ("model", "moe")))
    assert model.head.weight.abs().max() == 0 and torch.allclose(model.head.bias, torch.full((10,), -math.log(10)))
    assert model.blocks[0].attn.q_norm.__class__.__name__ == "LayerNorm"
    groups = {g["name"]: g for g in build_optimizer(cfg.optimizer, model, cfg.moe).param_groups}
    assert groups["router"]["weight_decay"] == 0.03 and groups["router_phi"]["weight_decay"] == 0.0
    assert [id(p) for p in groups["router_phi"]["params"]] == [id(model.blocks[1].mlp.phi)]
    assert [id(p) for p in groups["head"]["params"]] == [id(model.head.weight)]
    assert groups["head"]["weight_decay"] == 3.0 and cfg.trainer.loss == "sigmoid"


def test_head_weight_decay_gives_the_classifier_weight_its_own_group():
    model = SoftMoEVisionTransformer(num_experts=4, moe_layer_index=1, img_size=8, patch_size=4, embed_dim=16, depth=2,
                                     num_heads=2)
    groups = {g["name"]: g for g in param_groups(model, 0.03, 1e-3, head_weight_decay=3.0)}
    assert list(groups) == ["decay", "no_decay", "router", "head"]
    assert [id(p) for p in groups["head"]["params"]] == [id(model.head.weight)]
    assert groups["head"]["weight_decay"] == 3.0
    assert id(model.head.bias) in {id(p) for p in groups["no_decay"]["params"]}  # a bias is never decayed
    assert "head" not in [g["name"] for g in param_groups(model, 0.03, 1e-3)]  # null: one decay group, as before


def test_the_sigmoid_loss_is_vmoes_sigmoid_cross_entropy_and_softmax_is_torchs():
    from softmoe.harness.losses import classification_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(5, 7, dtype=torch.float64), torch.tensor([0, 3, 6, 2, 2])
    for smoothing in (0.0, 0.1):
        targets = torch.full((5, 7), smoothing / 7, dtype=torch.float64)
        targets[torch.arange(5), labels] += 1 - smoothing
        probabilities = torch.sigmoid(logits)  # each class an independent binary decision, summed over the classes
        expected = -(targets * probabilities.log() + (1 - targets) * (1 - probabilities).log()).sum(dim=1).mean()
        torch.testing.assert_close(classification_loss(logits, labels, "sigmoid", smoothing), expected)
        torch.testing.assert_close(classification_loss(logits, labels, "softmax", smoothing),
                                   torch.nn.functional.cross_entropy(logits, labels, label_smoothing=smoothing))
    with pytest.raises(ValueError, match="^loss must be one of softmax, sigmoid, got 'hinge'$"):
        classification_loss(logits, labels, "hinge")


def test_a_run_trains_on_vmoes_sigmoid_loss_from_the_jax_head(compose_run, tmp_path):
    """trainer.loss=sigmoid with the head's bias at -log(classes) (model.weight_init=jax_nlhb): every class starts at
    probability 1/10, so the first step's loss is vmoe's sigmoid cross-entropy there, log 10 + 9 log(10/9) = 3.25
    (softmax's would be log 10 = 2.30); it trains from it."""
    from softmoe.harness.loop import train
    from softmoe.harness.runs import read_events

    overrides = ["debug=default", "logger=none", "trainer.loss=sigmoid", "trainer.label_smoothing=0",
                 "+model.weight_init=jax_nlhb", "optimizer.head_weight_decay=3.0", "trainer.max_steps=6",
                 "trainer.log_every=1", "trainer.progress_bar=false"]
    train(compose_run(*overrides), tmp_path)
    losses = [event["train/loss"] for event in read_events(tmp_path) if "train/loss" in event]
    assert losses[0] == pytest.approx(math.log(10) + 9 * math.log(10 / 9), abs=0.01)
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_a_checkpoint_of_other_router_optimizer_settings_is_refused_for_that_reason(compose_run, tmp_path):
    """A resumed optimizer takes its groups' rates and weight decay back from the checkpoint, so a start from one of
    another moe.phi_weight_decay (or router_lr_mult, router_weight_decay) is refused, saying so (it said "another
    model, whose weights this one cannot take"); a checkpoint from before phi_weight_decay existed is the default."""
    import json

    from softmoe.harness.checkpoint import CheckpointError, check_same_model

    config = OmegaConf.to_container(compose_run("moe.phi_weight_decay=0"), resolve=True)
    saved = json.loads(json.dumps(config))
    saved["moe"]["phi_weight_decay"] = None
    with pytest.raises(CheckpointError, match=r"^moe.phi_weight_decay=0: trainer.resume's checkpoint .* was saved "
                                              r"with moe.phi_weight_decay=null, whose optimizer state holds the "
                                              r"router's learning rate and weight decay per group"):
        check_same_model({"config": json.dumps(saved)}, config, tmp_path / "last.pt")
    del saved["moe"]["phi_weight_decay"]  # written before the key existed: its runs decayed Φ with the scale
    default = OmegaConf.to_container(compose_run(), resolve=True)
    check_same_model({"config": json.dumps(saved)}, default, tmp_path / "last.pt")


@pytest.mark.parametrize("betas", [[0, 0], [0, 0.999], [0.9, 0]])
def test_betas_written_as_integers_build_torchs_adamw(betas):
    """The rule allows two numbers in [0, 1); torch's Adam refuses an int among them ("betas must be either both
    floats or both Tensors", a traceback at the run's start)."""
    from omegaconf import OmegaConf

    from softmoe.harness.optim import build_optimizer

    model = torch.nn.Linear(3, 2)
    optimizer_cfg = OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3, "betas": betas})
    optimizer = build_optimizer(optimizer_cfg, model)
    assert all(group["betas"] == tuple(float(beta) for beta in betas) for group in optimizer.param_groups)
