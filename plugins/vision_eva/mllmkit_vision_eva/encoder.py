"""The EVA ViT encoder module (timm's ``Eva`` blocks) and its builder ``build_eva``; presets as data.

The BLIP-2 variant of EVA ViT-g is timm's ``Eva`` with absolute position embedding, no rotary
embedding, fused qkv weight with separate ``q_bias``/``v_bias`` (timm keeps a zero ``k_bias`` as a
non-persistent buffer), no layer-scale, GELU MLP, pre-norm LayerNorm (eps 1e-6) and **no final
norm**: :class:`EvaVisionEncoder` runs patch embedding, class token, position embedding and the
blocks itself and returns all tokens of the last built block. BLIP-2 builds 39 of EVA-CLIP-g's 40
blocks, so that is the penultimate block of the released network.

Precision is the core's (``mllmkit.precision``): as LAVIS, Linear/Conv weights in the declared dtype,
everything else fp32, run under autocast; so :meth:`EvaVisionEncoder.forward` keeps LAVIS's order of
operations (class token and position embedding added in fp32, no casts of its own). The LayerNorms
compute in fp32 (timm's ``LayerNormFp32``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = [
    "EVA_TINY",
    "EVA_VIT_G",
    "EvaArch",
    "EvaVisionEncoder",
    "build_eva",
    "init_nonpersistent_buffers",
]


@attrs.frozen(kw_only=True)
class EvaArch:
    """An EVA architecture: the released network (``depth`` blocks) and how many BLIP-2 builds."""

    image_size: int
    patch_size: int
    width: int
    depth: int
    """Blocks in the released checkpoint (EVA-CLIP-g: 40)."""
    num_heads: int
    mlp_dim: int
    num_blocks: int
    """Blocks built by default (BLIP-2: 39, the output is the penultimate block's)."""


EVA_VIT_G = EvaArch(image_size=224, patch_size=14, width=1408, depth=40, num_heads=16, mlp_dim=6144,
                    num_blocks=39)
"""EVA-CLIP-g as LAVIS's ``create_eva_vit_g`` builds it (mlp_ratio 4.3637 → 6144)."""

EVA_TINY = EvaArch(image_size=56, patch_size=14, width=64, depth=3, num_heads=4, mlp_dim=256, num_blocks=2)
"""Toy size for tests and CPU demos: 4×4 patches + CLS = 17 tokens of width 64, 2 of 3 blocks."""


def _layer_norm() -> Callable[..., nn.Module]:
    from timm.layers import LayerNormFp32

    return functools.partial(LayerNormFp32, eps=1e-6)


class EvaVisionEncoder(nn.Module):
    """EVA ViT: ``forward(pixels [B,3,H,W]) -> [B, num_tokens, out_dim]`` (all tokens incl. CLS).

    ``vit`` is a timm ``Eva`` without head, pooling or final norm; its state-dict keys are LAVIS's
    with the prefix ``vit.``.
    """

    def __init__(self, *, image_size: int, patch_size: int, width: int, depth: int, num_heads: int,
                 mlp_dim: int, hflip: bool = False) -> None:
        super().__init__()
        from timm.models.eva import Eva

        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        # int(width * ratio) must give mlp_dim exactly; the +0.5 guards against float rounding down.
        mlp_ratio = (mlp_dim + 0.5) / width
        self.vit = Eva(img_size=image_size, patch_size=patch_size, embed_dim=width, depth=depth,
                       num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, qkv_fused=True,
                       num_classes=0, global_pool="", use_abs_pos_emb=True, use_rot_pos_emb=False,
                       init_values=None, norm_layer=_layer_norm(), use_fc_norm=False,
                       use_post_transformer_norm=False)
        # No final norm, pooling or head in BLIP-2's encoder; make sure none holds parameters.
        self.vit.norm, self.vit.fc_norm, self.vit.head = nn.Identity(), nn.Identity(), nn.Identity()
        fc1 = self.vit.blocks[0].mlp.fc1
        if fc1.out_features != mlp_dim:  # pragma: no cover - guards the ratio trick above
            raise AssertionError(f"MLP hidden {fc1.out_features} != {mlp_dim}")
        self.image_size = image_size
        self.patch_size = patch_size
        self.out_dim = width
        self.num_tokens = (image_size // patch_size) ** 2 + 1
        self.hflip = hflip
        self.checkpointing = False

    # -- VisionEncoder interface --
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        x = vit.patch_embed(pixels)
        x = torch.cat((vit.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + vit.pos_embed
        use_ckpt = self.checkpointing and torch.is_grad_enabled()
        for block in vit.blocks:
            x = checkpoint(block, x, use_reentrant=False) if use_ckpt else block(x)
        return x

    def image_transform(self, train: bool) -> Callable[[Any], torch.Tensor]:
        from mllmkit_vision_eva.transforms import blip2_image_transform

        return blip2_image_transform(self.image_size, train=train, hflip=self.hflip)

    def blocks(self) -> Sequence[nn.Module]:
        return list(self.vit.blocks)

    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in backward (when autograd records) instead of keeping its activations."""
        self.checkpointing = enabled


def init_nonpersistent_buffers(module: nn.Module, device: torch.device | str = "cpu") -> None:
    """Give buffers left on the meta device real storage, keeping their dtype and persistence.

    The only ones in EVA are the attention ``k_bias`` buffers, which are zero by definition (EVA has
    no key bias), so zeros are the correct values, not a placeholder.
    """
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                if name != "k_bias":
                    raise RuntimeError(f"buffer {name} of {type(sub).__name__} has no known value after meta init")
                persistent = name not in sub._non_persistent_buffers_set
                sub.register_buffer(name, torch.zeros(buf.shape, dtype=buf.dtype, device=device),
                                    persistent=persistent)


def build_eva(*, image_size: int, patch_size: int, width: int, depth: int, num_heads: int, mlp_dim: int,
              hflip: bool = False, pos_embed_init: str = "trunc_normal",
              device: torch.device | str | None = None) -> EvaVisionEncoder:
    """Build an EVA encoder of ``depth`` blocks. ``device="meta"`` builds without memory (for loading).

    With a real device the weights get timm's EVA initialisation (trunc-normal std 0.02, zero
    biases). For training from scratch the (still learned) position embedding can start at unit
    scale instead: std 0.02 is ~30× smaller than the patch content and a small encoder takes
    thousands of steps to grow it. ``pos_embed_init="unit_normal"``: normal(0, 1), every position
    a distinct random vector; ``"sincos"``: the 2-D sine-cosine table of MAE (class-token row zero).
    """
    with torch.device(device or "cpu"):
        encoder = EvaVisionEncoder(image_size=image_size, patch_size=patch_size, width=width, depth=depth,
                                   num_heads=num_heads, mlp_dim=mlp_dim, hflip=hflip)
    if pos_embed_init not in ("trunc_normal", "unit_normal", "sincos"):
        raise ValueError(f"pos_embed_init must be 'trunc_normal', 'unit_normal' or 'sincos', found {pos_embed_init!r}")
    if device != "meta" and pos_embed_init == "unit_normal":
        with torch.no_grad():
            encoder.vit.pos_embed.normal_(0.0, 1.0)
    elif device != "meta" and pos_embed_init == "sincos":
        _init_sincos_pos_embed(encoder)
    return encoder


@torch.no_grad()
def _init_sincos_pos_embed(encoder: EvaVisionEncoder) -> None:
    """Overwrite the position embedding with the 2-D sine-cosine table of the patch grid (CLS row 0)."""
    from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed

    grid = encoder.image_size // encoder.patch_size
    table = build_sincos2d_pos_embed([grid, grid], dim=encoder.out_dim)
    pos_embed = encoder.vit.pos_embed
    pos_embed[0, 0].zero_()
    pos_embed[0, 1:].copy_(table.to(pos_embed.dtype))
