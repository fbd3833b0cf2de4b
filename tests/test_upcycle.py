"""Sparse upcycling: a Soft MoE ViT started from a dense timm ViT (the library, then the harness's
``model.upcycle_from``; timm's ``pretrained=True`` path is in test_timm.py)."""

import importlib
import os
import re
import zipfile

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from processes import refused_here
from softmoe import SoftMoEVisionTransformer, upcycle
from softmoe import train as train_command
from softmoe.harness.config import ConfigError, check_config
from softmoe.harness.model import build_model
from softmoe.upcycle import check_upcycle, load_state_dict, upcycle_state_dict

ARCH = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5)


def dense_and_moe(**moe_kwargs):
    dense = VisionTransformer(**ARCH)
    moe = SoftMoEVisionTransformer(**ARCH, num_experts=3, slots_per_expert=2, moe_layer_index=1, **moe_kwargs)
    return dense, moe


def assert_experts_compute_the_dense_mlp(dense, moe):
    slots = torch.randn(2, 3, 2, 32)  # [batch, experts, slots, dim]
    for i in moe.moe_layer_index:
        expected = dense.blocks[i].mlp(slots)
        torch.testing.assert_close(moe.blocks[i].mlp.experts(slots), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("source", ["module", "state_dict", "pth", "pth_state_dict", "safetensors"])
def test_upcycled_experts_compute_the_dense_mlp(source, tmp_path):
    dense, moe = dense_and_moe()
    if source == "module":
        given = dense
    elif source == "state_dict":
        given = dense.state_dict()
    elif source in ("pth", "pth_state_dict"):  # the harness's layout, and the other common one
        given = tmp_path / "vit.pth"
        torch.save({"model" if source == "pth" else "state_dict": dense.state_dict()}, given)
    else:
        given = tmp_path / "vit.safetensors"
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(given))
    phi_before = moe.blocks[1].mlp.phi.detach().clone()
    upcycle(given, moe)
    assert_experts_compute_the_dense_mlp(dense, moe)
    # everything outside the MoE layers is the dense model's; the router keeps its own init
    moe_state = moe.state_dict()
    for key, value in dense.state_dict().items():
        if key in moe_state:
            torch.testing.assert_close(moe_state[key], value, msg=key)
    torch.testing.assert_close(moe.blocks[1].mlp.phi, phi_before)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(moe.patch_embed(x), dense.patch_embed(x))


def test_dense_blocks_and_features_before_the_first_moe_block_match():
    dense, moe = dense_and_moe()
    upcycle(dense, moe)
    x = dense.patch_embed(torch.randn(2, 3, 16, 16))
    x = dense._pos_embed(x)
    torch.testing.assert_close(moe.blocks[0](x), dense.blocks[0](x))


def test_noise_makes_experts_diverge():
    dense, moe = dense_and_moe()
    upcycle(dense, moe, noise_std=0.01, generator=torch.Generator().manual_seed(0))
    w = moe.blocks[1].mlp.experts.fc1_weight
    assert not torch.equal(w[0], w[1])
    torch.testing.assert_close(w[0], dense.blocks[1].mlp.fc1.weight.T, atol=0.06, rtol=0)


def test_noise_drawn_from_a_generator_is_reproduced_by_its_seed():
    dense = VisionTransformer(**ARCH)
    drawn = []
    for seed in (0, 0, 1):
        _, moe = dense_and_moe()
        upcycle(dense, moe, noise_std=0.01, generator=torch.Generator().manual_seed(seed))
        drawn.append(moe.blocks[1].mlp.experts.fc1_weight.detach())
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_mismatched_architectures_are_named():
    dense = VisionTransformer(**{**ARCH, "embed_dim": 48})
    _, moe = dense_and_moe()
    with pytest.raises(ValueError, match=r"^shape mismatch for 'blocks.1.mlp.fc1.weight': dense \[192, 48\]"):
        upcycle(dense, moe)  # the MoE blocks are checked first
    state = VisionTransformer(**ARCH).state_dict()
    state["blocks.0.attn.proj.weight"] = torch.zeros(32, 16)  # a block without experts
    with pytest.raises(ValueError, match=r"^shape mismatch for 'blocks.0.attn.proj.weight': dense \[32, 16\], "
                                         r"Soft MoE \[32, 32\]$"):
        upcycle(state, moe)
    with pytest.raises(ValueError, match="does not exist"):
        upcycle("/nonexistent/vit.pth", moe)


