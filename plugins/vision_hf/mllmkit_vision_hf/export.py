"""Export of the CLIP/SigLIP encoders into ``LlavaForConditionalGeneration.vision_tower``.

The encoder already is transformers' ``CLIPVisionModel`` / ``SiglipVisionModel``, built with the
layers up to ``select_layer`` only, so its names carry over under ``model.vision_tower.`` and its
config is the tower's own (``num_hidden_layers`` = the layers kept). Llava then takes
``hidden_states[-1]`` of that tower (``vision_feature_layer = -1``: the same hidden state as
``select_layer`` of the full tower, before the final norm) and drops the class token with the
``default`` strategy (``select_feature = "patch"`` on CLIP), or keeps every token with ``full``
(``cls_patch``; SigLIP, which has no class token). The final LayerNorm, which LLaVA's features never
pass through and this encoder does not hold, is written as an identity and not read back.

The image processor is transformers' ``LlavaImageProcessor`` (PIL backend) with the family's
released numbers (CLIP: bicubic shortest-edge resize and centre crop, CLIP mean/std; SigLIP: bicubic
resize to the square, mean = std = 0.5) and ``do_pad`` for ``image_aspect = "pad"``: its
pad-to-square fills with ``int(mean * 255)`` and centres with the offset rounded down, as
:func:`~mllmkit_vision_hf.transforms.expand2square` does, so ``--verify`` compares pixels exactly.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from mllmkit.export.spec import ExportSpec, Table, hf_config_fields
from mllmkit_vision_hf.components import SPECS as COMPONENTS

__all__ = ["HF_TO_LLAVA", "LLAVA_TO_HF", "SPECS", "image_processor", "vision_config"]


def _with_identity_norm(match: re.Match, tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    """The patch embedding, and the tower's final LayerNorm as an identity (width = the patch embedding's)."""
    weight = tensors[match.group(0)]
    width, norm = weight.shape[0], f"model.vision_tower.{match.group(1)}post_layernorm"
    return [(f"model.vision_tower.{match.group(1)}embeddings.patch_embedding.weight", weight),
            (f"{norm}.weight", torch.ones(width, dtype=weight.dtype, device=weight.device)),
            (f"{norm}.bias", torch.zeros(width, dtype=weight.dtype, device=weight.device))]


HF_TO_LLAVA = Table(rules=[
    (r"tower\.(.*?)embeddings\.patch_embedding\.weight", _with_identity_norm),
    (r"tower\.(.+)", r"model.vision_tower.\1"),
])
"""Encoder state-dict names → ``LlavaForConditionalGeneration`` names (plus the identity final norm)."""

LLAVA_TO_HF = Table(rules=[
    (r"model\.vision_tower\.(?:.*\.)?post_layernorm\.(?:weight|bias)", lambda match, tensors: []),
    (r"model\.vision_tower\.(.+)", r"tower.\1"),
])
"""The reverse of :data:`HF_TO_LLAVA` (the final norm is not part of the encoder)."""


def vision_config(encoder: Any) -> dict[str, Any]:
    """``LlavaConfig`` fields of a built encoder: the tower's config, the feature layer and strategy."""
    return {"vision_config": hf_config_fields(encoder.tower.config), "vision_feature_layer": -1,
            "vision_feature_select_strategy": "default" if encoder.skip else "full"}


def image_processor(encoder: Any):
    """``LlavaImageProcessorPil`` doing :func:`~mllmkit_vision_hf.transforms.llava_image_transform`."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    family, side = encoder.family, encoder.image_size
    square = {"height": side, "width": side}
    size = {"shortest_edge": side} if family.center_crop else square
    return LlavaImageProcessorPil(do_pad=encoder.image_aspect == "pad", do_resize=True, size=size,
                                  resample=PILImageResampling.BICUBIC, do_center_crop=family.center_crop,
                                  crop_size=square, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                  image_mean=list(family.mean), image_std=list(family.std), do_convert_rgb=True)


SPECS = [
    ExportSpec(spec.name, "vision", "vision_tower", "CLIP/SigLIP tower up to select_layer → vision_tower",
               keys=HF_TO_LLAVA, reverse=LLAVA_TO_HF, config=vision_config, image_processor=image_processor)
    for spec in COMPONENTS
]
