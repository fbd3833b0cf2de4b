"""SoftMoEVisionTransformer: a timm VisionTransformer subclass whose chosen blocks hold Soft MoE layers."""

import numpy as np
import pytest
import timm
import torch
from timm.layers import Mlp, SwiGLU
from timm.models.vision_transformer import ParallelScalingBlock, ResPostBlock, VisionTransformer

from reference import BF16_RELATIVE_ERROR, relative_error

import softmoe
from softmoe import SoftMoE, SoftMoEVisionTransformer, capture_routing

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=4, num_heads=2, num_classes=10, num_experts=4)


def tiny(**kwargs):
    return SoftMoEVisionTransformer(**{**TINY, "moe_layer_index": 2, **kwargs})


def moe_blocks(model):
    return [i for i, block in enumerate(model.blocks) if isinstance(block.mlp, SoftMoE)]


def test_is_a_timm_vision_transformer_whose_features_and_head_are_timms():
    model = tiny().eval()
    assert isinstance(model, VisionTransformer)
    images = torch.randn(2, 3, 16, 16)
    features = model.forward_features(images)  # 16 patches and the class token, each of width 32
    assert features.shape == (2, 17, 32) and model.forward_head(features).shape == (2, 10)
    torch.testing.assert_close(model(images), model.forward_head(features))


@pytest.mark.parametrize(
    "index, expected", [(0, [0, 1, 2, 3]), (2, [2, 3]), (3, [3]), ([0, 2], [0, 2]), ([3, 1], [1, 3])]
)
def test_moe_block_placement(index, expected):
    model = tiny(moe_layer_index=index)
    assert moe_blocks(model) == expected == model.moe_layer_index
    assert all(isinstance(model.blocks[i].mlp, Mlp) for i in range(4) if i not in expected)
    layer = model.blocks[expected[0]].mlp
    assert (layer.num_experts, layer.slots_per_expert, layer.experts.hidden_features) == (4, 1, 128)


@pytest.mark.parametrize(
    "index, message",
    [(4, r"moe_layer_index must be in \[0, depth=4\), got 4"), (-1, "got -1"), ([], "at least one block"),
     ([1, 9], r"entries must be block indices in \[0, depth=4\), got \[1, 9\]"), ([1, 1], "lists a block twice"),
     ("6", "must be an int or a list of ints")],
)
def test_bad_moe_layer_index(index, message):
    with pytest.raises(ValueError, match=message):
        tiny(moe_layer_index=index)


def test_numpy_integers_count_as_integers():
    """An index or a count read from a NumPy array (a sweep's grid) is an integer like any other."""
    model = tiny(moe_layer_index=[np.int64(3), np.int32(1)], num_experts=np.int64(4), slots_per_expert=np.int16(2))
    assert model.moe_layer_index == [1, 3] and all(type(i) is int for i in model.moe_layer_index)
    assert (model.blocks[1].mlp.num_experts, model.blocks[1].mlp.slots_per_expert) == (4, 2)
    assert tiny(moe_layer_index=np.int64(2)).moe_layer_index == [2, 3]
    with pytest.raises(ValueError, match="num_experts must be a positive integer, got True"):
        tiny(num_experts=True)


def test_a_block_that_ignores_its_mlp_layer_is_named():
    """timm's ParallelScalingBlock fuses its own MLP: it would build a dense model under the MoE model's name."""
    message = (r"block_fn=ParallelScalingBlock does not build its MLP with the mlp_layer it is given, so blocks "
               r"\[3, 4, 5\] of moe_layer_index=\[3, 4, 5\] hold no MoE layer")
    with pytest.raises(ValueError, match=message):
        timm.create_model("test_soft_moe_vit", block_fn=ParallelScalingBlock)
    assert moe_blocks(timm.create_model("test_soft_moe_vit", block_fn=ResPostBlock)) == [3, 4, 5]  # it uses it


def test_an_mlp_layer_the_experts_would_not_follow_is_named():
    message = (r"mlp_layer=SwiGLU would build only the dense blocks' MLPs: the MoE blocks' experts are timm "
               r"Mlp-shaped \(BatchedMlp\)\. .* pass moe_layer")
    with pytest.raises(ValueError, match=message):
        tiny(mlp_layer=SwiGLU)
    assert moe_blocks(tiny(mlp_layer=Mlp)) == [2, 3]  # timm's own: what the experts are


