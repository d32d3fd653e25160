"""Component specs ``eva_vit_g`` and ``eva_tiny``: options, builders and declared widths.

Options (recipe table ``[model.vision]``): ``weights`` (LAVIS ``eva_vit_g.pth``; without it random
init, logged), ``image_size`` (position embedding interpolated from the file's grid),
``num_blocks`` (blocks built = feature layer; BLIP-2 uses 39 of 40), ``hflip`` (random horizontal
flip in the train transform, default false) and ``pos_embed_init`` (``trunc_normal`` std 0.02 as
timm; for training from scratch ``unit_normal``, std 1, or ``sincos``, the 2-D sine-cosine table;
only used without ``weights``). The core's shared keys ``precision`` (``eva_vit_g``: fp16 as LAVIS's
``vit_precision``; ``eva_tiny``: fp32), ``trainable`` and ``gradient_checkpointing`` apply too.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Literal

import attrs
import torch

from mllmkit.config import ConfigValueError, config, positive
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.precision import layout_for_autocast
from mllmkit.registry import ComponentSpec
from mllmkit_vision_eva.encoder import EVA_TINY, EVA_VIT_G, EvaArch, EvaVisionEncoder, build_eva

__all__ = ["SPECS", "EvaTinyConfig", "EvaViTGConfig", "build_preset", "dims_of"]

logger = logging.getLogger(__name__)

PosEmbedInit = Literal["trunc_normal", "unit_normal", "sincos"]
"""How a randomly initialised encoder's position embedding starts (see ``build_eva``)."""



def _multiple_of_patch(patch: int):
    def check(instance, attribute: attrs.Attribute, value: int) -> None:
        if value % patch:
            raise ConfigValueError(attribute.name, f"expected a multiple of the patch size {patch}, found {value}")
    return check


@config
class EvaViTGConfig:
    """Options of ``eva_vit_g`` (BLIP-2's EVA ViT-g/14)."""

    weights: pathlib.Path | None = None
    image_size: int = attrs.field(default=EVA_VIT_G.image_size,
                                  validator=[positive, _multiple_of_patch(EVA_VIT_G.patch_size)])
    num_blocks: int = attrs.field(default=EVA_VIT_G.num_blocks, validator=positive)
    hflip: bool = False
    pos_embed_init: PosEmbedInit = "trunc_normal"


@config
class EvaTinyConfig:
    """Options of ``eva_tiny`` (toy size, same code)."""

    weights: pathlib.Path | None = None
    image_size: int = attrs.field(default=EVA_TINY.image_size,
                                  validator=[positive, _multiple_of_patch(EVA_TINY.patch_size)])
    num_blocks: int = attrs.field(default=EVA_TINY.num_blocks, validator=positive)
    hflip: bool = False
    pos_embed_init: PosEmbedInit = "trunc_normal"


def dims_of(arch: EvaArch, cfg: EvaViTGConfig | EvaTinyConfig) -> PartDims:
    return PartDims(out_dim=arch.width, out_tokens=(cfg.image_size // arch.patch_size) ** 2 + 1)


def build_preset(arch: EvaArch, cfg: EvaViTGConfig | EvaTinyConfig, ctx: BuildContext) -> EvaVisionEncoder:
    """Build ``arch`` with ``cfg``: on the meta device and streamed from ``cfg.weights`` (Linear/Conv
    weights read straight into ``ctx.dtype``, the rest fp32), or random."""
    from mllmkit_vision_eva.loading import load_eva_weights

    device = "cpu" if cfg.weights is None else "meta"
    encoder = build_eva(image_size=cfg.image_size, patch_size=arch.patch_size, width=arch.width,
                        depth=cfg.num_blocks, num_heads=arch.num_heads, mlp_dim=arch.mlp_dim, hflip=cfg.hflip,
                        pos_embed_init=cfg.pos_embed_init, device=device)
    if cfg.weights is None:
        logger.warning("%s: no weights given: EVA encoder (%d blocks, width %d) is randomly initialised",
                       ctx.key, cfg.num_blocks, arch.width)
    else:
        layout_for_autocast(encoder, ctx.dtype or torch.float32)
        load_eva_weights(encoder, cfg.weights, key=ctx.key)
    return encoder


def _preset(arch: EvaArch):
    return (lambda cfg, ctx: build_preset(arch, cfg, ctx)), (lambda cfg, ctx: dims_of(arch, cfg))


_build_g, _dims_g = _preset(EVA_VIT_G)
_build_tiny, _dims_tiny = _preset(EVA_TINY)

SPECS = [
    ComponentSpec("eva_vit_g", EvaViTGConfig, _build_g,
                  "EVA ViT-g/14 as BLIP-2 uses it (39 blocks, 257 tokens of 1408, LAVIS eva_vit_g.pth)",
                  dims=_dims_g, defaults={"precision": "fp16"}),
    ComponentSpec("eva_tiny", EvaTinyConfig, _build_tiny,
                  "toy EVA ViT (56 px, patch 14, width 64, 2 blocks) for tests and CPU demos", dims=_dims_tiny),
]
