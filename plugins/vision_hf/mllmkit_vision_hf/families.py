"""The two encoder families (CLIP, SigLIP) and their presets, as data.

A :class:`Family` names transformers' own classes for the vision tower and for the full model a
Hugging Face folder holds, the image-processor numbers of the released checkpoints, whether the
tower has a class token, and which keys of the full model's file the vision tower does not use. A
:class:`Preset` is a family plus the fields of its vision config (transformers' spelling), so the
widths of a recipe are known before any folder is downloaded.
"""

from __future__ import annotations

from typing import Any

import attrs

__all__ = ["CLIP", "CLIP_TINY", "CLIP_VIT_L14_336", "Family", "Preset", "SIGLIP", "SIGLIP_SO400M_P14_384",
           "SIGLIP_TINY"]


@attrs.frozen(kw_only=True)
class Family:
    """One encoder family: transformers classes, image-processor numbers, unused file keys."""

    name: str
    config_class: str
    """transformers' vision config class (reads a full model's config.json too)."""
    model_class: str
    """transformers' vision tower class."""
    full_model_class: str
    """The class a downloaded folder holds (vision and text towers)."""
    full_config_class: str
    model_types: tuple[str, ...]
    """``model_type`` values of config.json this family loads."""
    has_cls: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    center_crop: bool
    """Resize the shortest edge then crop the centre (CLIP); else resize to a square (SigLIP)."""
    unused_keys: tuple[str, ...]
    """Regexes of the file's keys the vision features do not use (text tower, heads, final norm)."""
    tower_options: dict[str, Any] = attrs.field(factory=dict)
    """Vision config fields set when building (SigLIP: no attention-pooling head)."""


CLIP = Family(
    name="CLIP", config_class="CLIPVisionConfig", model_class="CLIPVisionModel", full_model_class="CLIPModel",
    full_config_class="CLIPConfig", model_types=("clip", "clip_vision_model"), has_cls=True,
    mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), center_crop=True,
    unused_keys=(r"text_model\..+", r"(text|visual)_projection\.weight", r"logit_scale",
                 r"vision_model\.embeddings\.position_ids", r"vision_model\.post_layernorm\.(weight|bias)"),
)
SIGLIP = Family(
    name="SigLIP", config_class="SiglipVisionConfig", model_class="SiglipVisionModel", full_model_class="SiglipModel",
    full_config_class="SiglipConfig", model_types=("siglip", "siglip_vision_model"), has_cls=False,
    mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), center_crop=False,
    unused_keys=(r"text_model\..+", r"logit_(scale|bias)", r"vision_model\.head\..+",
                 r"vision_model\.post_layernorm\.(weight|bias)"),
    tower_options={"vision_use_head": False},
)


@attrs.frozen(kw_only=True)
class Preset:
    """A family and its vision config fields (transformers' names)."""

    name: str
    family: Family
    fields: dict[str, Any]

    def hf_config(self):
        import transformers

        return getattr(transformers, self.family.config_class)(**self.fields)


CLIP_VIT_L14_336 = Preset(name="clip_vit_l14_336", family=CLIP, fields=dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=336,
    patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768))
"""openai/clip-vit-large-patch14-336: 24 layers of width 1024, 24×24 patches + CLS."""

SIGLIP_SO400M_P14_384 = Preset(name="siglip_so400m_p14_384", family=SIGLIP, fields=dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
    patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6))
"""google/siglip-so400m-patch14-384: 27 layers of width 1152, 27×27 patches, no CLS."""

_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
             patch_size=14)
CLIP_TINY = Preset(name="clip_tiny", family=CLIP, fields=dict(_TINY, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                                                               projection_dim=16))
"""Toy CLIP: 3 layers of width 32, 28 px, 2×2 patches + CLS."""
SIGLIP_TINY = Preset(name="siglip_tiny", family=SIGLIP, fields=dict(_TINY, hidden_act="gelu_pytorch_tanh",
                                                                    layer_norm_eps=1e-6))
"""Toy SigLIP: 3 layers of width 32, 28 px, 2×2 patches."""
