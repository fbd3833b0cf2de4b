"""The registered models are first-class timm models: every timm call works on them exactly as on timm's
own ViT of the same shape (the reference), and only the expert layers differ.

``test_soft_moe_vit`` mirrors timm's ``test_vit`` (and ``test_soft_moe_vit2`` its ``test_vit2``), so the
size-independent behaviour runs on tiny models; the paper's sizes are checked on the meta device.
"""

from pathlib import Path

import huggingface_hub.constants
import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import create_transform, resolve_data_config

import softmoe  # noqa: F401  (registers the models with timm)
from softmoe import SoftMoE
from softmoe.vit import DENSE_ARCHITECTURES

PAPER_SIZES = {name: dense for name, dense in DENSE_ARCHITECTURES.items() if name.startswith("soft_moe_")}
TEST_SIZES = {name: dense for name, dense in DENSE_ARCHITECTURES.items() if name.startswith("test_")}
IMAGES = torch.randn(2, 3, 160, 160)  # test_vit's input size


def moe_blocks(model):
    return [i for i, block in enumerate(model.blocks) if isinstance(block.mlp, SoftMoE)]


def outside_moe_layers(state_dict, blocks):
    """The entries of a state dict outside the MLPs of ``blocks`` (a Soft MoE model's experts and routers)."""
    return {k: v for k, v in state_dict.items() if not k.startswith(tuple(f"blocks.{i}.mlp." for i in blocks))}


def test_every_size_is_registered_with_a_test_sized_twin():
    assert timm.list_models("soft_moe_*") == sorted(PAPER_SIZES)
    assert timm.list_models("test_soft_moe_*") == sorted(TEST_SIZES)


@pytest.mark.parametrize("name", sorted(DENSE_ARCHITECTURES))
def test_pretrained_cfg_is_the_dense_vits(name):
    dense_name = DENSE_ARCHITECTURES[name]
    with torch.device("meta"):
        model, dense = timm.create_model(name), timm.create_model(dense_name)
    assert model.default_cfg is model.pretrained_cfg
    ours, theirs = dict(model.pretrained_cfg), dict(dense.pretrained_cfg)
    assert ours.pop("architecture") == name and theirs.pop("architecture") == dense_name
    # the same weights (by tag and Hub id) and data config; loaded as a state dict, never by timm's .npz loader
    assert ours.pop("description") == f"upcycled from timm's {dense_name}.{theirs['tag']}"
    assert (ours.pop("url"), ours.pop("custom_load")) == ("", False)
    theirs.pop("url"), theirs.pop("custom_load")
    assert ours == theirs
    assert ours["hf_hub_id"] == f"timm/{dense_name}.{ours['tag']}"
    assert (model.num_classes, model.patch_embed.img_size) == (dense.num_classes, dense.patch_embed.img_size)


@pytest.mark.parametrize("name", sorted(PAPER_SIZES))
def test_every_pretrained_tag_names_the_dense_weights_it_upcycles(name):
    dense_name = DENSE_ARCHITECTURES[name]
    tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{name}.*")]
    assert tags and set(tags) <= {t.split(".", 1)[1] for t in timm.list_pretrained(f"{dense_name}.*")}
    for tag in tags:
        cfg = timm.models.get_pretrained_cfg(f"{name}.{tag}")
        assert cfg.hf_hub_id == f"timm/{dense_name}.{tag}"
        assert cfg.mean == timm.models.get_pretrained_cfg(f"{dense_name}.{tag}").mean


@pytest.mark.parametrize("name", sorted(DENSE_ARCHITECTURES))
def test_data_config_and_transform_resolve_as_for_the_dense_vit(name):
    with torch.device("meta"):
        model, dense = timm.create_model(name), timm.create_model(DENSE_ARCHITECTURES[name])
    config = resolve_data_config({}, model=model)
    assert config == resolve_data_config({}, model=dense)
    assert config["input_size"] == model.pretrained_cfg["input_size"]
    for training in (False, True):
        assert repr(create_transform(**config, is_training=training)) == repr(
            create_transform(**resolve_data_config({}, model=dense), is_training=training)
        )


