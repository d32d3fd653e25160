"""Write a random checkpoint in LAVIS ``eva_vit_g.pth`` format (bare state dict, LAVIS key names).

For benchmarks and load-time measurements without the real 2 GB download; tests use it at toy size.
Values are small random numbers (LayerNorm weights near 1), so a forward pass stays finite in fp16.
"""

from __future__ import annotations

import os
import pathlib

import torch

from mllmkit_vision_eva.encoder import EVA_VIT_G, EvaArch
from mllmkit_vision_eva.loading import BLOCK_KEYS

__all__ = ["random_eva_state_dict", "write_random_checkpoint"]


def random_eva_state_dict(arch: EvaArch = EVA_VIT_G, *, blocks: int | None = None, grid: int | None = None,
                          dtype: torch.dtype = torch.float16, seed: int = 0,
                          device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """All keys of ``eva_vit_g.pth`` for ``blocks`` blocks (default: the released ``arch.depth``).

    Random numbers are drawn on ``device`` (a GPU is much faster at full size); tensors end on the CPU.
    """
    blocks = arch.depth if blocks is None else blocks
    grid = arch.image_size // arch.patch_size if grid is None else grid
    w, m, p = arch.width, arch.mlp_dim, arch.patch_size
    gen = torch.Generator(device=device).manual_seed(seed)

    def rand(*shape: int, std: float = 0.02, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(shape, generator=gen, device=device) * std + mean).to(dtype).cpu()

    state = {"cls_token": rand(1, 1, w), "pos_embed": rand(1, grid * grid + 1, w),
             "patch_embed.proj.weight": rand(w, 3, p, p), "patch_embed.proj.bias": rand(w)}
    shapes = {"norm1.weight": (w,), "norm1.bias": (w,), "attn.q_bias": (w,), "attn.v_bias": (w,),
              "attn.qkv.weight": (3 * w, w), "attn.proj.weight": (w, w), "attn.proj.bias": (w,),
              "norm2.weight": (w,), "norm2.bias": (w,), "mlp.fc1.weight": (m, w), "mlp.fc1.bias": (m,),
              "mlp.fc2.weight": (w, m), "mlp.fc2.bias": (w,)}
    assert tuple(shapes) == BLOCK_KEYS
    for i in range(blocks):
        for name, shape in shapes.items():
            mean = 1.0 if name.startswith("norm") and name.endswith("weight") else 0.0
            state[f"blocks.{i}.{name}"] = rand(*shape, mean=mean)
    return state


def write_random_checkpoint(path: str | pathlib.Path, arch: EvaArch = EVA_VIT_G, **kwargs) -> pathlib.Path:
    """Write :func:`random_eva_state_dict` to ``path`` with ``torch.save`` (atomically: temp + rename)."""
    path = pathlib.Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(random_eva_state_dict(arch, **kwargs), tmp)
    os.replace(tmp, path)
    return path
