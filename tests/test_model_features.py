"""MLLM.image_features / features_to_embeds (the cache_features split) on toy parts."""

from __future__ import annotations

import copy

import pytest
import torch

import mllmkit


def _model(recipe):
    torch.manual_seed(0)
    return mllmkit.assemble(mllmkit.load_recipe(recipe))


def test_split_reproduces_encode_images_with_a_frozen_first_bridge(core_plugin_host, toy_recipe):
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["bridges"] = [{"type": "linear", "trainable": False, "out_dim": 24}, {"type": "linear"}]
    model = _model(recipe)
    assert model.frozen_prefix() == 1
    pixels = torch.randn(3, 3, model.vision.image_size, model.vision.image_size)
    feats = model.image_features(pixels)
    assert not feats.requires_grad and feats.shape[-1] == 24
    # independent: the parts applied by hand
    by_hand = model.bridges[1](model.bridges[0](model.vision(pixels)))
    torch.testing.assert_close(model.features_to_embeds(feats), by_hand, rtol=0, atol=0)
    torch.testing.assert_close(model.encode_images(pixels), by_hand, rtol=0, atol=0)
    embeds = model.features_to_embeds(feats)
    embeds.sum().backward()  # gradient reaches the trainable bridge only
    assert model.bridges[1].proj.weight.grad is not None
    assert all(p.grad is None for p in model.bridges[0].parameters())


def test_trainable_bridge_first_means_empty_prefix_and_trainable_vision_refuses(core_plugin_host, toy_recipe):
    model = _model(toy_recipe)
    assert model.frozen_prefix() == 0
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["vision"]["trainable"] = True
    model = _model(recipe)
    assert model.frozen_prefix() == -1
    with pytest.raises(ValueError, match="image_features needs a frozen vision encoder"):
        model.image_features(torch.zeros(1, 3, 16, 16))