@pytest.mark.parametrize("name", sorted(TEST_SIZES))
@pytest.mark.parametrize("out_indices", [(1, 3, 5), (-2, -1), 2])
def test_features_only_as_for_the_dense_vit(name, out_indices):
    model = timm.create_model(name, features_only=True, out_indices=out_indices)
    dense = timm.create_model(DENSE_ARCHITECTURES[name], features_only=True, out_indices=out_indices)
    assert type(model) is type(dense)
    assert model.feature_info.get_dicts() == dense.feature_info.get_dicts()
    features = model(IMAGES)
    assert [f.shape for f in features] == [f.shape for f in dense(IMAGES)]
    assert all(f.shape[1:] == (64, 10, 10) for f in features)
    kept = len(model.model.blocks)  # blocks past the last feature are pruned, MoE blocks among them
    assert kept == len(dense.model.blocks) and model.model.moe_layer_index == [i for i in moe_blocks(model.model)]


@pytest.mark.parametrize("name", sorted(TEST_SIZES))
def test_forward_intermediates_and_pruning_as_for_the_dense_vit(name):
    model, dense = timm.create_model(name).eval(), timm.create_model(DENSE_ARCHITECTURES[name]).eval()
    calls = [
        dict(indices=3), dict(indices=[0, 4], norm=True, output_fmt="NLC"), dict(indices=2, return_prefix_tokens=True)
    ]
    for kwargs in calls:
        final, intermediates = model.forward_intermediates(IMAGES, **kwargs)
        dense_final, dense_intermediates = dense.forward_intermediates(IMAGES, **kwargs)
        assert final.shape == dense_final.shape
        shapes = lambda xs: [tuple(t.shape for t in x) if isinstance(x, tuple) else x.shape for x in xs]  # noqa: E731
        assert shapes(intermediates) == shapes(dense_intermediates)
    blocks_before = model.moe_layer_index
    assert model.prune_intermediate_layers([1, 4]) == dense.prune_intermediate_layers([1, 4]) == [1, 4]
    assert len(model.blocks) == len(dense.blocks) == 5
    assert model.moe_layer_index == moe_blocks(model) == [b for b in blocks_before if b < 5]
    assert model.forward_intermediates(IMAGES, indices=[1, 4], intermediates_only=True)[1].shape == (2, 64, 10, 10)


@pytest.mark.parametrize("name", sorted(TEST_SIZES))
def test_classifier_checkpointing_and_dynamic_size_as_for_the_dense_vit(name):
    model, dense = timm.create_model(name), timm.create_model(DENSE_ARCHITECTURES[name])
    for net in (model, dense):
        net.reset_classifier(7)
        net.set_grad_checkpointing(True)
    assert model(IMAGES).shape == dense(IMAGES).shape == (2, 7)
    other_size = torch.randn(1, 3, 96, 128)  # dynamic_img_size=True in both test models
    assert model(other_size).shape == dense(other_size).shape == (1, 7)
    model.reset_classifier(0)
    assert model.forward_head(model.forward_features(IMAGES)).shape == (2, 64)


def test_moe_keys_are_the_only_state_dict_difference():
    model, dense = timm.create_model("test_soft_moe_vit"), timm.create_model("test_vit")
    assert moe_blocks(model) == [3, 4, 5] and model.blocks[3].mlp.num_experts == 8
    ours, theirs = outside_moe_layers(model.state_dict(), [3, 4, 5]), outside_moe_layers(dense.state_dict(), [3, 4, 5])
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


# Upcycling through timm.create_model(..., pretrained=True)


