"""BLIP-2 image transforms: output shapes, CLIP normalisation, crop/flip behaviour."""

from __future__ import annotations

import torch
from mllmkit_vision_eva.transforms import CLIP_MEAN, CLIP_STD, blip2_image_transform
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomHorizontalFlip, RandomResizedCrop, Resize


def test_eval_transform_resizes_and_normalises_with_clip_stats():
    image = Image.new("RGB", (90, 30), (255, 0, 128))
    out = blip2_image_transform(56, train=False)(image)
    assert out.shape == (3, 56, 56) and out.dtype == torch.float32
    want = torch.tensor([(255 / 255 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[1]) / CLIP_STD[1],
                         (128 / 255 - CLIP_MEAN[2]) / CLIP_STD[2]])
    torch.testing.assert_close(out[:, 28, 28], want)
    resize = next(t for t in blip2_image_transform(224, train=False).transforms if isinstance(t, Resize))
    assert tuple(resize.size) == (224, 224) and resize.interpolation == InterpolationMode.BICUBIC


def test_grey_and_rgba_inputs_become_three_channels():
    assert blip2_image_transform(28, train=False)(Image.new("L", (40, 40), 100)).shape == (3, 28, 28)
    assert blip2_image_transform(28, train=True)(Image.new("RGBA", (40, 40))).shape == (3, 28, 28)


def test_train_transform_crop_scale_and_no_flip_by_default():
    steps = blip2_image_transform(224, train=True).transforms
    crop = next(t for t in steps if isinstance(t, RandomResizedCrop))
    assert crop.size == (224, 224) and crop.scale == (0.5, 1.0) and crop.interpolation == InterpolationMode.BICUBIC
    assert not any(isinstance(t, RandomHorizontalFlip) for t in steps)
    assert any(isinstance(t, RandomHorizontalFlip) for t in blip2_image_transform(224, True, hflip=True).transforms)


def test_train_transform_never_flips_left_right_without_hflip():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 32, 64))  # left half white
    transform = blip2_image_transform(32, train=True)
    torch.manual_seed(0)
    for _ in range(20):  # a crop of >= half the area always keeps white on the left of black
        out = transform(image)[0]
        assert out[:, 0].mean() >= out[:, -1].mean()