def test_a_soft_moe_checkpoint_or_a_shallower_dense_one_is_named_as_such():
    # was, for both: "the dense checkpoint has no 'blocks.1.mlp.fc1.weight' to copy into the experts of blocks.1.mlp"
    _, moe = dense_and_moe()
    with pytest.raises(ValueError, match=r"^the checkpoint is of an MoE model \('blocks.1.mlp.experts.fc1_weight'\), "
                                         r"not a dense ViT: upcycle from a dense ViT's checkpoint"):
        upcycle(dense_and_moe()[1], moe)
    shallow = VisionTransformer(**{**ARCH, "depth": 1})
    with pytest.raises(ValueError, match=r"^the dense checkpoint has 1 block, and the model's MoE layer blocks.1.mlp "
                                         r"is beyond them: upcycle into a model of the checkpoint's depth$"):
        upcycle(shallow, moe)


@pytest.mark.parametrize("noise_std", [-1, None, float("inf"), float("nan"), "0.1"])
def test_a_noise_std_other_than_a_finite_number_from_0_is_named(noise_std):
    dense, moe = dense_and_moe()
    with pytest.raises(ValueError, match=rf"noise_std must be a finite number >= 0, got {re.escape(repr(noise_std))}$"):
        upcycle(dense, moe, noise_std=noise_std)


def test_arguments_of_the_wrong_kind_are_named(tmp_path):
    # each was an error from inside: str has no load_state_dict, os.fspath(3), randn's argument list, "does not exist"
    dense, moe = dense_and_moe()
    with pytest.raises(ValueError, match=r"^model must be the Soft MoE ViT to load the upcycled weights into \(an "
                                         r"nn.Module\), got str 'soft_moe_vit_tiny'$"):
        upcycle(dense, "soft_moe_vit_tiny")
    with pytest.raises(ValueError, match=r"^a dense checkpoint must be a dense ViT \(an nn.Module\), its state dict "
                                         r"or the path to its checkpoint file, got int 3$"):
        upcycle(3, moe)
    with pytest.raises(ValueError, match=r"^generator must be a torch.Generator .* or None, got 0$"):
        upcycle(dense, moe, noise_std=1e-3, generator=0)
    with pytest.raises(ValueError, match=rf"^dense checkpoint '{tmp_path}' is a directory: pass its checkpoint file"):
        load_state_dict(tmp_path)
    upcycle(dense, moe, noise_std=1e-3, generator=torch.Generator().manual_seed(0))


def test_a_state_dict_of_compiled_blocks_loses_the_inner_orig_mod_prefix():
    """torch.compile of one block saves ``blocks.0._orig_mod.norm1.weight``; timm's loader and this one read
    ``blocks.0.norm1.weight``."""
    dense, moe = dense_and_moe()
    dense.blocks[0] = torch.compile(dense.blocks[0])  # wraps, compiles nothing until called
    assert "blocks.0._orig_mod.norm1.weight" in dense.state_dict()
    upcycle(dense.state_dict(), moe)
    assert torch.equal(moe.blocks[0].norm1.weight, dense.blocks[0].norm1.weight)


def test_checkpoint_files_are_loaded_without_unpickling_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    _, moe = dense_and_moe()
    with pytest.raises(ValueError, match=r"is not a readable checkpoint \(it holds Python objects that loading would "
                                         r"have to execute; refused \(weights_only=True\)\)"):
        upcycle(path, moe)


@pytest.mark.parametrize(
    "name, content, reason",
    [("bytes.pth", b"not a checkpoint", "not a file torch.save wrote"),
     ("cut.pth", None, "truncated or damaged: torch.load cannot read its archive"),
     ("bytes.safetensors", b"not a checkpoint", "Error while deserializing header")],
)
def test_an_unreadable_file_says_why_in_a_few_words(tmp_path, name, content, reason):
    """torch.load's own message for bytes it cannot parse suggests weights_only=False, which would not help."""
    path = tmp_path / name
    if content is None:  # a real checkpoint, cut short
        torch.save(dense_and_moe()[0].state_dict(), path)
        path.write_bytes(path.read_bytes()[:200])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=f"dense checkpoint '{path}' is not a readable checkpoint \\({reason}"):
        load_state_dict(path)


