"""``[train] cache_features``: the frozen encoder runs once per image, the losses are those of
recomputing every step (fp32, CPU), the disk cache is read back by a new run and left behind when a
frozen part's weights change, and a random transform or a training encoder is refused."""

from __future__ import annotations

import copy

import pytest
import torch

from mllmkit.builtin.projection_bridges import LinearBridge
from mllmkit.data import Collator, EncodedSample
from mllmkit.errors import RecipeError
from mllmkit.model import MLLM
from mllmkit.recipe import load_recipe
from mllmkit.testing.toy import ToyLLMConfig, ToyVision, build_toy_llm
from mllmkit.train.feature_cache import FeatureCache, check_cacheable, fingerprint


def _train(toy_recipe, run_dir, monkeypatch, **train):
    from mllmkit.train.loop import train as run

    recipe = copy.deepcopy(toy_recipe)
    recipe["data"] = {"train": [{"type": "demo_shapes", "size": 8, "image_size": 16}], "augment": False}
    recipe["train"] = {"precision": "fp32", "lr": 1e-2, "micro_batch_size": 2, "grad_accum": 2, "epochs": 3,
                       "log_every": 1, "tensorboard": False, **train}
    images = []
    forward = ToyVision.forward
    monkeypatch.setattr(ToyVision, "forward", lambda self, pixels: images.append(len(pixels)) or forward(self, pixels))
    result = run(load_recipe(recipe), run_dir)
    monkeypatch.setattr(ToyVision, "forward", forward)
    return result.losses, sum(images)


@pytest.mark.slow
def test_cached_features_give_the_losses_of_recomputing(plugin_host, toy_recipe, tmp_path, monkeypatch):
    plain, plain_images = _train(toy_recipe, tmp_path / "plain", monkeypatch)
    cached, cached_images = _train(toy_recipe, tmp_path / "memory", monkeypatch, cache_features=True)
    on_disk, disk_images = _train(toy_recipe, tmp_path / "disk", monkeypatch, cache_features=True,
                                  feature_cache="disk")
    assert len(plain) == 6  # 3 epochs of 2 steps
    assert cached == pytest.approx(plain, rel=1e-6, abs=1e-6)
    assert on_disk == pytest.approx(plain, rel=1e-6, abs=1e-6)
    assert (plain_images, cached_images, disk_images) == (24, 8, 8)  # every epoch vs the first only
    folders = list((tmp_path / "disk" / "feature_cache").iterdir())
    assert len(folders) == 1 and len(list(folders[0].glob("*.safetensors"))) == 8
    assert not (tmp_path / "memory" / "feature_cache").exists()


def _model() -> MLLM:
    torch.manual_seed(0)
    llm = build_toy_llm(ToyLLMConfig())
    return MLLM(ToyVision(16, 8, 24), [LinearBridge(24, llm.hidden_size)], llm)


def _batch(model: MLLM):
    image = model.llm.template.image_token_id
    samples = [EncodedSample([257, *[image] * model.tokens_per_image, 65, 66], [-100] * 7 + [66],
                             [torch.rand(3, 16, 16)], "data.json", i) for i in range(3)]
    return Collator(model.llm.template.pad_token_id)(samples)


def test_disk_cache_is_read_back_and_left_behind_when_frozen_weights_change(tmp_path):
    model, tables = _model(), {"vision": {"type": "toy_vision"}, "bridges": [{"type": "linear"}]}
    batch = _batch(model)
    first = FeatureCache.create(model, "cpu", "disk", tmp_path, tables, model.vision.image_transform(False))
    out = first.attach(batch)
    assert out.pixels is None and first.computed == 3
    torch.testing.assert_close(out.image_features, model.image_features(batch.pixels), rtol=0, atol=0)

    again = FeatureCache.create(model, "cpu", "disk", tmp_path, tables, model.vision.image_transform(False))
    assert again.folder == first.folder
    torch.testing.assert_close(again.attach(batch).image_features, out.image_features, rtol=0, atol=0)
    assert again.computed == 0  # all three read from disk

    with torch.no_grad():
        model.vision.patch.weight[0, 0, 0, 0] += 1e-3  # one weight of a frozen part
    changed = FeatureCache.create(model, "cpu", "disk", tmp_path, tables, model.vision.image_transform(False))
    assert changed.folder != first.folder
    fresh = changed.attach(batch).image_features
    assert changed.computed == 3
    torch.testing.assert_close(fresh, model.image_features(batch.pixels), rtol=0, atol=0)
    assert not torch.equal(fresh, out.image_features)


def test_fingerprint_covers_the_frozen_parts_config_and_not_the_trained_bridge():
    model = _model()
    base = fingerprint(model, {"vision": {"type": "toy_vision"}})
    assert fingerprint(model, {"vision": {"type": "toy_vision", "precision": "bf16"}}) != base
    with torch.no_grad():
        model.bridges[0].proj.weight.add_(1.0)
    assert fingerprint(model, {"vision": {"type": "toy_vision"}}) == base  # the Linear trains: not cached


def test_a_random_transform_or_a_training_encoder_is_refused():
    from torchvision import transforms

    model = _model()
    crop = transforms.Compose([transforms.RandomResizedCrop(16, scale=(0.5, 1.0)), transforms.ToTensor()])
    with pytest.raises(RecipeError) as info:
        check_cacheable(model, crop)
    assert str(info.value) == ("train.cache_features: the training image transform is random (augmentation), so "
                               "an image gives different features each epoch; set [data] augment = false to cache them")
    check_cacheable(model, transforms.Compose([transforms.Resize((16, 16)), transforms.ToTensor()]))
    trains = MLLM(model.vision, list(model.bridges), model.llm, trainable={"vision": True})
    with pytest.raises(RecipeError, match=r"^train.cache_features: the vision encoder trains \(model.vision.trainable"):
        check_cacheable(trains, model.vision.image_transform(False))
