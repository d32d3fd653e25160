"""Architecture, the core's precision layout, freezing and gradient checkpointing of the EVA encoder;
full size on meta."""

from __future__ import annotations

import math

import pytest
import torch
from mllmkit_vision_eva.components import EvaTinyConfig, EvaViTGConfig, build_preset, dims_of
from mllmkit_vision_eva.encoder import EVA_TINY, EVA_VIT_G, build_eva
from mllmkit_vision_eva.loading import eva_key_map
from torch import nn

import mllmkit
from mllmkit.interfaces import BuildContext, VisionEncoder
from mllmkit.precision import part_autocast

CTX = BuildContext(key="model.vision")


def _g_on_meta(num_blocks: int = 39):
    a = EVA_VIT_G
    return build_eva(image_size=a.image_size, patch_size=a.patch_size, width=a.width, depth=num_blocks,
                     num_heads=a.num_heads, mlp_dim=a.mlp_dim, device="meta")


def test_full_size_parameter_count_equals_the_manifest(manifest):
    enc = _g_on_meta()
    used = [(k, s) for k, s, yes in manifest if yes]
    want = sum(math.prod(s) for _, s in used)
    got = sum(p.numel() for p in enc.parameters())
    assert got == want == 985_894_528  # ≈0.986 B: EVA-CLIP-g without its last block
    assert enc.num_tokens == 257 and enc.out_dim == 1408 and enc.image_size == 224
    assert enc.vit.blocks[0].mlp.fc1.out_features == 6144 and enc.vit.blocks[0].attn.num_heads == 16


def test_model_keys_are_the_manifest_keys_through_the_key_map(manifest):
    enc = _g_on_meta()
    key_map = eva_key_map(num_blocks=39, grid=16)
    mapped = {}
    for key, shape, _ in manifest:
        out = key_map.apply(key, torch.empty(shape, device="meta"))
        assert out is not None, key
        mapped.update({target: tuple(t.shape) for target, t in out})
    model = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert mapped == model
    assert key_map.apply("blocks.39.mlp.fc2.bias", torch.empty(1408)) == []  # the 40th block: skipped
    assert key_map.apply("norm.weight", torch.empty(1408)) is None  # not in BLIP-2's encoder: unexpected


def test_dims_without_building():
    assert dims_of(EVA_VIT_G, EvaViTGConfig()).out_dim == 1408
    assert dims_of(EVA_VIT_G, EvaViTGConfig()).out_tokens == 257
    assert dims_of(EVA_VIT_G, EvaViTGConfig(image_size=364)).out_tokens == 26 * 26 + 1
    assert dims_of(EVA_TINY, EvaTinyConfig()).out_tokens == 17


@pytest.mark.parametrize("weights", [False, True])
def test_fp16_is_lavis_layout_linear_and_conv_fp16_the_rest_fp32(plugin_host, tiny_ckpt, weights):
    """LAVIS's convert_weights_to_fp16: Conv/Linear weights and biases fp16; LayerNorms, q/v biases,
    class token and position embedding stay fp32 (on a GPU; on CPU fp16 runs in fp32)."""
    context = BuildContext(key="model.vision", device=torch.device("cuda"))
    enc = mllmkit.build("vision", "eva_tiny", context, precision="fp16",
                        **({"weights": str(tiny_ckpt)} if weights else {}))
    matmul = (".qkv.weight", ".proj.weight", ".proj.bias", ".fc1.weight", ".fc1.bias", ".fc2.weight", ".fc2.bias")
    for name, param in enc.named_parameters():
        assert param.dtype == (torch.float16 if name.endswith(matmul) else torch.float32), name
    assert {n.rsplit(".", 1)[-1] for n, p in enc.named_parameters() if p.dtype == torch.float32} == \
        {"cls_token", "pos_embed", "weight", "bias", "q_bias", "v_bias"}
    assert all(b.dtype == torch.float32 for n, b in enc.named_buffers() if n.endswith("k_bias"))
    assert isinstance(enc.vit.blocks[0].norm1, nn.LayerNorm) and enc.vit.blocks[0].norm1.eps == 1e-6
    assert "vit.blocks.0.attn.k_bias" not in enc.state_dict()  # still non-persistent after the cast