def test_a_file_or_mapping_that_is_no_state_dict_is_named_as_such(tmp_path):
    # was: AttributeError ('list' object has no attribute 'items'), Tensor.__contains__'s RuntimeError, a TypeError
    for value, held in ([1, 2], "list"), (torch.zeros(3), "Tensor"):
        path = tmp_path / f"{held}.pth"
        torch.save(value, path)
        with pytest.raises(ValueError) as raised:
            load_state_dict(path)
        reason = f"it holds a {held}, not a state dict"
        assert str(raised.value) == f"dense checkpoint '{path}' is not a readable checkpoint ({reason})"
    with pytest.raises(ValueError, match=r"^a dense state dict maps parameter names to tensors; this one has the key "
                                         r"1 \(int\)$"):
        load_state_dict({1: torch.zeros(1)})


def test_sparse_router_weights_keep_their_init():
    from softmoe import TokensChoiceMoE

    dense = VisionTransformer(**ARCH)
    moe = SoftMoEVisionTransformer(**ARCH, num_experts=3, moe_layer_index=1, moe_layer=TokensChoiceMoE)
    router = {
        k: v.clone() for k, v in moe.state_dict().items() if k.startswith("blocks.1.mlp.") and ".experts." not in k
    }
    upcycle(dense, moe)
    assert router and all(torch.equal(moe.state_dict()[k], v) for k, v in router.items())
    assert_experts_compute_the_dense_mlp(dense, moe)


def test_check_upcycle_reads_only_shapes_so_a_meta_model_can_be_checked():
    dense, _ = dense_and_moe()
    with torch.device("meta"):
        _, moe_on_meta = dense_and_moe()
    check_upcycle(dense.state_dict(), moe_on_meta)  # fits: no error
    narrow = VisionTransformer(**{**ARCH, "embed_dim": 48})
    mismatch = r"^shape mismatch for 'blocks\.1\.mlp\.fc1\.weight': dense \[192, 48\], one expert \[128, 32\]$"
    with pytest.raises(ValueError, match=mismatch):
        check_upcycle(narrow.state_dict(), moe_on_meta)


def test_keep_init_keeps_the_models_own_classifier():
    dense = VisionTransformer(**{**ARCH, "num_classes": 7})
    _, moe = dense_and_moe()
    head = moe.head.weight.detach().clone()
    state = dict(dense.state_dict())
    state.pop("head.weight"), state.pop("head.bias")
    upcycled = upcycle_state_dict(state, moe, keep_init=["head.weight", "head.bias"])
    assert torch.equal(upcycled["head.weight"], head) and set(upcycled) == set(moe.state_dict())


def test_keep_init_keeps_the_models_classifier_where_the_checkpoint_has_one_of_another_size():
    """The usual case: fine-tuning to other classes, from a checkpoint that still holds its own head."""
    dense = VisionTransformer(**{**ARCH, "num_classes": 7})
    _, moe = dense_and_moe()
    head = moe.head.weight.detach().clone()
    upcycled = upcycle_state_dict(dense.state_dict(), moe, keep_init=["head.weight", "head.bias"])
    assert torch.equal(upcycled["head.weight"], head)


def test_a_dense_entry_with_no_place_in_the_model_is_named():
    dense, moe = dense_and_moe()
    state = {**dense.state_dict(), "extra.weight": torch.ones(2)}
    message = r"^dense checkpoint entries with no place in the Soft MoE model: \['extra.weight'\]$"
    with pytest.raises(ValueError, match=message):
        upcycle(state, moe)


@pytest.mark.parametrize("key, kind", [("blocks.1.mlp.fc1.weight", "ndarray"), ("blocks.0.norm1.weight", "list"),
                                       ("blocks.1.mlp.fc1.bias", "NoneType")])
def test_a_dense_entry_that_is_not_a_tensor_is_named(key, kind):
    """Was an AttributeError naming no key ("'NoneType' object has no attribute 'shape'")."""
    dense, moe = dense_and_moe()
    state = dense.state_dict()
    state[key] = {"ndarray": state[key].numpy(), "list": state[key].tolist(), "NoneType": None}[kind]
    with pytest.raises(ValueError, match=rf"^the dense checkpoint's '{re.escape(key)}' is a {kind}, not a tensor: "):
        upcycle(state, moe)


