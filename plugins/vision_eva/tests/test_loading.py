"""Loading LAVIS-format checkpoints: round trip against an independent forward, strict errors, pos-embed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mllmkit_vision_eva.components import EvaTinyConfig, build_preset
from mllmkit_vision_eva.encoder import EVA_TINY

from mllmkit.interfaces import BuildContext
from mllmkit.precision import part_autocast
from mllmkit.weights import WeightsError


def _build(dtype: torch.dtype | None = None, **options):
    return build_preset(EVA_TINY, EvaTinyConfig(**options), BuildContext(key="model.vision", dtype=dtype))


def _layer_norm(x, w, b, eps=1e-6):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def reference_block(sd: dict, prefix: str, x: torch.Tensor, heads: int) -> torch.Tensor:
    """EVA/BLIP-2 block written out: pre-norm, attention with q/v bias (k bias zero), GELU MLP."""
    B, N, C = x.shape
    d = C // heads
    h = _layer_norm(x, sd[prefix + "norm1.weight"], sd[prefix + "norm1.bias"])
    bias = torch.cat([sd[prefix + "attn.q_bias"], torch.zeros(C), sd[prefix + "attn.v_bias"]])
    qkv = h @ sd[prefix + "attn.qkv.weight"].T + bias
    q, k, v = (t.reshape(B, N, heads, d).transpose(1, 2) for t in qkv.split(C, dim=-1))
    att = torch.softmax((q @ k.transpose(-1, -2)) / math.sqrt(d), dim=-1)
    o = (att @ v).transpose(1, 2).reshape(B, N, C)
    x = x + o @ sd[prefix + "attn.proj.weight"].T + sd[prefix + "attn.proj.bias"]
    h = _layer_norm(x, sd[prefix + "norm2.weight"], sd[prefix + "norm2.bias"])
    h = h @ sd[prefix + "mlp.fc1.weight"].T + sd[prefix + "mlp.fc1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return x + h @ sd[prefix + "mlp.fc2.weight"].T + sd[prefix + "mlp.fc2.bias"]


def reference_forward(sd: dict, pixels: torch.Tensor, blocks: int, heads: int = 4, patch: int = 14):
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    for i in range(blocks):
        x = reference_block(sd, f"blocks.{i}.", x, heads)
    return x


def test_load_tiny_checkpoint_then_forward_matches_reference(tiny_ckpt, caplog):
    sd = torch.load(tiny_ckpt, weights_only=True)
    assert "blocks.2.mlp.fc2.bias" in sd  # the file has a block beyond num_blocks
    with caplog.at_level("INFO"):
        enc = _build(weights=tiny_ckpt)
    assert "13 skipped: blocks >= num_blocks=2" in caplog.text
    assert len(enc.blocks()) == 2 and enc.num_tokens == 17 and enc.out_dim == 64
    assert torch.equal(enc.vit.blocks[1].attn.qkv.weight, sd["blocks.1.attn.qkv.weight"])
    assert torch.equal(enc.vit.blocks[0].attn.k_bias, torch.zeros(64))
    assert not any(t.is_meta for t in [*enc.parameters(), *enc.buffers()])
    pixels = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = enc(pixels)
    assert out.shape == (2, 17, 64)
    torch.testing.assert_close(out, reference_forward(sd, pixels, blocks=2), atol=1e-5, rtol=1e-5)


def test_num_blocks_is_the_feature_layer(tiny_ckpt):
    sd = torch.load(tiny_ckpt, weights_only=True)
    pixels = torch.randn(1, 3, 56, 56)
    enc = _build(weights=tiny_ckpt, num_blocks=3)
    with torch.no_grad():
        torch.testing.assert_close(enc(pixels), reference_forward(sd, pixels, blocks=3), atol=1e-5, rtol=1e-5)


def test_missing_and_unexpected_keys_are_listed(tmp_path, make_state_dict):
    sd = make_state_dict(blocks=3, grid=4)
    del sd["blocks.1.attn.v_bias"]
    sd["norm.weight"] = torch.ones(64)
    sd["head.weight"] = torch.zeros(10, 64)
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError) as info:
        _build(weights=path)
    message = str(info.value)
    assert message.startswith(f"model.vision.weights: {path}: checkpoint does not match the model: ")
    assert "unexpected keys (2): norm.weight, head.weight" in message
    assert "missing keys (1): vit.blocks.1.attn.v_bias" in message
    assert "lower model.vision.num_blocks" in message


def test_checkpoint_with_fewer_blocks_than_built_is_an_error(tmp_path, make_state_dict):
    path = tmp_path / "short.pth"
    torch.save(make_state_dict(blocks=1, grid=4), path)
    with pytest.raises(WeightsError, match=r"missing keys \(13\): vit\.blocks\.1\.norm1\.weight, "):
        _build(weights=path)


def test_shape_mismatch_names_the_key(tmp_path, make_state_dict):
    path = tmp_path / "wide.pth"
    torch.save(make_state_dict(blocks=2, grid=4, width=32), path)
    with pytest.raises(WeightsError, match=r"cls_token has shape \[1, 1, 32\], the model expects \[1, 1, 64\]"):
        _build(weights=path)


@pytest.mark.parametrize("file_grid,image_size", [(6, 56), (4, 84), (3, 56)])
def test_pos_embed_interpolated_bicubic_from_file_grid(tmp_path, make_state_dict, file_grid, image_size, caplog):
    sd = make_state_dict(blocks=2, grid=file_grid)
    path = tmp_path / "grid.pth"
    torch.save(sd, path)
    with caplog.at_level("INFO"):
        enc = _build(weights=path, image_size=image_size)
    grid = image_size // 14
    assert f"interpolated (bicubic) from {file_grid}x{file_grid} to {grid}x{grid}" in caplog.text
    pos = sd["pos_embed"]
    patches = pos[:, 1:].reshape(1, file_grid, file_grid, 64).permute(0, 3, 1, 2)
    want = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    want = torch.cat([pos[:, :1], want.permute(0, 2, 3, 1).reshape(1, grid * grid, 64)], dim=1)
    assert enc.vit.pos_embed.shape == (1, grid * grid + 1, 64)
    torch.testing.assert_close(enc.vit.pos_embed.detach(), want, atol=0, rtol=0)
    assert enc(torch.randn(1, 3, image_size, image_size)).shape == (1, grid * grid + 1, 64)


def test_non_square_pos_embed_is_refused(tmp_path, make_state_dict):
    sd = make_state_dict(blocks=2, grid=4)
    sd["pos_embed"] = sd["pos_embed"][:, :-1]
    path = tmp_path / "odd.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsError, match=r"pos_embed: 15 patch positions do not form a square grid"):
        _build(weights=path)


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"cls_token": torch.zeros(1), "x": object()}, path)  # not a plain-tensor pickle
    with pytest.raises(WeightsError, match="refused to load"):
        _build(weights=path)


def test_one_block_matches_written_out_computation():
    torch.manual_seed(0)
    enc = _build()
    block = enc.blocks()[0]
    with torch.no_grad():  # non-trivial LayerNorm affine and q/v biases, so every term matters
        for name, param in block.named_parameters():
            param.copy_(torch.randn_like(param) * (0.3 if param.dim() == 1 else 0.1) + ("norm" in name
                        and name.endswith("weight")))
    sd = {k: v.detach() for k, v in block.state_dict().items()}
    assert "attn.k_bias" not in sd  # non-persistent: never read from or written to checkpoints
    x = torch.randn(3, 17, 64)
    with torch.no_grad():
        torch.testing.assert_close(block(x), reference_block(sd, "", x, heads=4), atol=1e-5, rtol=1e-5)


def test_random_checkpoint_writer_uses_the_manifest_layout(tmp_path, make_state_dict):
    from mllmkit_vision_eva.random_checkpoint import write_random_checkpoint

    path = write_random_checkpoint(tmp_path / "eva_vit_g.pth", EVA_TINY, dtype=torch.float16)
    written = torch.load(path, weights_only=True)
    manifest_layout = make_state_dict(blocks=EVA_TINY.depth, grid=4)
    assert list(written) == list(manifest_layout)
    assert {k: v.shape for k, v in written.items()} == {k: v.shape for k, v in manifest_layout.items()}
    enc = _build(weights=path, dtype=torch.bfloat16)
    assert enc.vit.blocks[0].attn.qkv.weight.dtype == torch.bfloat16  # read straight into the part's dtype
    with part_autocast("bf16", "cpu"):
        assert torch.isfinite(enc(torch.randn(1, 3, 56, 56))).all()


def test_build_under_meta_parameters_keeps_the_loaded_weights(tiny_ckpt):
    """A pipeline stage builds under meta_parameters: the weights read from the file stay real."""
    from mllmkit.weights import meta_parameters

    with meta_parameters():
        enc = _build(weights=tiny_ckpt, dtype=torch.float16)
    reference = _build(weights=tiny_ckpt, dtype=torch.float16)
    assert not any(p.is_meta for p in enc.parameters())
    for (name, got), (_, want) in zip(enc.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(got, want), name


def test_missing_file_is_named_without_key_layout_hints(tmp_path):
    with pytest.raises(WeightsError) as info:
        _build(weights=tmp_path / "eva_vit_g.pth")
    assert str(info.value) == f"model.vision.weights: checkpoint not found: {tmp_path / 'eva_vit_g.pth'}"