def save_dense(dense, path):
    state = {k: v.contiguous() for k, v in dense.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth", ".bin"])
def test_pretrained_file_upcycles_a_dense_checkpoint(tmp_path, suffix):
    dense = timm.create_model("test_vit").eval()
    path = save_dense(dense, tmp_path / f"test_vit{suffix}")
    model = timm.create_model("test_soft_moe_vit", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    assert model.pretrained_cfg["file"] == path
    state = model.state_dict()
    for key, value in outside_moe_layers(dense.state_dict(), moe_blocks(model)).items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)
    slots = torch.randn(2, 8, 1, 64)  # [batch, experts, slots, dim]
    for i in moe_blocks(model):  # every expert is its block's dense MLP
        torch.testing.assert_close(model.blocks[i].mlp.experts(slots), dense.blocks[i].mlp(slots), rtol=1e-5, atol=1e-6)
    # the blocks before the first MoE block compute what the dense ones do
    (ours,) = model.forward_intermediates(IMAGES, indices=[2], intermediates_only=True)
    (theirs,) = dense.forward_intermediates(IMAGES, indices=[2], intermediates_only=True)
    torch.testing.assert_close(ours, theirs)


def test_pretrained_upcycling_adds_the_configured_noise_and_a_new_head(tmp_path):
    dense = timm.create_model("test_vit")
    path = save_dense(dense, tmp_path / "test_vit.pth")
    model = timm.create_model(
        "test_soft_moe_vit", pretrained=True, num_classes=10, upcycle_noise_std=0.01,
        pretrained_cfg_overlay=dict(file=path),
    )
    weights = model.blocks[4].mlp.experts.fc1_weight  # [experts, in, hidden]
    noise = weights - dense.blocks[4].mlp.fc1.weight.T
    assert abs(noise.std().item() - 0.01) < 0.001 and not torch.equal(weights[0], weights[1])
    assert torch.equal(model.blocks[4].mlp.experts.fc1_bias[0], dense.blocks[4].mlp.fc1.bias)  # biases: no noise
    assert model.head.weight.shape == (10, 64)  # a new classifier, as timm gives the dense model
    dense = timm.create_model("test_vit", pretrained=True, num_classes=10, pretrained_cfg_overlay=dict(file=path))
    assert dense.head.weight.shape == (10, 64)


def test_pretrained_resamples_position_embeddings_as_timm_does(tmp_path):
    path = save_dense(timm.create_model("test_vit"), tmp_path / "test_vit.safetensors")
    kwargs = dict(pretrained=True, img_size=224, pretrained_cfg_overlay=dict(file=path))
    model, dense = timm.create_model("test_soft_moe_vit", **kwargs), timm.create_model("test_vit", **kwargs)
    assert model.pos_embed.shape == (1, 1 + 14 * 14, 64)
    torch.testing.assert_close(model.pos_embed, dense.pos_embed, rtol=0, atol=0)


@pytest.mark.parametrize("in_chans", [1, 4])
def test_pretrained_adapts_the_patch_embedding_to_other_input_channels_as_timm_does(tmp_path, in_chans):
    # was: "shape mismatch for 'patch_embed.proj.weight'", from the upcycling inside the filter timm calls first
    path = save_dense(timm.create_model("test_vit"), tmp_path / "test_vit.pth")
    kwargs = dict(pretrained=True, in_chans=in_chans, pretrained_cfg_overlay=dict(file=path))
    model, dense = timm.create_model("test_soft_moe_vit", **kwargs), timm.create_model("test_vit", **kwargs)
    assert model.patch_embed.proj.weight.shape[1] == in_chans
    torch.testing.assert_close(model.patch_embed.proj.weight, dense.patch_embed.proj.weight, rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[4].mlp.experts.fc1_bias[0], dense.blocks[4].mlp.fc1.bias, rtol=0, atol=0)


def test_pretrained_features_only_upcycles_too(tmp_path):
    dense = timm.create_model("test_vit2").eval()
    path = save_dense(dense, tmp_path / "test_vit2.safetensors")
    kwargs = dict(pretrained=True, features_only=True, out_indices=(2, 5), pretrained_cfg_overlay=dict(file=path))
    model = timm.create_model("test_soft_moe_vit2", **kwargs).eval()
    reference = timm.create_model("test_vit2", **kwargs).eval()
    early, late = model(IMAGES)
    dense_early, dense_late = reference(IMAGES)
    torch.testing.assert_close(early, dense_early)  # before the first MoE block (4): the dense model's features
    assert late.shape == dense_late.shape
    # after it the features differ (a Soft MoE layer mixes its experts' outputs), but they come from upcycled
    # weights: every expert is its block's dense MLP, and every other weight is the dense model's
    blocks = moe_blocks(model.model)
    assert blocks == [4, 5]
    slots = torch.randn(2, 8, 1, dense.embed_dim)  # [batch, experts, slots, dim]
    for i in blocks:
        torch.testing.assert_close(model.model.blocks[i].mlp.experts(slots), dense.blocks[i].mlp(slots), rtol=1e-5,
                                   atol=1e-6)
    dense_state = dense.state_dict()
    for key, value in outside_moe_layers(model.model.state_dict(), blocks).items():  # (blocks 6-7 pruned)
        torch.testing.assert_close(value, dense_state[key], rtol=0, atol=0, msg=key)


def test_a_soft_moe_checkpoint_loads_as_it_is(tmp_path):
    trained = timm.create_model("test_soft_moe_vit")
    path = tmp_path / "soft_moe.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded = timm.create_model("test_soft_moe_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in trained.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize("source", ["test_soft_moe_vit", "test_vit"])
def test_a_trained_head_of_the_models_classes_loads_with_the_rest(tmp_path, source):
    """timm's loader dropped a file's classifier whenever the model's num_classes (10) differed from the tag's
    (1,000), so an exported 10-class run loaded at chance accuracy; the file's own class count is now the config's."""
    trained = timm.create_model(source, num_classes=10)
    path = tmp_path / "ten_classes.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    loaded = timm.create_model("test_soft_moe_vit", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=str(path)))
    assert torch.equal(loaded.head.weight, trained.head.weight) and torch.equal(loaded.head.bias, trained.head.bias)
    whole_cfg = dict(timm.create_model("test_soft_moe_vit").pretrained_cfg, file=str(path))  # the file in the cfg
    loaded = timm.create_model("test_soft_moe_vit", pretrained=True, num_classes=10, pretrained_cfg=whole_cfg)
    assert torch.equal(loaded.head.weight, trained.head.weight)


def test_a_soft_moe_checkpoint_of_other_moe_blocks_is_refused_not_half_loaded(tmp_path):
    # with its head dropped (another class count) timm loads without strict: blocks 4-5's experts kept their init
    path = tmp_path / "moe_in_block_3.safetensors"
    trained = timm.create_model("test_soft_moe_vit", num_classes=10, moe_layer_index=[3])
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=r"^the Soft MoE checkpoint lacks \d+ of the model's tensors \('blocks\.4\."):
        timm.create_model("test_soft_moe_vit", pretrained=True, num_classes=1000,
                          pretrained_cfg_overlay=dict(file=str(path)))


