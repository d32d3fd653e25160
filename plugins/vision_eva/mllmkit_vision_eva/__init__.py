"""EVA ViT-g exactly as BLIP-2 / MiniGPT-4 / MiniGPT4Qwen use it, plus LAVIS's ``eva_vit_g.pth`` loader.

Components: ``eva_vit_g`` (224 px, patch 14, width 1408, 39 of EVA-CLIP-g's 40 blocks: the output is
the penultimate block's 257 tokens, no final norm) and ``eva_tiny`` (same builder, toy size).
"""

from mllmkit_vision_eva.encoder import EVA_TINY, EVA_VIT_G, EvaArch, EvaVisionEncoder, build_eva
from mllmkit_vision_eva.loading import eva_key_map, interpolate_pos_embed, load_eva_weights
from mllmkit_vision_eva.random_checkpoint import random_eva_state_dict, write_random_checkpoint
from mllmkit_vision_eva.transforms import CLIP_MEAN, CLIP_STD, blip2_image_transform

__all__ = [
           "CLIP_MEAN",
           "CLIP_STD",
           "EVA_TINY",
           "EVA_VIT_G",
           "EvaArch",
           "EvaVisionEncoder",
           "blip2_image_transform",
           "build_eva",
           "eva_key_map",
           "interpolate_pos_embed",
           "load_eva_weights",
           "random_eva_state_dict",
           "write_random_checkpoint",
]