def test_an_unknown_weight_init_is_named_before_timms_assert():
    message = "weight_init must be one of '', 'jax', 'jax_nlhb', 'moco', 'reset', got 'foo'"
    with pytest.raises(ValueError, match=message):
        timm.create_model("test_soft_moe_vit", weight_init="foo")


def test_bad_expert_counts():
    with pytest.raises(ValueError, match="num_experts must be a positive integer, got 0"):
        tiny(num_experts=0)
    with pytest.raises(ValueError, match="slots_per_expert must be a positive integer, got -2"):
        tiny(slots_per_expert=-2)


@pytest.mark.parametrize("bad, message", [
    ({"num_heads": 3}, "num_heads=3 must divide embed_dim=32 (each head takes an equal share)"),  # was: timm's assert
    ({"global_pool": "token", "class_token": False}, "global_pool='token' reads the class token, and "
                                                     "class_token=False builds none: set class_token=True"),
    ({"embed_dim": 0}, "embed_dim must be a positive integer, got 0"),  # was: ZeroDivisionError
    ({"patch_size": 0}, "patch_size must be a positive integer or a (height, width) pair of them, got 0"),
    ({"img_size": (16, 16, 16)}, "img_size must be a positive integer or a (height, width) pair of them, got "
                                 "(16, 16, 16)"),
    ({"global_pool": "mean"}, "global_pool must be one of '', 'avg', 'avgmax', 'max', 'token', 'map', 'prr', got "
                              "'mean'"),  # was: timm's bare assert
    # was: accepted, the pixels past the last whole patch never seen; a patch larger than the image, the conv's error
    ({"img_size": 18}, "patch_size=4 must divide img_size=18: the model would see only the top-left 16x16 pixels of "
                       "each 18x18 image; give an img_size the patch size divides, or set dynamic_img_size=True"),
    ({"img_size": (16, 18), "patch_size": (4, 4)}, "patch_size=(4, 4) must divide img_size=(16, 18): the model would "
                                                   "see only the top-left 16x16 pixels of each 16x18 image"),
    ({"img_size": 2}, "patch_size=4 must divide img_size=2: the model would see no pixel of each 2x2 image"),
    ({"img_size": 18, "dynamic_img_pad": True}, "patch_size=4 does not divide img_size=18: dynamic_img_pad=True pads "
                                                "each image to whole patches, more than the position embedding holds; "
                                                "set dynamic_img_size=True too"),  # was: a shape error at forward
    ({"pos_embed": "sincos"}, "pos_embed must be one of 'learn', 'none', '', got 'sincos'"),  # was: a bare assert
    ({"mlp_ratio": -1}, "mlp_ratio must be a finite number > 0, got -1"),  # was: torch's "negative dimension -32"
    ({"mlp_ratio": 0.01}, "mlp_ratio=0.01 gives the MLPs a hidden width of int(embed_dim=32 * mlp_ratio) = 0"),
    ({"num_classes": -1}, "num_classes must be a non-negative integer"),  # was: no head at all, without a word
    ({"drop_rate": 1.5}, "drop_rate must be a number in [0, 1], got 1.5"),  # was: torch's, naming no argument
    ({"drop_path_rate": -0.1}, "drop_path_rate must be a number in [0, 1], got -0.1"),  # was: taken as 0
    ({"attn_drop_rate": 2}, "attn_drop_rate must be a number in [0, 1], got 2"),
    ({"patch_drop_rate": 1.0}, "patch_drop_rate must be a number in [0, 1), got 1"),  # was: timm's bare assert
    # was: bool("no") is True, so each switched its option on without a word
    ({"class_token": "no"}, "class_token must be True or False, got 'no'"),
    ({"qkv_bias": "no"}, "qkv_bias must be True or False, got 'no'"),
    ({"dynamic_img_size": "no"}, "dynamic_img_size must be True or False, got 'no'"),
    ({"reg_tokens": -1}, "reg_tokens must be a whole number >= 0 (register tokens), got -1"),  # was: torch's error
    # were: timm's table's KeyError, "'str' object is not callable", fill_'s TypeError
    ({"act_layer": "gelux"}, "act_layer='gelux': no layer of timm's by that name (e.g. gelu, relu, silu)"),
    ({"norm_layer": "lnx"}, "norm_layer='lnx': no layer of timm's by that name (e.g. layernorm, rmsnorm)"),
    ({"block_fn": "Block"}, "block_fn must be an nn.Module class or a callable returning one, got 'Block'"),
    ({"embed_layer": "x"}, "embed_layer must be an nn.Module class (or a callable building one), got 'x'"),
    ({"init_values": "a"}, "init_values must be a number (LayerScale's initial gain) or None, got 'a'"),
])
def test_timm_arguments_timm_would_assert_on_are_named(bad, message):
    with pytest.raises(ValueError) as raised:
        tiny(**bad)
    assert str(raised.value).startswith(message)


