"""Loading LAVIS's ``eva_vit_g.pth`` (a bare state dict) into :class:`EvaVisionEncoder`.

The key map is a declared table (``mllmkit.weights.KeyMap``): the file's top-level names
(``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.N.*``) become ``vit.*`` in the
module. ``pos_embed`` is interpolated bicubically when the file's grid differs from the model's
(as LAVIS's ``interpolate_pos_embed`` does). Blocks at or beyond ``num_blocks`` are expected in the
file (EVA-CLIP-g has 40, BLIP-2 builds 39) and skipped; any other unexpected or missing key is an
error listing the keys. Tensors stream into a model built on the meta device, so the checkpoint is
never held twice.
"""

from __future__ import annotations

import logging
import math
import pathlib
import re

import torch
import torch.nn.functional as F

from mllmkit.weights import KeyMap, WeightsError, checkpoint_files, iter_tensors, load_into
from mllmkit_vision_eva.encoder import EvaVisionEncoder, init_nonpersistent_buffers

__all__ = ["BLOCK_KEYS", "eva_key_map", "interpolate_pos_embed", "load_eva_weights"]

logger = logging.getLogger(__name__)

BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias")
"""The tensors of one block in ``eva_vit_g.pth`` (formats/eva_vit_g.tsv)."""


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: int, num_prefix: int = 1, *,
                          source: str = "pos_embed") -> torch.Tensor:
    """``[1, prefix + g*g, D]`` → ``[1, prefix + grid*grid, D]``, bicubic (align_corners=False).

    The prefix (CLS) rows are kept; the patch rows are reshaped to their square grid, resized and
    flattened back row-major. Computed in fp32, returned in the input dtype.
    """
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise WeightsError(f"{source}: expected shape [1, tokens, width], found {list(pos_embed.shape)}")
    patches = pos_embed.shape[1] - num_prefix
    old = math.isqrt(max(patches, 0))
    if old * old != patches:
        raise WeightsError(f"{source}: {patches} patch positions do not form a square grid "
                           f"(shape {list(pos_embed.shape)}); expected {num_prefix} + g*g rows")
    if old == grid:
        return pos_embed
    width = pos_embed.shape[-1]
    prefix, tokens = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    tokens = tokens.float().reshape(1, old, old, width).permute(0, 3, 1, 2)
    tokens = F.interpolate(tokens, size=(grid, grid), mode="bicubic", align_corners=False)
    tokens = tokens.permute(0, 2, 3, 1).reshape(1, grid * grid, width).to(pos_embed.dtype)
    return torch.cat((prefix, tokens), dim=1)


def eva_key_map(num_blocks: int, grid: int, source: str = "eva_vit_g.pth") -> KeyMap:
    """LAVIS ``eva_vit_g.pth`` names → :class:`EvaVisionEncoder` names, for a model of ``num_blocks``.

    ``grid`` is the model's patch grid side (image_size / patch_size); ``pos_embed`` is resized to it.
    """
    block_keys = "|".join(re.escape(k) for k in BLOCK_KEYS)

    def block(match: re.Match, tensor: torch.Tensor):
        index = int(match.group(1))
        if index >= num_blocks:
            return []  # EVA-CLIP-g's last block(s): in the file, not used by BLIP-2
        return [(f"vit.blocks.{index}.{match.group(2)}", tensor)]

    def pos_embed(match: re.Match, tensor: torch.Tensor):
        resized = interpolate_pos_embed(tensor, grid, source=f"{source}: pos_embed")
        if resized is not tensor:
            old = math.isqrt(tensor.shape[1] - 1)
            logger.info("%s: position embedding interpolated (bicubic) from %dx%d to %dx%d",
                        source, old, old, grid, grid)
        return [("vit.pos_embed", resized)]

    return KeyMap(rules=[
        (r"cls_token", r"vit.cls_token"),
        (r"pos_embed", pos_embed),
        (r"patch_embed\.proj\.(weight|bias)", r"vit.patch_embed.proj.\1"),
        (rf"blocks\.(\d+)\.({block_keys})", block),
    ])


def load_eva_weights(encoder: EvaVisionEncoder, path: str | pathlib.Path, *, key: str = "vision") -> None:
    """Stream ``path`` (LAVIS ``eva_vit_g.pth``) into ``encoder`` (built on meta or real device).

    Each tensor takes the dtype of the encoder's tensor it lands in (lay the encoder out first, e.g.
    with ``mllmkit.precision.layout_for_autocast``). Raises WeightsError naming every unexpected and
    missing key.
    """
    path = pathlib.Path(path)
    num_blocks = len(encoder.vit.blocks)
    grid = encoder.image_size // encoder.patch_size
    key_map = eva_key_map(num_blocks, grid, source=str(path))
    try:
        files = checkpoint_files(path)
    except WeightsError as exc:  # not there: the key-layout hints below would not help
        raise WeightsError(f"{key}.weights: {exc}") from None
    try:
        report = load_into(encoder, iter_tensors(files), key_map, source=str(path))
    except WeightsError as exc:
        raise WeightsError(
            f"{key}.weights: {exc}. Unexpected keys are the file's names; missing keys are the model's "
            f"(prefix 'vit.' = the file's top level). Expected a LAVIS eva_vit_g.pth-format state dict with "
            f"cls_token, pos_embed, patch_embed.proj.* and blocks.0..{num_blocks - 1}.*; if the file has "
            f"fewer blocks, lower {key}.num_blocks"
        ) from None
    init_nonpersistent_buffers(encoder)
    still_meta = [n for n, t in [*encoder.named_parameters(), *encoder.named_buffers()] if t.is_meta]
    if still_meta:  # pragma: no cover - load_into's strict accounting makes this unreachable
        raise WeightsError(f"{key}.weights: {path}: no value loaded for {', '.join(still_meta)}")
    logger.info("%s: loaded %d tensors from %s (%d skipped: blocks >= num_blocks=%d)", key,
                len(report.loaded), path, len(report.skipped), num_blocks)