@pytest.mark.parametrize("other, message", [
    ({"num_experts": 4}, r"'blocks\.3\.mlp\.phi' is \[64, 8, 1\] \(saved with num_experts=8, slots_per_expert=1; the "
                         r"model has 4, 1\)"),
    ({"slots_per_expert": 2}, r"'blocks\.3\.mlp\.phi' is \[64, 8, 1\] \(saved with num_experts=8, slots_per_expert=1; "
                              r"the model has 8, 2\)"),
    ({"mlp_ratio": 2.0}, r"'blocks\.0\.mlp\.fc1\.weight' is \[192, 64\] \(the model's is \[128, 64\]\)"),
], ids=["num_experts", "slots_per_expert", "mlp_ratio"])
def test_a_soft_moe_checkpoint_of_another_expert_count_is_one_line_naming_the_layout(tmp_path, other, message):
    """Was torch's load_state_dict error, one line per mismatched tensor (41 lines for another num_experts)."""
    path = tmp_path / "eight_experts.safetensors"
    trained = timm.create_model("test_soft_moe_vit", num_classes=10)
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    with pytest.raises(ValueError, match=rf"^the Soft MoE checkpoint's {message}: build the model it was saved from$"):
        timm.create_model("test_soft_moe_vit", pretrained=True, num_classes=10,
                          pretrained_cfg_overlay=dict(file=str(path)), **other)


