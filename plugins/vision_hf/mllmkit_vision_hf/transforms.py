"""Image processing as LLaVA-1.5 does it: optional pad-to-square, then the encoder's own processor.

``pad`` (LLaVA-1.5's ``image_aspect_ratio = "pad"``, its ``expand2square``): the image is pasted in
the middle of a square of the longer side, filled with the processor's mean colour
(``int(mean * 255)`` per channel), so nothing is cropped away. Then the released processors'
numbers: CLIP resizes the shortest edge to the image size (bicubic), crops the centre (offset rounded
down, as ``CLIPImageProcessor`` does; torchvision's ``CenterCrop`` rounds half to even, one row off
when the margin is 4k + 3) and normalises with CLIP's mean/std; SigLIP resizes to a square (bicubic) and normalises with mean = std = 0.5.
``resize`` skips the padding (CLIP then crops the longer side).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from mllmkit_vision_hf.families import Family

__all__ = ["CenterCrop", "PadToSquare", "expand2square", "llava_image_transform"]


def expand2square(image: Any, background: tuple[int, int, int]) -> Any:
    """A PIL image pasted centred (offset rounded down) into a square of its longer side."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


class PadToSquare:
    """:func:`expand2square` with a fixed fill (a class, so DataLoader workers can pickle it)."""

    def __init__(self, mean: tuple[float, float, float]) -> None:
        self.background = tuple(int(m * 255) for m in mean)

    def __call__(self, image: Any) -> Any:
        return expand2square(image.convert("RGB"), self.background)

    def __repr__(self) -> str:
        return f"PadToSquare(background={self.background})"


class CenterCrop:
    """The centre ``size``×``size`` square of a PIL image, offsets rounded down (transformers' crop)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Any) -> Any:
        width, height = image.size
        left, top = (width - self.size) // 2, (height - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size})"


def llava_image_transform(family: Family, image_size: int, image_aspect: str) -> Callable[[Any], torch.Tensor]:
    """PIL image → normalised ``[3, image_size, image_size]`` tensor (``image_aspect``: pad or resize)."""
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    steps: list[Any] = [PadToSquare(family.mean)] if image_aspect == "pad" else []
    if family.center_crop:
        steps += [transforms.Resize(image_size, interpolation=InterpolationMode.BICUBIC),
                  CenterCrop(image_size)]
    else:
        steps.append(transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC))
    return transforms.Compose([*steps, transforms.ToTensor(), transforms.Normalize(family.mean, family.std)])
