"""Widths from configs alone, select_layer/select_feature shapes, full size on meta, the VisionEncoder role."""

from __future__ import annotations

import pytest
import torch
from mllmkit_vision_hf.components import ClipOptions, SiglipOptions, build_preset, preset_dims
from mllmkit_vision_hf.families import CLIP_TINY, CLIP_VIT_L14_336, SIGLIP_SO400M_P14_384, SIGLIP_TINY

from mllmkit.config import ConfigValueError
from mllmkit.errors import UserError
from mllmkit.interfaces import BuildContext, VisionEncoder
from mllmkit.weights import meta_parameters

CTX = BuildContext(key="model.vision")


def test_dims_of_the_released_towers_without_files(tmp_path):
    missing = tmp_path / "not-downloaded"
    clip = preset_dims(CLIP_VIT_L14_336, ClipOptions(path=missing), CTX)
    assert (clip.out_dim, clip.out_tokens) == (1024, 576)  # (336 / 14)^2 patches, CLS dropped
    assert preset_dims(CLIP_VIT_L14_336, ClipOptions(select_feature="cls_patch"), CTX).out_tokens == 577
    siglip = preset_dims(SIGLIP_SO400M_P14_384, SiglipOptions(path=missing), CTX)
    assert (siglip.out_dim, siglip.out_tokens) == (1152, 729)  # (384 / 14)^2 = 27^2, no CLS


def test_dims_read_config_json_only(clip_folder, tmp_path):
    """A folder with config.json and no weights gives its widths: dims reads no weights."""
    folder = tmp_path / "config-only"
    folder.mkdir()
    (folder / "config.json").write_text((clip_folder / "config.json").read_text())
    dims = preset_dims(CLIP_TINY, ClipOptions(path=folder), CTX)
    assert (dims.out_dim, dims.out_tokens) == (32, 4)


@pytest.mark.parametrize("select_layer", [-4, 4])
def test_select_layer_out_of_range(select_layer):
    with pytest.raises(UserError, match=rf"model\.vision\.select_layer: expected -3\.\.-1 or 1\.\.3 \(the tower has "
                                        rf"3 layers\), found {select_layer}"):
        preset_dims(CLIP_TINY, ClipOptions(select_layer=select_layer), CTX)


def test_option_errors():
    with pytest.raises(ConfigValueError, match="SigLIP has no class token, so only 'patch' applies; found 'cls_patch'"):
        SiglipOptions(select_feature="cls_patch")
    with pytest.raises(ConfigValueError, match=r"expected a layer index other than 0 \(hidden_states\[0\] is the "
                                               r"embeddings\); LLaVA uses -2"):
        ClipOptions(select_layer=0)


@pytest.mark.parametrize(("preset", "options", "tokens"), [
    (CLIP_TINY, ClipOptions(), 4), (CLIP_TINY, ClipOptions(select_feature="cls_patch", select_layer=1), 5),
    (SIGLIP_TINY, SiglipOptions(select_layer=-1), 4)])
def test_random_tower_shapes_and_role(preset, options, tokens):
    encoder = build_preset(preset, options, CTX)
    assert isinstance(encoder, VisionEncoder)
    assert (encoder.num_tokens, encoder.out_dim, encoder.image_size) == (tokens, 32, 28)
    assert encoder(torch.randn(3, 3, 28, 28)).shape == (3, tokens, 32)
    assert encoder.image_transform(True)(_picture()).shape == (3, 28, 28)


def _picture():
    from PIL import Image

    return Image.new("RGB", (40, 30), (10, 200, 30))


def _layer_params(width: int, mlp: int) -> int:
    attention = 4 * (width * width + width)
    return attention + (width * mlp + mlp) + (mlp * width + width) + 2 * 2 * width


def test_full_size_towers_on_meta_have_the_expected_parameter_count():
    """Under meta_parameters nothing is allocated; the count is the layers LLaVA uses, written out."""
    with meta_parameters():
        clip = build_preset(CLIP_VIT_L14_336, ClipOptions(), CTX)
        siglip = build_preset(SIGLIP_SO400M_P14_384, SiglipOptions(), CTX)
    assert all(p.is_meta for p in [*clip.parameters(), *siglip.parameters()])
    clip_embed = 1024 + 3 * 14 * 14 * 1024 + 577 * 1024 + 2 * 1024  # class, patch conv, positions, pre-norm
    assert sum(p.numel() for p in clip.parameters()) == clip_embed + 23 * _layer_params(1024, 4096)
    siglip_embed = 3 * 14 * 14 * 1152 + 1152 + 729 * 1152  # patch conv with bias, positions
    assert sum(p.numel() for p in siglip.parameters()) == siglip_embed + 26 * _layer_params(1152, 4304)
    assert (clip.num_tokens, siglip.num_tokens) == (576, 729)


def test_gradient_checkpointing_recomputes_layers_with_the_same_grads():
    torch.manual_seed(0)
    plain = build_preset(CLIP_TINY, ClipOptions(), CTX).train()
    ckpt = build_preset(CLIP_TINY, ClipOptions(), CTX).train()
    ckpt.load_state_dict(plain.state_dict())
    ckpt.gradient_checkpointing(True)
    calls = []
    ckpt.blocks()[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    pixels = torch.randn(2, 3, 28, 28)
    plain(pixels).square().sum().backward()
    ckpt(pixels).square().sum().backward()
    assert len(calls) == 2  # forward, then again in backward
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_in_a_whole_model(plugin_host, toy_recipe):
    from mllmkit import assemble, check_wiring, load_recipe

    toy_recipe["model"]["vision"] = {"type": "clip_tiny", "precision": "bf16", "gradient_checkpointing": True}
    toy_recipe["model"]["bridges"] = [{"type": "mlp"}]
    wiring = check_wiring(load_recipe(toy_recipe))
    assert (wiring.vision.out_dim, wiring.vision.out_tokens) == (32, 4)
    model = assemble(toy_recipe)
    assert model.tokens_per_image == 4
    layer = model.vision.blocks()[0]  # the core's shared keys: precision laid out, checkpointing switched on
    assert layer.mlp.fc1.weight.dtype == torch.bfloat16 and layer.layer_norm1.weight.dtype == torch.float32
    assert all(block.gradient_checkpointing for block in model.vision.blocks())
    assert not any(p.requires_grad for p in model.vision.parameters())  # frozen by default
    assert model.encode_images(torch.rand(2, 3, 28, 28)).shape == (2, 4, model.llm.hidden_size)