def test_block_indices_and_output_fmt_timm_asserts_on_are_named():
    # were timm's bare asserts: "last-n (5) is out of range (1 to 2)", "Output format must be one of NCHW or NLC."
    model, x = tiny(depth=2, moe_layer_index=1), torch.randn(1, 3, 16, 16)
    last_n = "indices=5 (get_intermediate_layers' n, features_only's out_indices): the last n of the model's 2 blocks"
    for call, message in [(lambda: model.get_intermediate_layers(x, n=5), last_n),
                          (lambda: model.forward_intermediates(x, indices=[7]), "indices=[7]: an int n (the last n "
                                                                                 "blocks) or a list of block indices "
                                                                                 "from -2 to 1"),
                          (lambda: model.forward_intermediates(x, output_fmt="NHWC"),
                           "output_fmt must be one of 'NCHW', 'NLC', got 'NHWC'"),
                          (lambda: model.prune_intermediate_layers(5), last_n)]:
        with pytest.raises(ValueError) as raised:
            call()
        assert str(raised.value).startswith(message)
    assert len(model.get_intermediate_layers(x, n=2)) == 2  # in range: timm's, as before
    assert model.forward_intermediates(x, indices=[-1], intermediates_only=True)[0].shape == (1, 32, 4, 4)


def test_set_input_size_checks_the_sizes_as_the_constructor_does():
    # was: img_size=18 taken, each image's last 2 pixels a side never seen; patch_size=0 a torch error
    model = tiny()
    for change, message in [({"img_size": 18}, "patch_size=(4, 4) must divide img_size=18: the model would see only "
                                               "the top-left 16x16 pixels of each 18x18 image"),
                            ({"patch_size": 0}, "patch_size must be a positive integer or a (height, width) pair of "
                                                "them, got 0")]:
        with pytest.raises(ValueError) as raised:
            model.set_input_size(**change)
        assert str(raised.value).startswith(message)
    model.set_input_size(img_size=32)  # whole patches: resampled as timm does
    assert model.patch_embed.grid_size == (8, 8) and model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("num_classes, global_pool, message", [
    (-3, None, "num_classes must be a non-negative integer (0: no classifier, the pooled features are the output), "
               "got -3"),
    (5, "mean", "global_pool must be one of '', 'avg', 'avgmax', 'max', 'token', 'map', 'prr', got 'mean'"),
    (5, "map", "reset_classifier cannot add or change attention pooling: global_pool='map' on a model that pools "
               "with 'token'"),  # each of these was a bare assert of timm's, or no head without a word
])
def test_reset_classifier_names_what_timm_would_assert_on(num_classes, global_pool, message):
    model = tiny()
    with pytest.raises(ValueError) as raised:
        model.reset_classifier(num_classes, global_pool)
    assert str(raised.value).startswith(message)
    model.reset_classifier(5, "avg")
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 5)


def test_the_factories_check_timms_arguments_too():
    with pytest.raises(ValueError, match=r"^num_heads=5 must divide embed_dim=192 "):
        softmoe.soft_moe_vit_tiny(num_experts=4, num_heads=5)