def test_the_dense_mlps_layernorm_is_upcycled_into_every_expert():
    """timm's scale_mlp_norm: fc1 -> act -> norm -> fc2, with the norm's weight and bias copied to each expert."""
    dense = VisionTransformer(**ARCH, scale_mlp_norm=True)
    moe = SoftMoEVisionTransformer(**ARCH, scale_mlp_norm=True, num_experts=3, slots_per_expert=2, moe_layer_index=1)
    with torch.no_grad():
        dense.blocks[1].mlp.norm.weight.uniform_(0.5, 1.5)
        dense.blocks[1].mlp.norm.bias.normal_()
    upcycle(dense, moe)
    assert_experts_compute_the_dense_mlp(dense, moe)


def test_a_dense_vit_of_another_image_size_class_count_and_channels_upcycles_as_timm_loads_it(caplog):
    """A dense ViT trained elsewhere (RGB, 32 px, 7 classes) into a grey 16 px 5-class model: timm's filter resamples
    the position embedding, the model's classifier keeps its init, the first convolution is adapted to one channel
    (was: "shape mismatch for 'pos_embed'", with no way forward in a run's config)."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    dense = VisionTransformer(**{**ARCH, "img_size": 32, "num_classes": 7})
    moe = SoftMoEVisionTransformer(**{**ARCH, "in_chans": 1}, num_experts=3, slots_per_expert=2, moe_layer_index=1)
    own_head = moe.head.weight.detach().clone()
    with caplog.at_level("INFO", logger="softmoe.upcycle"):
        upcycle(dense, moe)
    grid = resample_abs_pos_embed(dense.pos_embed.detach(), new_size=(4, 4), num_prefix_tokens=1)
    torch.testing.assert_close(moe.pos_embed, grid, rtol=0, atol=0)
    assert torch.equal(moe.head.weight, own_head) and moe.head.out_features == 5
    patches = dense.patch_embed.proj.weight.detach()
    assert torch.equal(moe.patch_embed.proj.weight, adapt_input_conv(1, patches, base_chans=3))
    torch.testing.assert_close(moe.patch_embed.proj.weight, patches.sum(1, keepdim=True), rtol=0, atol=0)
    assert_experts_compute_the_dense_mlp(dense, moe)
    assert torch.equal(moe.blocks[0].mlp.fc1.weight, dense.blocks[0].mlp.fc1.weight)
    assert [record.getMessage() for record in caplog.records] == [
        "upcycling: pos_embed resampled from [1, 65, 32] to [1, 17, 32]",
        "upcycling: head: the model's own 5-class classifier at its init (the checkpoint's has 7 classes)",
        "upcycling: patch_embed.proj.weight: the checkpoint's 3 input channels adapted to the model's 1 (timm's "
        "adapt_input_conv)",
    ]


def test_a_dense_backbone_gives_a_model_with_a_classifier_its_own_and_old_pre_logits_are_left_out_both_logged(
        caplog):
    state = VisionTransformer(**{**ARCH, "num_classes": 0}).state_dict()
    state["pre_logits.fc.weight"] = torch.ones(32, 32)  # timm's filter drops it, as timm's ViTs no longer have one
    _, moe = dense_and_moe()
    own_head = moe.head.weight.detach().clone()
    with caplog.at_level("INFO", logger="softmoe.upcycle"):
        upcycle(state, moe)
    assert torch.equal(moe.head.weight, own_head)
    assert caplog.messages == ["upcycling: left out by timm's ViT checkpoint filter: pre_logits.fc.weight",
                               "upcycling: head: the model's own classifier at its init (the checkpoint has none)"]


def test_an_moe_checkpoint_is_named_as_such_before_any_setting_it_differs_in():
    """Was "the dense checkpoint has no class token ...: build the model with class_token=False", which a user would
    follow only to be told the checkpoint is an MoE model's."""
    moe_without_class_token = SoftMoEVisionTransformer(**ARCH, class_token=False, global_pool="avg", num_experts=3,
                                                       moe_layer_index=1)
    _, moe = dense_and_moe()
    with pytest.raises(ValueError, match=r"^the checkpoint is of an MoE model \('blocks.1.mlp.experts."):
        upcycle(moe_without_class_token, moe)


