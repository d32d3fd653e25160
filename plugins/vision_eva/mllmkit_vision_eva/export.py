"""Export of ``eva_vit_g`` / ``eva_tiny`` into ``Blip2ForConditionalGeneration.vision_model``.

BLIP-2's EVA is exactly transformers' ``Blip2VisionModel`` minus its final LayerNorm (which the
Q-Former plugin fills with LAVIS's ``ln_vision``): patch embedding, class token, absolute position
embedding, pre-norm blocks with one LayerNorm eps, fused qkv with ``q_bias``/``v_bias`` (Blip2's
``qkv.bias`` is q | 0 | v), exact-erf GELU MLP, no layer-scale. :func:`check_representable`
refuses an encoder built otherwise (rotary embedding, layer-scale, sub-LayerNorms, another
activation) naming what differs. The image processor is BLIP's PIL one with the encoder's eval
transform numbers (bicubic resize to the square size, CLIP mean/std).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mllmkit.export.spec import ExportError, ExportSpec, Table

__all__ = ["EVA_TO_BLIP2", "BLIP2_TO_EVA", "SPECS", "check_representable", "vision_config"]

_BLOCK = r"vit\.blocks\.(\d+)\."
_LAYER = r"vision_model\.encoder\.layers\.(\d+)\."


def _fuse_qkv_bias(match: re.Match, tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    i = match.group(1)
    q, v = tensors[f"vit.blocks.{i}.attn.q_bias"], tensors[f"vit.blocks.{i}.attn.v_bias"]
    return [(f"vision_model.encoder.layers.{i}.self_attn.qkv.bias", torch.cat((q, torch.zeros_like(q), v)))]


def _split_qkv_bias(match: re.Match, tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    i = match.group(1)
    q, k, v = tensors[match.group(0)].chunk(3)
    if torch.count_nonzero(k):
        raise ExportError(f"{match.group(0)}: the key part of the bias is not zero; EVA has no key bias, so "
                          f"these weights are not an EVA encoder's")
    return [(f"vit.blocks.{i}.attn.q_bias", q), (f"vit.blocks.{i}.attn.v_bias", v)]


EVA_TO_BLIP2 = Table(rules=[
    (r"vit\.cls_token", "vision_model.embeddings.class_embedding"),
    (r"vit\.pos_embed", "vision_model.embeddings.position_embedding"),
    (r"vit\.patch_embed\.proj\.(weight|bias)", r"vision_model.embeddings.patch_embedding.\1"),
    (_BLOCK + r"norm([12])\.(weight|bias)", r"vision_model.encoder.layers.\1.layer_norm\2.\3"),
    (_BLOCK + r"attn\.qkv\.weight", r"vision_model.encoder.layers.\1.self_attn.qkv.weight"),
    (_BLOCK + r"attn\.q_bias", _fuse_qkv_bias),
    (_BLOCK + r"attn\.proj\.(weight|bias)", r"vision_model.encoder.layers.\1.self_attn.projection.\2"),
    (_BLOCK + r"mlp\.(fc[12])\.(weight|bias)", r"vision_model.encoder.layers.\1.mlp.\2.\3"),
], consumed=[_BLOCK + r"attn\.v_bias"])
"""EVA encoder state-dict names → ``Blip2ForConditionalGeneration`` names."""

BLIP2_TO_EVA = Table(rules=[
    (r"vision_model\.embeddings\.class_embedding", "vit.cls_token"),
    (r"vision_model\.embeddings\.position_embedding", "vit.pos_embed"),
    (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", r"vit.patch_embed.proj.\1"),
    (_LAYER + r"layer_norm([12])\.(weight|bias)", r"vit.blocks.\1.norm\2.\3"),
    (_LAYER + r"self_attn\.qkv\.weight", r"vit.blocks.\1.attn.qkv.weight"),
    (_LAYER + r"self_attn\.qkv\.bias", _split_qkv_bias),
    (_LAYER + r"self_attn\.projection\.(weight|bias)", r"vit.blocks.\1.attn.proj.\2"),
    (_LAYER + r"mlp\.(fc[12])\.(weight|bias)", r"vit.blocks.\1.mlp.\2.\3"),
])
"""The reverse of :data:`EVA_TO_BLIP2`."""


def check_representable(encoder: Any) -> None:
    """Raise :class:`ExportError` naming every detail ``Blip2VisionModel`` cannot compute."""
    vit, problems = encoder.vit, []
    if getattr(vit, "rope", None) is not None:
        problems.append("rotary position embedding")
    if vit.pos_embed is None:
        problems.append("no absolute position embedding")
    if getattr(vit, "num_prefix_tokens", 1) != 1:
        problems.append(f"{vit.num_prefix_tokens} prefix tokens (Blip2 has one class token)")
    eps = {block.norm1.eps for block in vit.blocks} | {block.norm2.eps for block in vit.blocks}
    if len(eps) != 1:
        problems.append(f"LayerNorm eps differ between blocks ({sorted(eps)})")
    for i, block in enumerate(vit.blocks):
        where = f"block {i}"
        if any(getattr(block, name, None) is not None for name in ("gamma_1", "gamma_2")):
            problems.append(f"{where}: layer-scale")
        for name in ("ls1", "ls2", "drop_path1", "drop_path2"):
            if not isinstance(getattr(block, name, nn.Identity()), nn.Identity):
                problems.append(f"{where}: {name} is {type(getattr(block, name)).__name__}, not identity")
        if not isinstance(getattr(block.attn, "norm", nn.Identity()), nn.Identity):
            problems.append(f"{where}: LayerNorm inside attention")
        if block.attn.head_dim * block.attn.num_heads != encoder.out_dim:
            problems.append(f"{where}: attention width {block.attn.head_dim * block.attn.num_heads} != {encoder.out_dim}")
        if getattr(block.attn, "q_bias", None) is None or getattr(block.attn, "v_bias", None) is None:
            problems.append(f"{where}: attention without q_bias/v_bias")
        mlp = block.mlp
        act = getattr(mlp, "act", None)
        if not (hasattr(mlp, "fc1") and isinstance(act, nn.GELU) and act.approximate == "none"):
            problems.append(f"{where}: MLP is {type(mlp).__name__} with {type(act).__name__}, not fc1 → GELU(erf) → fc2")
        elif not isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity):
            problems.append(f"{where}: LayerNorm inside the MLP")
    if problems:
        raise ExportError("the EVA encoder is not representable as Blip2VisionModel: " + "; ".join(problems))


def vision_config(encoder: Any) -> dict[str, Any]:
    """``Blip2Config(vision_config=…)`` fields of a built encoder (checked first)."""
    check_representable(encoder)
    block = encoder.vit.blocks[0]
    return {"vision_config": {
        "hidden_size": encoder.out_dim, "intermediate_size": block.mlp.fc1.out_features,
        "num_hidden_layers": len(encoder.vit.blocks), "num_attention_heads": block.attn.num_heads,
        "image_size": encoder.image_size, "patch_size": encoder.patch_size, "hidden_act": "gelu",
        "layer_norm_eps": block.norm1.eps, "qkv_bias": True, "attention_dropout": 0.0}}


def image_processor(encoder: Any):
    """BLIP's PIL image processor doing :func:`blip2_image_transform` (eval): RGB, bicubic resize to
    ``image_size`` square, scale to [0, 1], CLIP mean/std."""
    from transformers.image_utils import PILImageResampling
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from mllmkit_vision_eva.transforms import CLIP_MEAN, CLIP_STD

    size = encoder.image_size
    return BlipImageProcessorPil(size={"height": size, "width": size}, resample=PILImageResampling.BICUBIC,
                                 do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                                 image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)


SPECS = [
    ExportSpec(name, "vision", "vision_model", "EVA blocks → Blip2VisionModel (q/v bias fused, no final norm)",
               keys=EVA_TO_BLIP2, reverse=BLIP2_TO_EVA, config=vision_config, image_processor=image_processor)
    for name in ("eva_vit_g", "eva_tiny")
]
