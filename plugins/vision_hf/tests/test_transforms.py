"""Image processing: LLaVA-1.5's pad-to-square by hand, and the released processors' numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mllmkit_vision_hf.families import CLIP, CLIP_VIT_L14_336, SIGLIP, SIGLIP_SO400M_P14_384
from mllmkit_vision_hf.transforms import expand2square, llava_image_transform
from PIL import Image


def _random_picture(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_expand2square_by_hand():
    wide = _random_picture(4, 2)
    square = np.asarray(expand2square(wide, (122, 116, 104)))
    assert square.shape == (4, 4, 3)
    want = np.empty((4, 4, 3), dtype=np.uint8)
    want[:] = (122, 116, 104)
    want[1:3] = np.asarray(wide)  # (4 - 2) // 2 = 1 row of fill above, 1 below
    assert np.array_equal(square, want)
    tall = _random_picture(3, 6)
    square = np.asarray(expand2square(tall, (1, 2, 3)))
    want = np.empty((6, 6, 3), dtype=np.uint8)
    want[:] = (1, 2, 3)
    want[:, 1:4] = np.asarray(tall)  # (6 - 3) // 2 = 1 column of fill left, 2 right
    assert np.array_equal(square, want)


@pytest.mark.parametrize("family", [CLIP, SIGLIP])
def test_pad_transform_pixels_by_hand(family):
    """A 28×14 picture padded to 28×28 needs no resize or crop: the tensor is (pixel/255 - mean)/std."""
    picture = _random_picture(28, 14, seed=1)
    got = llava_image_transform(family, 28, "pad")(picture)
    fill = [int(m * 255) for m in family.mean]  # LLaVA: tuple(int(x * 255) for x in image_mean)
    padded = np.empty((28, 28, 3), dtype=np.float64)
    padded[:] = fill
    padded[7:21] = np.asarray(picture)
    want = (padded / 255 - np.array(family.mean)) / np.array(family.std)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32).permute(2, 0, 1), atol=1e-6, rtol=0)


def test_clip_fill_colour_is_llavas():
    assert tuple(int(m * 255) for m in CLIP.mean) == (122, 116, 104)
    assert tuple(int(m * 255) for m in SIGLIP.mean) == (127, 127, 127)


def test_resize_matches_the_released_clip_processor():
    """openai/clip-vit-large-patch14-336's preprocessor_config.json: shortest edge 336, centre crop 336, bicubic."""
    from transformers import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                      image_mean=list(CLIP.mean), image_std=list(CLIP.std), resample=3)
    picture = _random_picture(500, 375, seed=2)
    want = processor(images=picture, return_tensors="pt")["pixel_values"][0]
    got = llava_image_transform(CLIP, CLIP_VIT_L14_336.fields["image_size"], "resize")(picture)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_resize_matches_the_released_siglip_processor():
    """google/siglip-so400m-patch14-384's preprocessor_config.json: 384×384, bicubic, mean = std = 0.5."""
    from transformers import SiglipImageProcessorPil

    processor = SiglipImageProcessorPil(size={"height": 384, "width": 384}, image_mean=[0.5] * 3,
                                        image_std=[0.5] * 3, resample=3)
    picture = _random_picture(500, 375, seed=3)
    want = processor(images=picture, return_tensors="pt")["pixel_values"][0]
    got = llava_image_transform(SIGLIP, SIGLIP_SO400M_P14_384.fields["image_size"], "resize")(picture)
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)


def test_transform_pickles():
    import pickle

    transform = pickle.loads(pickle.dumps(llava_image_transform(CLIP, 28, "pad")))
    assert transform(_random_picture(30, 20)).shape == (3, 28, 28)
