"""Component specs ``clip_vit_l14_336``, ``siglip_so400m_p14_384``, ``clip_tiny``, ``siglip_tiny``.

Options (recipe table ``[model.vision]``):
- ``path``: the Hugging Face folder as downloaded (config.json + safetensors of the full CLIP/SigLIP
  model). Unset: random weights at the preset's size (logged). Set but not there yet: ``mllmkit
  check`` uses the preset's numbers; ``mllmkit run`` stops and names it.
- ``select_layer`` (default −2, LLaVA's): the features are ``hidden_states[select_layer]`` of the
  tower; only the layers they need are built.
- ``select_feature``: ``patch`` (default; CLIP's class token dropped: 576 tokens at 336 px) or
  ``cls_patch`` (kept: 577). SigLIP has no class token, so only ``patch``.
- ``image_aspect``: ``pad`` (default; LLaVA-1.5's pad to square with the mean colour) or ``resize``.
- ``attn_implementation``: ``sdpa`` (default) or ``eager``.

The keys every vision encoder shares (``trainable``, default false; ``precision``, default fp32;
``gradient_checkpointing``) are the core's (mllmkit.recipe.shared): weights are read into the dtype
the core hands the builder (``BuildContext.dtype``).

Widths (``dims``) come from config.json or the preset alone; no weights are read.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Literal

import attrs
import torch

from mllmkit.config import ConfigValueError, config
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.precision import layout_for_autocast
from mllmkit.registry import ComponentSpec
from mllmkit.weights import meta_parameters
from mllmkit_vision_hf.encoder import HFVisionEncoder, build_encoder, layers_needed
from mllmkit_vision_hf.families import CLIP_TINY, CLIP_VIT_L14_336, SIGLIP_SO400M_P14_384, SIGLIP_TINY, Preset

__all__ = ["SPECS", "ClipOptions", "SiglipOptions", "build_preset", "preset_dims", "resolve_config"]

logger = logging.getLogger(__name__)


def _not_zero(instance, attribute: attrs.Attribute, value: int) -> None:
    if value == 0:
        raise ConfigValueError(attribute.name, "expected a layer index other than 0 (hidden_states[0] is the "
                                               "embeddings); LLaVA uses -2")


def _no_cls(instance, attribute: attrs.Attribute, value: str) -> None:
    if value != "patch":
        raise ConfigValueError(attribute.name, f"SigLIP has no class token, so only 'patch' applies; found {value!r}")


@config
class ClipOptions:
    """Options of the CLIP components (see the module docstring)."""

    path: pathlib.Path | None = None
    select_layer: int = attrs.field(default=-2, validator=_not_zero)
    select_feature: Literal["patch", "cls_patch"] = "patch"
    image_aspect: Literal["pad", "resize"] = "pad"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


@config
class SiglipOptions:
    """Options of the SigLIP components (see the module docstring)."""

    path: pathlib.Path | None = None
    select_layer: int = attrs.field(default=-2, validator=_not_zero)
    select_feature: str = attrs.field(default="patch", validator=_no_cls)
    image_aspect: Literal["pad", "resize"] = "pad"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"


Options = ClipOptions | SiglipOptions


def resolve_config(preset: Preset, cfg: Options, where: str, *, building: bool):
    """The tower's config: the folder's (checked against the preset), else the preset's numbers."""
    from mllmkit_vision_hf.loading import folder_config

    if cfg.path is None or (not cfg.path.exists() and not building):
        return preset.hf_config()
    return folder_config(cfg.path, preset, where)


def preset_dims(preset: Preset, cfg: Options, ctx: BuildContext) -> PartDims:
    config = resolve_config(preset, cfg, ctx.key, building=False)
    layers_needed(cfg.select_layer, config.num_hidden_layers, ctx.key)
    keep_cls = preset.family.has_cls and cfg.select_feature == "cls_patch"
    return PartDims(out_dim=config.hidden_size, out_tokens=(config.image_size // config.patch_size) ** 2 + keep_cls)


def build_preset(preset: Preset, cfg: Options, ctx: BuildContext) -> HFVisionEncoder:
    """Build ``preset``'s encoder: streamed from ``cfg.path`` (parameters on meta until loaded; Linear/Conv
    weights in ``ctx.dtype``, the rest fp32, as the core lays vision encoders out), or random."""
    from mllmkit_vision_hf.loading import load_folder

    hf_config = resolve_config(preset, cfg, ctx.key, building=True)
    options = dict(select_layer=cfg.select_layer, drop_cls=cfg.select_feature == "patch",
                   image_aspect=cfg.image_aspect, attn_implementation=cfg.attn_implementation, where=ctx.key)
    if cfg.path is None:
        logger.warning("%s: no path given: %s (%s) is randomly initialised", ctx.key, preset.family.name, preset.name)
        return build_encoder(preset.family, hf_config, **options)
    with meta_parameters():
        encoder = build_encoder(preset.family, hf_config, **options)
    layout_for_autocast(encoder, ctx.dtype or torch.float32)  # Linear/Conv weights read straight into ctx.dtype
    load_folder(encoder, cfg.path, ctx.key)
    return encoder


def _spec(preset: Preset, options: type, description: str) -> ComponentSpec:
    return ComponentSpec(preset.name, options, lambda cfg, ctx: build_preset(preset, cfg, ctx), description,
                         dims=lambda cfg, ctx: preset_dims(preset, cfg, ctx))


SPECS = [
    _spec(CLIP_VIT_L14_336, ClipOptions,
          "CLIP ViT-L/14 at 336 px as LLaVA-1.5 uses it (layer -2, 576 patch tokens of 1024; HF folder)"),
    _spec(SIGLIP_SO400M_P14_384, SiglipOptions,
          "SigLIP so400m/14 at 384 px (layer -2, 729 patch tokens of 1152; HF folder)"),
    _spec(CLIP_TINY, ClipOptions, "toy CLIP vision tower (28 px, patch 14, width 32, 3 layers) for tests"),
    _spec(SIGLIP_TINY, SiglipOptions, "toy SigLIP vision tower (28 px, patch 14, width 32, 3 layers) for tests"),
]