def test_a_soft_moe_checkpoint_of_rgb_images_loads_into_a_grey_model(tmp_path):
    """timm's load_pretrained adapts the first convolution after the filter; the layout check leaves it to it."""
    path = tmp_path / "rgb.pth"
    rgb = timm.create_model("test_soft_moe_vit", num_classes=10)
    torch.save(rgb.state_dict(), path)
    grey = timm.create_model("test_soft_moe_vit", pretrained=True, num_classes=10, in_chans=1,
                             pretrained_cfg_overlay=dict(file=str(path)))
    torch.testing.assert_close(grey.patch_embed.proj.weight, rgb.patch_embed.proj.weight.sum(1, keepdim=True))
    assert torch.equal(grey.blocks[3].mlp.experts.fc1_weight, rgb.blocks[3].mlp.experts.fc1_weight)


def test_a_dense_backbone_saved_without_a_head_upcycles_into_a_model_with_a_new_one(tmp_path):
    # was: "the dense checkpoint has no 'head.weight'", where timm's loader gives a dense ViT a new head
    from softmoe import upcycle

    backbone = timm.create_model("test_vit", num_classes=0)
    path = save_dense(backbone, tmp_path / "backbone.safetensors")
    model = timm.create_model("test_soft_moe_vit", num_classes=10)
    head = model.head.weight.clone()
    upcycle(path, model)
    assert torch.equal(model.head.weight, head) and torch.equal(model.norm.weight, backbone.norm.weight)
    assert torch.equal(model.blocks[4].mlp.experts.fc1_bias[0], backbone.blocks[4].mlp.fc1.bias)
    loaded = timm.create_model("test_soft_moe_vit", pretrained=True, num_classes=10,
                               pretrained_cfg_overlay=dict(file=path))  # the same through timm's loader
    assert torch.equal(loaded.blocks[4].mlp.experts.fc1_bias[0], backbone.blocks[4].mlp.fc1.bias)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_upcycle_reads_a_state_dict_saved_inside_ddp_or_torch_compile(tmp_path, prefix):
    # was: "the dense checkpoint has no 'blocks.4.mlp.fc1.weight'", where timm's loader took the same file
    from softmoe import upcycle

    dense = timm.create_model("test_vit")
    path = tmp_path / "wrapped.pth"
    torch.save({f"{prefix}{key}": value for key, value in dense.state_dict().items()}, path)
    model = upcycle(str(path), timm.create_model("test_soft_moe_vit"))
    assert torch.equal(model.blocks[4].mlp.experts.fc1_bias[0], dense.blocks[4].mlp.fc1.bias)
    assert torch.equal(model.patch_embed.proj.weight, dense.patch_embed.proj.weight)
    wrapped = torch.nn.DataParallel(dense) if prefix == "module." else torch.compile(dense)  # the module itself
    model = upcycle(wrapped, timm.create_model("test_soft_moe_vit"))
    assert torch.equal(model.blocks[4].mlp.experts.fc1_bias[0], dense.blocks[4].mlp.fc1.bias)


