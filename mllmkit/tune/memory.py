"""Will a full fine-tune fit? An estimate made before any weight is read, refused with its figures.

The parameter counts come from the headers of the ``.safetensors`` files the recipe's model parts name
(an LLM's checkpoint folder, weight files): the header lists every tensor's shape, so nothing is loaded.
Per process, a part with ``tune = "full"`` costs its weights, their gradients and AdamW's two moments —
fp32 masters (4 + 4 + 8 bytes a parameter) under a sharding backend or ``precision = "fp32"``, else the
part's precision — each divided as the backend splits it (:meth:`BackendBase.state_shards`); frozen parts
cost their weights. Activations are not counted, so a run that passes may still need activation
checkpointing. Parts without weight files (tiny presets, random init) count as nothing.
"""

from __future__ import annotations

import json
import pathlib
import struct
from collections.abc import Iterable

import attrs
import torch

from mllmkit.errors import UserError

__all__ = ["MemoryEstimate", "check_fits", "estimate", "safetensors_params"]

_GIB = 2 ** 30


def safetensors_params(path: pathlib.Path) -> int:
    """Parameters in one ``.safetensors`` file or every one in a folder, read from the headers only."""
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] if path.suffix == ".safetensors" else []
    total = 0
    for file in files:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, entry in header.items():
            if name != "__metadata__":
                count = 1
                for dim in entry["shape"]:
                    count *= int(dim)
                total += count
    return total


def _component_params(component) -> int:
    return sum(safetensors_params(value) for field in attrs.fields(type(component.config))
               if isinstance(value := getattr(component.config, field.name), pathlib.Path) and value.exists())


@attrs.frozen
class MemoryEstimate:
    """Bytes per process of a run's trainable weights, gradients, optimizer state and frozen weights."""

    trainable_params: int
    weights: float
    gradients: float
    optimizer: float
    frozen: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.frozen


def estimate(parts: Iterable, shards: tuple[int, int, int], sharded: bool) -> MemoryEstimate:
    """The estimate for resolved model components (``recipe.vision``, bridges, ``recipe.llm``)."""
    trainable = weights = gradients = optimizer = frozen = 0.0
    for component in parts:
        count = _component_params(component)
        width = 2 if component.shared.precision in ("bf16", "fp16") else 4
        if component.shared.policy == "full":
            master = 4 if sharded else width
            trainable += count
            weights += count * master / shards[0]
            gradients += count * master / shards[1]
            optimizer += count * 2 * master / shards[2]
        else:
            frozen += count * width
    return MemoryEstimate(int(trainable), weights, gradients, optimizer, frozen)


def _free_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.mem_get_info(device)[0])
    import os

    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def check_fits(recipe, backend) -> MemoryEstimate | None:
    """Refuse (a :class:`UserError` naming the key and the figures) a full fine-tune whose weights, gradients
    and AdamW state cannot fit in the free memory of this process's device."""
    parts = [recipe.vision, *recipe.bridges, recipe.llm]
    full = [c for c in parts if c.shared.policy == "full"]
    if not full:
        return None
    shards = backend.state_shards()
    found = estimate(parts, shards, sharded=shards != (1, 1, 1))
    free = _free_bytes(backend.device)
    if found.trainable_params == 0 or found.total <= free:
        return found
    split = f", split {shards[2]} ways by {backend.name}" if shards != (1, 1, 1) else ""
    raise UserError(
        f'{full[-1].key}.tune = "full": the fine-tune needs about {found.total / _GIB:.1f} GiB per process before '
        f"activations — weights {found.weights / _GIB:.1f} GiB + gradients {found.gradients / _GIB:.1f} GiB + AdamW "
        f"state {found.optimizer / _GIB:.1f} GiB for {found.trainable_params / 1e9:.2f}B trainable parameters{split}, "
        f"frozen weights {found.frozen / _GIB:.1f} GiB — but {backend.device} has {free / _GIB:.1f} GiB free; shard it "
        f'over more devices (parallel.type = "fsdp", or "zero" with stage = 3), or set tune = "lora"')