@pytest.mark.parametrize("x, message", [
    # each was an error from inside timm or torch: a tuple unpacking, the patch convolution, timm's assert
    (torch.randn(3, 16, 16), "x must be images of shape [batch, 3, height, width] (in_chans=3), got a tensor of "
                             "shape [3, 16, 16]"),
    (torch.randn(2, 1, 16, 16), "x must be images of shape [batch, 3, height, width] (in_chans=3), got a tensor of "
                                "shape [2, 1, 16, 16]"),
    (torch.randn(2, 3, 8, 8), "x must be 16x16 images (img_size), got 8x8: resize them, or build the model with "
                              "dynamic_img_size=True"),
    (torch.zeros(2, 3, 16, 16, dtype=torch.uint8), "x must be a floating-point tensor, got dtype torch.uint8"),
    (torch.randn(2, 3, 16, 16, dtype=torch.float64), "x dtype torch.float64 does not match the model's parameters "
                                                     "(torch.float32): cast one to the other"),
    ([[0.0]], "x must be a tensor of images [batch, 3, height, width] (in_chans=3), got list"),
])
def test_a_wrong_input_is_named_before_timm_sees_it(x, message):
    model = tiny()
    # forward_intermediates: get_intermediate_layers and features_only models too (they met timm's assert, the conv)
    for call in (model, model.forward_features, model.forward_intermediates, model.get_intermediate_layers):
        with pytest.raises(ValueError) as raised:
            call(x)
        assert str(raised.value).startswith(message)


def test_a_model_left_on_the_meta_device_is_named_not_run():
    with torch.device("meta"):
        model = tiny()
    with pytest.raises(ValueError, match=r"^x is on cpu, but the model's parameters are on the meta device"):
        model(torch.randn(2, 3, 16, 16))  # was: meta logits for CPU images


def test_other_image_sizes_need_a_multiple_of_the_patch_under_dynamic_img_size():
    model = tiny(dynamic_img_size=True)
    assert model(torch.randn(1, 3, 24, 20)).shape == (1, 10)
    with pytest.raises(ValueError, match=r"^x is 25x20 images, which patch_size=4x4 does not divide: crop or resize "
                                         r"them, or build the model with dynamic_img_pad=True$"):
        model(torch.randn(1, 3, 25, 20))
    padded = tiny(dynamic_img_size=True, dynamic_img_pad=True)
    assert padded(torch.randn(1, 3, 25, 20)).shape == (1, 10)
    padded = tiny(dynamic_img_size=True, dynamic_img_pad=True, img_size=18)  # padded at build too: 5x5 patches
    assert padded(torch.randn(1, 3, 18, 18)).shape == (1, 10)


def test_autocast_and_a_model_cast_to_the_inputs_dtype_take_it():
    model = tiny()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(torch.randn(2, 3, 16, 16)).dtype == torch.bfloat16
    assert model.to(torch.float64)(torch.randn(2, 3, 16, 16, dtype=torch.float64)).dtype == torch.float64


def test_forward_shapes_features_and_head():
    model = tiny()
    x = torch.randn(2, 3, 16, 16)
    assert model(x).shape == (2, 10)
    features = model.forward_features(x)
    assert features.shape == (2, 17, 32)  # class token + 16 patches
    assert model.forward_head(features, pre_logits=True).shape == (2, 32)
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)


def test_an_empty_batch_gives_empty_logits_as_timms_vit_does():
    assert tiny()(torch.randn(0, 3, 16, 16)).shape == (0, 10)


@pytest.mark.parametrize("global_pool", ["token", "avg", "map", ""])
def test_global_pool_options(global_pool):
    model = tiny(global_pool=global_pool, class_token=global_pool == "token")
    out = model(torch.randn(2, 3, 16, 16))
    assert out.shape == ((2, 16, 10) if global_pool == "" else (2, 10))


def test_register_tokens_and_dynamic_image_size():
    model = tiny(reg_tokens=2, dynamic_img_size=True)
    with capture_routing(model) as routing:
        assert model(torch.randn(1, 3, 24, 20)).shape == (1, 10)
    assert routing["blocks.2.mlp"].dispatch.shape == (1, 1 + 2 + 6 * 5, 4, 1)  # cls + registers + patches