def test_bf16_forward_under_autocast_keeps_the_residual_stream_fp32(plugin_host, tiny_ckpt):
    ref = mllmkit.build("vision", "eva_tiny", weights=str(tiny_ckpt))
    enc = mllmkit.build("vision", "eva_tiny", weights=str(tiny_ckpt), precision="bf16")
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad(), part_autocast("bf16", "cpu"):
        out = enc(pixels)
    assert out.dtype == torch.float32 and out.shape == (2, 17, 64)
    want = ref(pixels).detach()
    assert (out - want).norm() / want.norm() < 3e-2


def test_the_core_freezes_it_not_the_plugin(plugin_host):
    assert all(p.requires_grad for p in build_preset(EVA_TINY, EvaTinyConfig(), CTX).parameters())
    enc = mllmkit.build("vision", "eva_tiny")
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    trainable = mllmkit.build("vision", "eva_tiny", trainable=True)
    assert trainable.training and all(p.requires_grad for p in trainable.parameters())


def test_gradient_checkpointing_gives_same_output_and_grads(plugin_host):
    torch.manual_seed(0)
    plain = mllmkit.build("vision", "eva_tiny", trainable=True)
    ckpt = mllmkit.build("vision", "eva_tiny", trainable=True, gradient_checkpointing=True)
    assert ckpt.checkpointing and not plain.checkpointing
    ckpt.load_state_dict(plain.state_dict())
    pixels = torch.randn(2, 3, 56, 56)
    calls = []
    ckpt.vit.blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    out_a, out_b = plain(pixels), ckpt(pixels)
    out_a.square().mean().backward()
    out_b.square().mean().backward()
    assert len(calls) == 2  # forward once, recomputed once in backward
    torch.testing.assert_close(out_a, out_b)
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_satisfies_the_vision_encoder_protocol():
    enc = build_preset(EVA_TINY, EvaTinyConfig(), CTX)
    assert isinstance(enc, VisionEncoder)
    assert len(enc.blocks()) == 2 and all(type(b).__name__ == "EvaBlock" for b in enc.blocks())


def test_sincos_pos_embed_init_is_the_2d_table_and_stays_learned():
    """Row 1 + r·4 + c of a 4×4 grid is [sin rω, sin cω, cos rω, cos cω] with ω = 10000^(-k/16)
    (timm's 2-D sine-cosine table), the class-token row zero; the parameter still trains."""
    encoder = build_preset(EVA_TINY, EvaTinyConfig(pos_embed_init="sincos"), BuildContext(key="vision"))
    table = encoder.vit.pos_embed[0].detach()
    assert torch.equal(table[0], torch.zeros(64))
    omega = 1.0 / 10000 ** (torch.arange(16) / 16)
    for row in range(4):
        for col in range(4):
            expected = torch.cat([torch.sin(row * omega), torch.sin(col * omega),
                                  torch.cos(row * omega), torch.cos(col * omega)])
            torch.testing.assert_close(table[1 + row * 4 + col], expected)
    assert encoder.vit.pos_embed.requires_grad
    default = build_preset(EVA_TINY, EvaTinyConfig(), BuildContext(key="vision"))
    assert default.vit.pos_embed.std().item() < 0.03  # timm's trunc-normal(0.02)
    torch.manual_seed(0)
    unit = build_preset(EVA_TINY, EvaTinyConfig(pos_embed_init="unit_normal"), BuildContext(key="vision"))
    assert 0.9 < unit.vit.pos_embed.std().item() < 1.1 and unit.vit.pos_embed.abs().max().item() > 2.5