def test_a_backbone_takes_a_dense_vit_with_a_classifier_leaving_the_classifier_out(caplog):
    dense = VisionTransformer(**ARCH)
    backbone = SoftMoEVisionTransformer(**{**ARCH, "num_classes": 0}, num_experts=3, moe_layer_index=1)
    with caplog.at_level("INFO", logger="softmoe.upcycle"):
        upcycle(dense, backbone)  # was: "dense checkpoint entries with no place in the Soft MoE model: ['head.bias'..."
    assert caplog.messages == ["upcycling: head: the checkpoint's classifier left out (the model has none)"]
    assert torch.equal(backbone.norm.weight, dense.norm.weight)


@pytest.mark.parametrize("dense_kwargs, model_kwargs, message", [
    ({}, {"class_token": False, "global_pool": "avg"},
     r"the dense checkpoint has a class token \('cls_token'\) and the model none: build the model with "
     r"class_token=True \(model.class_token=true in a run's config\) to upcycle from it"),
    ({"class_token": False, "global_pool": "avg"}, {},
     r"the dense checkpoint has no class token \('cls_token'\) and the model one: build the model with "
     r"class_token=False \(model.class_token=false in a run's config\)"),
    ({"reg_tokens": 4}, {},
     r"the dense checkpoint has 4 register tokens \('reg_token'\) and the model 0: build the model with "
     r"reg_tokens=4 \(\+model.reg_tokens=4 in a run's config\)"),
    ({}, {"reg_tokens": 2},
     r"the dense checkpoint has 0 register tokens \('reg_token'\) and the model 2: build the model with "
     r"reg_tokens=0 \(no \+model.reg_tokens in a run's config\)"),
    ({"global_pool": "token"}, {"global_pool": "avg"},
     r"the dense checkpoint has no 'fc_norm.weight' \(needed by the Soft MoE model\): it normalises before pooling "
     r"\('norm'\), the model after \('fc_norm', global_pool='avg'\); build the model with fc_norm=False "
     r"\(\+model.fc_norm=false in a run's config\) to take its 'norm'$"),
    ({"global_pool": "avg"}, {"global_pool": "token"},
     r"the dense checkpoint has no 'norm.weight' \(needed by the Soft MoE model\): it normalises after pooling "
     r"\('fc_norm', global_pool='avg'\), the model before \('norm'\); build the model with global_pool='avg' "
     r"\(model.global_pool=avg in a run's config\)$"),
    ({"patch_size": 5, "img_size": 15}, {},  # a 3x3 grid into 4x4: resampled; patches 5 into 4: resampled too
     None),
])
def test_tokens_or_pooling_on_one_side_only_are_named_with_the_setting_to_change(dense_kwargs, model_kwargs, message):
    """Tokens: was a torch reshape error from inside timm's resampling ('shape '[1, 4, 4, -1]' is invalid ...');
    pooling: "the dense checkpoint has no 'fc_norm.weight'", naming no setting."""
    dense = VisionTransformer(**{**ARCH, **dense_kwargs})
    moe = SoftMoEVisionTransformer(**{**ARCH, **model_kwargs}, num_experts=3, moe_layer_index=1)
    if message is None:
        upcycle(dense, moe)
        assert moe.pos_embed.shape == (1, 17, 32) and moe.patch_embed.proj.weight.shape == (32, 3, 4, 4)
        return
    with pytest.raises(ValueError, match=f"^{message}"):
        upcycle(dense, moe)


# The harness: model.upcycle_from=PATH starts a run from a dense checkpoint