def test_a_dense_checkpoint_of_another_shape_is_named(tmp_path):
    path = save_dense(timm.create_model("test_vit", embed_dim=32), tmp_path / "narrow.pth")
    mismatch = r"^shape mismatch for 'blocks\.3\.mlp\.fc1\.weight': dense \[96, 32\], one expert \[192, 64\]$"
    with pytest.raises(ValueError, match=mismatch):
        timm.create_model("test_soft_moe_vit", pretrained=True, pretrained_cfg_overlay=dict(file=path))


def test_a_missing_local_file_is_named():
    with pytest.raises(ValueError, match=r"^pretrained_cfg_overlay file='/nonexistent/vit.pth': no such file"):
        timm.create_model(
            "test_soft_moe_vit", pretrained=True, pretrained_cfg_overlay=dict(file="/nonexistent/vit.pth")
        )


@pytest.mark.parametrize("name, content, reason", [
    ("notes.pth", b"# a markdown file", "not a file torch.save wrote"),
    ("cut.pth", None, "truncated or damaged: torch.load cannot read its archive"),
    ("bad.safetensors", b"garbage bytes here", "Error while deserializing header"),
])
def test_a_local_file_that_is_no_checkpoint_is_named_without_torchs_advice_to_unpickle(tmp_path, name, content, reason):
    # was: torch's 20-line "weights_only=True blocked loading ... retry with weights_only=False" from timm's loader
    path = tmp_path / name
    if content is None:  # the first 100 bytes of a real checkpoint
        content = Path(save_dense(timm.create_model("test_vit"), tmp_path / "whole.pth")).read_bytes()[:100]
    path.write_bytes(content)
    with pytest.raises(ValueError) as raised:
        timm.create_model("test_soft_moe_vit", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert str(raised.value).startswith(f"pretrained_cfg_overlay file={str(path)!r}: not a readable checkpoint "
                                        f"({reason}")
    assert "weights_only=False" not in str(raised.value)


def test_offline_pretrained_fails_with_one_line_asking_for_a_local_file(monkeypatch, tmp_path):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no retries against an unreachable Hub
    # an empty cache: a machine whose own Hub cache holds these weights would load them (the helper's, session 32)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(RuntimeError) as error:
        timm.create_model("test_soft_moe_vit", pretrained=True)
    message = str(error.value)
    assert "\n" not in message and error.value.__cause__ is None
    assert "timm/test_vit.r160_in1k" in message and "pretrained_cfg_overlay=dict(file=PATH)" in message


# Offline, the Hub fails at once (no retries, no model built) unless its cache holds the weights.


@pytest.fixture
def unreachable_hub(tmp_path, monkeypatch):
    """A Hub endpoint nothing listens on and an empty Hub cache; returns the cache folder."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "hub"


def test_an_unreachable_hub_fails_in_one_line_before_the_model_is_built(unreachable_hub, monkeypatch, caplog):
    import softmoe.vit

    built = []
    monkeypatch.setattr(softmoe.vit, "build_model_with_cfg", lambda *a, **k: built.append(a))
    with pytest.raises(RuntimeError) as raised:
        timm.create_model("soft_moe_vit_small.augreg_in21k_ft_in1k", pretrained=True)
    assert str(raised.value) == (
        "soft_moe_vit_small: pretrained=True could not fetch the dense weights it upcycles, "
        "timm/vit_small_patch16_224.augreg_in21k_ft_in1k (the Hugging Face Hub cannot be reached and they are not in "
        "its cache); offline, pass a local dense checkpoint with pretrained_cfg_overlay=dict(file=PATH) "
        "(.safetensors, .pth or .bin)"
    )
    assert built == [] and "Retrying" not in caplog.text


def test_an_unreachable_hub_still_loads_weights_from_its_cache(unreachable_hub, caplog):
    dense = timm.create_model("test_vit").eval()
    repo = unreachable_hub / "models--timm--test_vit.r160_in1k"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    save_dense(dense, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    model = timm.create_model("test_soft_moe_vit", pretrained=True)
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, dense.blocks[0].attn.qkv.weight)
    assert "Retrying" not in caplog.text