def test_gradient_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 3, 16, 16)
    model = tiny()
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)


def test_no_weight_decay_and_every_parameter_gets_a_gradient():
    model = tiny(reg_tokens=1)
    assert {"pos_embed", "cls_token", "reg_token"} <= model.no_weight_decay()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_bf16_autocast_forward():
    model = tiny()
    x = torch.randn(2, 3, 16, 16)
    reference = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference) < BF16_RELATIVE_ERROR


def ks_distance(a, b):
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs of a and b."""
    a, b = a.detach().flatten().double().sort().values, b.detach().flatten().double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / a.numel()
    cdf_b = torch.searchsorted(b, points, right=True) / b.numel()
    return (cdf_a - cdf_b).abs().max().item()


def init_both(mode):
    """A Soft MoE ViT and timm's dense ViT of the same shape, both initialised with timm's init ``mode``."""
    arch = {key: value for key, value in TINY.items() if key != "num_experts"}
    if mode == "reset":  # not a constructor option: timm's init_weights(mode="reset") calls reset_parameters()
        models = tiny(num_experts=8), VisionTransformer(**arch)
        for model in models:
            model.init_weights(mode="reset")
        return models
    return tiny(num_experts=8, weight_init=mode), VisionTransformer(**arch, weight_init=mode)


@pytest.mark.parametrize("mode", ["", "jax", "jax_nlhb", "moco", "reset"])
def test_experts_are_initialised_as_timm_initialises_the_dense_mlp(mode):
    model, dense = init_both(mode)
    experts, mlp = model.blocks[3].mlp.experts, dense.blocks[3].mlp
    for ours, theirs in [
        (experts.fc1_weight, mlp.fc1.weight), (experts.fc2_weight, mlp.fc2.weight),
        (experts.fc1_bias, mlp.fc1.bias), (experts.fc2_bias, mlp.fc2.bias),
    ]:
        if torch.all(theirs == 0):
            assert torch.all(ours == 0)
            continue
        # the same distribution: the 8 experts' draws against the dense layer's (KS 5% critical value 0.02 to 0.09)
        assert ks_distance(ours, theirs) < (0.05 if theirs.numel() > 1000 else 0.2)
        assert not torch.equal(ours[0], ours[1])  # each expert its own draw


def test_the_init_mode_changes_what_experts_are_drawn_from():
    (timm_init, _), (jax_init, _) = init_both(""), init_both("jax")
    w_timm, w_jax = timm_init.blocks[3].mlp.experts.fc1_weight, jax_init.blocks[3].mlp.experts.fc1_weight
    assert ks_distance(w_timm, w_jax) > 0.3  # trunc_normal(0.02) against xavier_uniform (bound 0.19)


def test_timm_reset_mode_redraws_the_router_through_reset_parameters():
    model = tiny()
    layer = model.blocks[3].mlp
    phi = layer.phi.detach().clone()
    with torch.no_grad():
        layer.scale.fill_(3.0)
    model.init_weights(mode="reset")
    assert not torch.equal(layer.phi, phi) and layer.scale.item() == 1.0
    assert SoftMoE.reset_router is SoftMoE.reset_parameters  # the earlier name still works


def test_timm_reset_mode_redraws_sparse_routers_too():
    from softmoe import TokensChoiceMoE

    model = tiny(moe_layer=TokensChoiceMoE)
    router = model.blocks[3].mlp.router_weight.detach().clone()
    model.init_weights(mode="reset")
    assert not torch.equal(model.blocks[3].mlp.router_weight, router)
    assert TokensChoiceMoE.reset_router is TokensChoiceMoE.reset_parameters


def test_fix_init_rescales_expert_fc2():
    torch.manual_seed(0)
    plain = tiny()
    torch.manual_seed(0)
    fixed = tiny(fix_init=True)
    expected = plain.blocks[3].mlp.experts.fc2_weight / (2.0 * 4) ** 0.5
    torch.testing.assert_close(fixed.blocks[3].mlp.experts.fc2_weight, expected)


def test_moe_kwargs_reach_the_layers():
    model = tiny(moe_kwargs={"dispatch": "uniform", "combine": "soft"}, normalize=False)
    layer = model.blocks[2].mlp
    assert (layer.dispatch_mode, layer.combine_mode, layer.normalize) == ("uniform", "soft", False)


def test_moe_kwargs_take_precedence_over_the_mlp_arguments_of_timms_block():
    # was: timm's Block passes hidden_features, bias and drop at the call, which beat a partial's: ignored silently
    model = tiny(moe_kwargs={"hidden_features": 8, "bias": False, "drop": 0.25})
    experts = model.blocks[2].mlp.experts
    assert (experts.hidden_features, experts.fc1_bias, experts.drop1.p) == (8, None, 0.25)
    assert model.blocks[1].mlp.fc1.out_features == 128  # the dense blocks keep mlp_ratio's width
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)


@pytest.mark.parametrize("bad, message", [
    ({"moe_kwargs": {"num_experts": 3}}, "moe_kwargs repeats num_experts=3, an argument of the model itself: pass "
                                         "num_experts= to the model"),  # was: functools.partial's "multiple values"
    ({"moe_kwargs": [("dispatch", "uniform")]}, "moe_kwargs must be a dict of keyword arguments for moe_layer"),
    # was: accepted, then the block's residual add failed at the first forward
    ({"moe_kwargs": {"out_features": 16}}, "moe_kwargs sets out_features=16: a MoE layer takes and returns the "
                                           "block's tokens, embed_dim wide"),
    ({"moe_layer": "soft"}, "moe_layer must be an nn.Module class or a callable returning one, got 'soft'"),
    ({"moe_layer": SoftMoE(32, num_experts=4)}, "moe_layer must be an nn.Module class or a callable returning one, "
                                                "got a SoftMoE instance"),  # was: SoftMoE.forward's TypeError
])
def test_a_wrong_moe_layer_or_moe_kwargs_is_named(bad, message):
    with pytest.raises(ValueError) as raised:
        tiny(**bad)
    assert str(raised.value).startswith(message)


FACTORIES = {
    "soft_moe_vit_tiny": (192, 12, 3, [6, 7, 8, 9, 10, 11], 16),
    "soft_moe_vit_small": (384, 12, 6, [6, 7, 8, 9, 10, 11], 16),
    "soft_moe_vit_base": (768, 12, 12, [6, 7, 8, 9, 10, 11], 16),
    "soft_moe_vit_large": (1024, 24, 16, list(range(12, 24)), 16),
    "soft_moe_vit_huge": (1280, 32, 16, list(range(16, 32)), 14),
}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_factories_have_the_reference_defaults(name):
    width, depth, heads, moe, patch = FACTORIES[name]
    with torch.device("meta"):  # paper sizes hold billions of parameters: build them without memory
        model = getattr(softmoe, name)()
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (width, depth, heads)
    assert moe_blocks(model) == moe and model.patch_embed.patch_size == (patch, patch)
    assert model.blocks[moe[0]].mlp.num_experts == 128 and model.blocks[moe[0]].mlp.slots_per_expert == 1


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_registered_with_timm(name):
    assert name in timm.list_models("soft_moe_*")
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=10, img_size=32, patch_size=4)
    assert model.head.out_features == 10 and model.patch_embed.grid_size == (8, 8)


def test_create_model_runs_a_forward_pass():
    model = timm.create_model(
        "soft_moe_vit_small", num_classes=10, img_size=32, patch_size=4, num_experts=8, depth=2, moe_layer_index=1
    )
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("depth, blocks", [(1, [0]), (2, [1]), (4, [2, 3]), (5, [2, 3, 4]), (24, list(range(12, 24)))])
def test_factories_put_moe_in_the_last_half_of_any_depth(depth, blocks):
    with torch.device("meta"):
        model = timm.create_model("soft_moe_vit_small", depth=depth)
    assert moe_blocks(model) == blocks == model.moe_layer_index


def test_an_explicit_moe_index_beyond_the_depth_is_still_refused():
    with pytest.raises(ValueError, match=r"moe_layer_index must be in \[0, depth=4\), got 6"):
        timm.create_model("soft_moe_vit_small", depth=4, moe_layer_index=6)