def save_dense_run_model(compose_run, path, *overrides):
    """Save the weights of the harness's dense model (moe=dense) as the user would, to ``path``."""
    dense = build_model(compose_run("moe=dense", *overrides).model, compose_run("moe=dense").moe)
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(path))
    else:
        torch.save({"model": dense.state_dict()}, path)  # the harness checkpoint's layout
    return dense


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_harness_upcycle_from_starts_the_model_from_the_dense_checkpoint(compose_run, tmp_path, suffix):
    path = tmp_path / f"dense{suffix}"
    dense = save_dense_run_model(compose_run, path)
    cfg = compose_run(f"model.upcycle_from={path}", "model.upcycle_noise_std=0.001")
    check_config(cfg)
    model = build_model(cfg.model, cfg.moe)
    assert model.moe_layer_index == [2, 3]
    for key, value in dense.state_dict().items():
        if not key.startswith(("blocks.2.mlp.", "blocks.3.mlp.")):
            assert torch.equal(model.state_dict()[key], value), key
    weights = model.blocks[3].mlp.experts.fc1_weight
    noise = weights - dense.blocks[3].mlp.fc1.weight.T
    assert 0.0008 < noise.std().item() < 0.0012 and not torch.equal(weights[0], weights[1])
    # a run's own checkpoint supplies the weights when it is loaded again: the dense file is not read
    path.unlink()
    assert build_model(cfg.model, cfg.moe, upcycle_weights=False).moe_layer_index == [2, 3]


def test_a_noise_std_without_a_source_is_refused_and_a_dense_start_says_no_experts(compose_run, tmp_path):
    from softmoe.harness.console import describe_upcycling

    with pytest.raises(ConfigError) as raised:  # was: accepted, and it did nothing
        check_config(compose_run("model.upcycle_noise_std=0.1"))
    assert str(raised.value) == ("model.upcycle_noise_std=0.1: the noise added to experts upcycled from a dense ViT, "
                                 "so it needs model.upcycle_from=<its checkpoint>; leave it at 0 to train from scratch")
    path = tmp_path / "dense.pt"
    save_dense_run_model(compose_run, path)
    cfg = compose_run("moe=dense", f"model.upcycle_from={path}")  # the upcycling study's dense arm
    model = build_model(cfg.model, cfg.moe)  # was: "...and the experts of 0 MoE blocks [] start from..."
    started = f"started from {path}: every weight (a dense ViT: no experts to upcycle)"
    assert describe_upcycling(cfg.model, model) == started


def test_harness_upcycles_from_a_dense_vit_of_another_dataset(compose_run, tmp_path, caplog):
    """A dense run of 16 px RGB images and 100 classes (another dataset) upcycled into the digits model: the check
    passes, position embedding resampled, the run's classifier and first convolution its own fit."""
    path = tmp_path / "dense.pt"
    dense = save_dense_run_model(compose_run, path, "data.img_size=16", "data.in_chans=3", "data.num_classes=100")
    cfg = compose_run(f"model.upcycle_from={path}")
    check_config(cfg)
    with caplog.at_level("INFO", logger="softmoe.upcycle"):
        model = build_model(cfg.model, cfg.moe)
    assert model.head.out_features == 10 and model.pos_embed.shape[1] < dense.pos_embed.shape[1]
    assert torch.equal(model.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)
    changed = [record.getMessage().split(":")[1].strip() for record in caplog.records]
    assert changed == ["pos_embed resampled from [1, 64, 64] to [1, 16, 64]", "head",
                       "patch_embed.proj.weight"], changed


def test_harness_names_the_first_mismatched_key_in_one_line(compose_run, tmp_path):
    path = tmp_path / "narrow.safetensors"
    save_dense_run_model(compose_run, path, "model.embed_dim=32")
    with pytest.raises(ConfigError) as raised:
        check_config(compose_run(f"model.upcycle_from={path}"))
    assert str(raised.value) == (  # the key to change named (was: the tensors alone)
        f"model.upcycle_from={path}: shape mismatch for 'blocks.2.mlp.fc1.weight': "
        "dense [128, 32], one expert [256, 64]; the dense model is 32 wide: give model.embed_dim=32 (here 64)"
    )
    save_dense_run_model(compose_run, path, "model.mlp_ratio=2")
    with pytest.raises(ConfigError, match=r"dense \[128, 64\], one expert \[256, 64\]; the dense model's MLPs are "
                                          r"128 wide: give model.mlp_ratio=2 \(here 4.0\)$"):
        check_config(compose_run(f"model.upcycle_from={path}"))


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such checkpoint file, or null"),
     (b"not a checkpoint", "not a readable checkpoint (not a file torch.save wrote)")],
)
def test_harness_refuses_a_missing_or_unreadable_checkpoint(compose_run, tmp_path, content, message):
    path = tmp_path / "dense.pth"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as raised:
        check_config(compose_run(f"model.upcycle_from={path}"))
    assert str(raised.value).startswith(f"model.upcycle_from={path}: {message}") and "\n" not in str(raised.value)


