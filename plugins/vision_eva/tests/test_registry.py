"""The plugin as installed: found through the entry point, built by name, options validated."""

from __future__ import annotations

import pytest

import mllmkit
from mllmkit.errors import UserError


def test_registered_through_the_entry_point(plugin_host):
    names = plugin_host.registry.names("vision")
    assert "eva_vit_g" in names and "eva_tiny" in names
    assert plugin_host.registry.get("vision", "eva_tiny").distribution == "mllmkit-vision-eva"


def test_build_by_name_with_weights(plugin_host, tiny_ckpt, tiny_image):
    from PIL import Image

    enc = mllmkit.build("vision", "eva_tiny", weights=str(tiny_ckpt))
    pixels = enc.image_transform(train=False)(Image.open(tiny_image)).unsqueeze(0)
    assert enc(pixels).shape == (1, 17, 64)


def test_build_without_weights_logs_random_init(plugin_host, caplog):
    enc = mllmkit.build("vision", "eva_tiny")
    assert "no weights given: EVA encoder (2 blocks, width 64) is randomly initialised" in caplog.text
    assert enc.num_tokens == 17


def test_image_size_must_be_a_multiple_of_the_patch(plugin_host):
    with pytest.raises(UserError, match="image_size.*expected a multiple of the patch size 14, found 50"):
        mllmkit.build("vision", "eva_tiny", image_size=50)


def test_unknown_option_is_rejected(plugin_host):
    with pytest.raises(UserError, match="num_layers"):
        mllmkit.build("vision", "eva_vit_g", num_layers=38)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_assembled_with_the_core_mllm(plugin_host, toy_recipe, tiny_ckpt, precision):
    import torch

    toy_recipe["model"]["vision"] = {"type": "eva_tiny", "weights": str(tiny_ckpt), "precision": precision}
    model = mllmkit.assemble(toy_recipe)
    model.train()
    assert not model.vision.training and not any(p.requires_grad for p in model.vision.parameters())
    assert model.tokens_per_image == 17
    pixels = torch.randn(2, 3, 56, 56)
    embeds = model.encode_images(pixels)
    assert embeds.shape[:2] == (2, 17)
    embeds.float().square().mean().backward()
    assert all(p.grad is not None for p in model.bridges.parameters())
