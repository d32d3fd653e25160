"""BLIP-2's image transforms (LAVIS ``blip2_image_train`` / ``blip_image_eval``), with CLIP normalisation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CLIP_MEAN", "CLIP_STD", "blip2_image_transform"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class _ToRGB:
    """PIL image → RGB (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __call__(self, image: Any) -> Any:
        return image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image

    def __repr__(self) -> str:
        return "ToRGB()"


def blip2_image_transform(image_size: int, train: bool, hflip: bool = False,
                          min_scale: float = 0.5, max_scale: float = 1.0) -> Callable[[Any], torch.Tensor]:
    """PIL image → normalised ``[3, image_size, image_size]`` tensor.

    ``train``: RandomResizedCrop(image_size, scale=(min_scale, max_scale), bicubic), optional random
    horizontal flip, ToTensor, CLIP mean/std. ``hflip`` is off by default: flipping an image turns
    "left" into "right", which corrupts the answers of instruction data that talk about positions
    (LAVIS's BLIP-2 pretraining flips; instruction tuning should not).
    Eval: resize to ``image_size × image_size`` (bicubic, aspect ratio not kept), same normalisation.
    """
    from torchvision import transforms
    from torchvision.transforms import InterpolationMode

    normalize = transforms.Normalize(CLIP_MEAN, CLIP_STD)
    if train:
        steps: list[Any] = [_ToRGB(), transforms.RandomResizedCrop(
            image_size, scale=(min_scale, max_scale), interpolation=InterpolationMode.BICUBIC)]
        if hflip:
            steps.append(transforms.RandomHorizontalFlip())
    else:
        steps = [_ToRGB(), transforms.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)]
    return transforms.Compose([*steps, transforms.ToTensor(), normalize])
