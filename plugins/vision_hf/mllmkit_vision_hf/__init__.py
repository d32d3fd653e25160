"""CLIP and SigLIP vision towers as LLaVA-1.5 uses them, through transformers' own vision models.

Components: ``clip_vit_l14_336`` (openai/clip-vit-large-patch14-336), ``siglip_so400m_p14_384``
(google/siglip-so400m-patch14-384), and the toy ``clip_tiny`` / ``siglip_tiny`` (same code). Each
loads the Hugging Face folder as downloaded and outputs ``hidden_states[select_layer]``.
"""

from mllmkit_vision_hf.components import ClipOptions, SiglipOptions, build_preset, preset_dims
from mllmkit_vision_hf.encoder import HFVisionEncoder, build_encoder, layers_needed
from mllmkit_vision_hf.families import (
    CLIP,
    CLIP_TINY,
    CLIP_VIT_L14_336,
    SIGLIP,
    SIGLIP_SO400M_P14_384,
    SIGLIP_TINY,
    Family,
    Preset,
)
from mllmkit_vision_hf.loading import folder_config, load_folder, vision_key_map
from mllmkit_vision_hf.random_checkpoint import write_random_folder
from mllmkit_vision_hf.transforms import expand2square, llava_image_transform

__all__ = [
    "CLIP",
    "CLIP_TINY",
    "CLIP_VIT_L14_336",
    "SIGLIP",
    "SIGLIP_SO400M_P14_384",
    "SIGLIP_TINY",
    "ClipOptions",
    "Family",
    "HFVisionEncoder",
    "Preset",
    "SiglipOptions",
    "build_encoder",
    "build_preset",
    "expand2square",
    "folder_config",
    "layers_needed",
    "llava_image_transform",
    "load_folder",
    "preset_dims",
    "vision_key_map",
    "write_random_folder",
]
