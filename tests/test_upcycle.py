"""Sparse upcycling: a Soft MoE ViT started from a dense timm ViT."""

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from softmoe import SoftMoEVisionTransformer, upcycle

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


@pytest.mark.parametrize("source", ["module", "state_dict", "pth", "safetensors"])
def test_upcycled_experts_compute_the_dense_mlp(source, tmp_path):
    dense, moe = dense_and_moe()
    if source == "module":
        given = dense
    elif source == "state_dict":
        given = dense.state_dict()
    elif source == "pth":
        given = tmp_path / "vit.pth"
        torch.save({"model": dense.state_dict()}, given)
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


def test_mismatched_architectures_are_named():
    dense = VisionTransformer(**{**ARCH, "embed_dim": 48})
    _, moe = dense_and_moe()
    with pytest.raises(ValueError, match="shape mismatch for 'cls_token'|shape mismatch for 'blocks.1.mlp.fc1.weight'"):
        upcycle(dense, moe)
    with pytest.raises(ValueError, match="does not exist"):
        upcycle("/nonexistent/vit.pth", moe)
    with pytest.raises(ValueError, match="noise_std must be >= 0"):
        upcycle(dense, moe, noise_std=-1)


def test_checkpoint_files_are_loaded_without_unpickling_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path)
    _, moe = dense_and_moe()
    with pytest.raises(Exception, match="Weights only load failed|Unsupported global"):
        upcycle(path, moe)


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