def test_train_command_stops_on_a_mismatched_checkpoint_before_loading_data(compose_run, tmp_path, monkeypatch,
                                                                           capsys):
    path = tmp_path / "narrow.safetensors"
    save_dense_run_model(compose_run, path, "model.embed_dim=32")
    status = refused_here(monkeypatch, train_command, f"model.upcycle_from={path}",
                          f"hydra.run.dir={tmp_path / 'run'}")
    stderr = capsys.readouterr().err
    assert status == 2
    assert stderr.startswith(f"error: model.upcycle_from={path}: shape mismatch for 'blocks.2.mlp.fc1.weight'")
    assert len(stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()  # before Hydra made it


def test_a_run_saved_before_upcycling_existed_still_resumes(compose_run, tmp_path):
    import json

    from omegaconf import OmegaConf

    from softmoe.harness.checkpoint import CheckpointError, check_same_model

    config = OmegaConf.to_container(compose_run(f"model.upcycle_from={__file__}"), resolve=True)
    older = json.loads(json.dumps(config))
    del older["model"]["upcycle_from"], older["model"]["upcycle_noise_std"]
    check_same_model({"config": json.dumps(older)}, config, tmp_path / "last.pt")  # the starting weights may differ
    older["model"]["depth"] = 2
    with pytest.raises(CheckpointError, match="model.depth=4: trainer.resume's checkpoint .* was saved with "
                       "model.depth=2"):
        check_same_model({"config": json.dumps(older)}, config, tmp_path / "last.pt")  # the architecture may not


def test_the_config_check_and_timms_overlay_map_the_dense_file_they_only_look_at(compose_run, tmp_path, monkeypatch):
    """Each looks at shapes before the build reads the file to keep its weights: a look that read it too would hold
    a ViT-H checkpoint's gigabytes twice over. The real reads run; each one's ``mmap`` is recorded."""
    path = tmp_path / "dense.pth"
    save_dense_run_model(compose_run, path)
    module = importlib.import_module("softmoe.upcycle")
    read, reads = module.load_tensors, []
    monkeypatch.setattr(module, "load_tensors", lambda file, mmap=False: reads.append(mmap) or read(file, mmap=mmap))
    check_config(compose_run(f"model.upcycle_from={path}"))
    assert reads == [True]
    reads.clear()
    dense = timm.create_model("test_vit")
    torch.save(dense.state_dict(), tmp_path / "test_vit.pth")
    overlay = dict(file=str(tmp_path / "test_vit.pth"))
    timm.create_model("test_soft_moe_vit", pretrained=True, pretrained_cfg_overlay=overlay)  # then timm's own read
    assert reads == [True]


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_a_mapped_read_maps_torchs_zip_file_and_reads_legacy_or_compressed_files_as_before(tmp_path):
    """The config check and timm's overlay only look at shapes: ``mapped=True`` maps the file (a ViT-H checkpoint
    is gigabytes) where the plain read, for state that is kept, reads it all."""
    state = {"module.pos_embed": torch.randn(1, 5, 8), "module.head.weight": torch.randn(3, 8)}
    torch.save(state, tmp_path / "zip.pth")
    torch.save(state, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(tmp_path / "zip.pth") as stored, \
            zipfile.ZipFile(tmp_path / "deflated.pth", "w", zipfile.ZIP_DEFLATED) as deflated:
        for record in stored.infolist():  # the same records, compressed (a repacked file)
            deflated.writestr(record.filename, stored.read(record), zipfile.ZIP_DEFLATED)
    # the legacy format, and compressed records (whose bytes torch would take for the tensors'), are read as before
    for name, maps_it in (("zip.pth", True), ("legacy.pth", False), ("deflated.pth", False)):
        path = tmp_path / name
        mapped, read = load_state_dict(path, mapped=True), load_state_dict(path)
        assert mapped.keys() == read.keys() == {"pos_embed", "head.weight"}
        assert all(torch.equal(mapped[key], read[key]) and torch.equal(read[key], state[f"module.{key}"])
                   for key in read), name
        assert (str(path) in open("/proc/self/maps").read()) == maps_it, name
        del mapped, read
    assert str(tmp_path / "zip.pth") not in open("/proc/self/maps").read()  # dropped with the state
