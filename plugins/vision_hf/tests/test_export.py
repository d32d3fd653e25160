"""Export of the CLIP/SigLIP encoders to ``LlavaForConditionalGeneration``: the key tables both ways,
the config fields, and the image processor against the encoder's own transform (pad and resize, on
pictures of odd sizes so rounding of the pad offset, resize and crop is exercised)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mllmkit_vision_hf.export import HF_TO_LLAVA, LLAVA_TO_HF, image_processor, vision_config
from PIL import Image

from mllmkit.assemble import build

SIZES = [(45, 30), (30, 47), (28, 28), (101, 33), (17, 64)]


def _picture(width: int, height: int, seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("name", ["clip_tiny", "siglip_tiny"])
def test_tables_both_ways(plugin_host, folders, name):
    """Part names → Llava names → back is the identity; the final norm Llava holds is written as an
    identity LayerNorm of the tower's width and not read back."""
    encoder = build("vision", name, path=str(folders[name]))
    state = encoder.state_dict()
    exported = HF_TO_LLAVA.apply(state, name)
    assert torch.equal(exported["model.vision_tower.post_layernorm.weight"], torch.ones(32))
    assert torch.equal(exported["model.vision_tower.post_layernorm.bias"], torch.zeros(32))
    assert set(exported) - {"model.vision_tower.post_layernorm.weight", "model.vision_tower.post_layernorm.bias"} \
        == {f"model.vision_tower.{k.removeprefix('tower.')}" for k in state}
    back = LLAVA_TO_HF.apply(exported, name)
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], state[k]) for k in state)


@pytest.mark.parametrize(("name", "options", "strategy", "layers"), [
    ("clip_tiny", {}, "default", 2),
    ("clip_tiny", {"select_feature": "cls_patch", "select_layer": 1}, "full", 1),
    ("siglip_tiny", {"select_layer": -1}, "full", 3),
])
def test_config_fields(plugin_host, name, options, strategy, layers):
    """The tower is exported up to select_layer, so Llava's feature layer is its last (-1); the class
    token is dropped by the ``default`` strategy exactly when the encoder drops it."""
    fields = vision_config(build("vision", name, **options))
    assert fields["vision_feature_layer"] == -1
    assert fields["vision_feature_select_strategy"] == strategy
    assert fields["vision_config"]["num_hidden_layers"] == layers
    assert fields["vision_config"]["model_type"] == f"{name.removesuffix('_tiny')}_vision_model"
    assert "_name_or_path" not in fields["vision_config"] and "transformers_version" not in fields["vision_config"]


@pytest.mark.parametrize("aspect", ["pad", "resize"])
@pytest.mark.parametrize("name", ["clip_tiny", "siglip_tiny"])
def test_image_processor_is_the_encoder_transform(plugin_host, name, aspect):
    """transformers' LlavaImageProcessor (PIL backend) gives the encoder transform's pixels exactly,
    pad-to-square included; also CLIP without padding when the centre-crop margin after the
    shortest-edge resize is 4k + 3 (30×47 → 28×43: 15 rows), where torchvision's CenterCrop would
    crop at round(7.5) = 8 and transformers crops at 15 // 2 = 7."""
    encoder = build("vision", name, image_aspect=aspect)
    processor = image_processor(encoder)
    transform = encoder.image_transform(train=False)
    for i, (width, height) in enumerate(SIZES):
        picture = _picture(width, height, seed=i)
        theirs, ours = processor(picture, return_tensors="pt")["pixel_values"][0], transform(picture)
        assert theirs.shape == (3, 28, 28)
        assert (theirs - ours).abs().max() <= 1e-6, (width, height)
    assert processor.crop_size == {"height": 28, "width": 28}  # what LlavaProcessor counts tokens from
