"""Fewer, larger matmuls for decoding: q/k/v and gate/up projections fused into one weight each.

A decoding step is bound by reading weights, and each projection is its own small GEMV launch.
:func:`fuse_projections` concatenates, per decoder layer, the ``q_proj``/``k_proj``/``v_proj``
weights (and biases) into one ``[q + k + v, hidden]`` tensor and ``gate_proj``/``up_proj`` into one
``[2 × intermediate, hidden]`` tensor, and makes the original weights views into it (no second
copy; the state-dict names and values stay the same, so loading weights afterwards still works).
The first projection of a group computes the whole fused product and hands the others their slices
when they are called with the same input, which is how transformers' attention and MLP call them
(q, k, v in order; gate, then up), so the modelling code runs unchanged. Called with another input, a
projection computes its own slice: results never depend on the fusion. Only frozen layers whose
projections are plain ``nn.Linear`` are fused (an optimizer holds the parameters of a trainable one).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FusedGroup", "FusedSlice", "fuse_projections"]

_GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj"), "mlp": ("gate_proj", "up_proj")}


class FusedGroup:
    """The fused weight and bias of a group of projections, and the last fused product."""

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.weight = torch.cat([m.weight.detach() for m in linears])
        biases = [m.bias for m in linears]
        self.bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        self.sizes = [m.out_features for m in linears]
        self._input: torch.Tensor | None = None
        self._parts: tuple[torch.Tensor, ...] = ()

    def run(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._input, self._parts = x, F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)
        return self._parts

    def take(self, x: torch.Tensor, index: int) -> torch.Tensor | None:
        """Slice ``index`` of the product of ``x`` if it was just computed (else None); released once the last is taken."""
        if self._input is not x:
            return None
        part = self._parts[index]
        if index == len(self.sizes) - 1:
            self._input, self._parts = None, ()
        return part


class FusedSlice(nn.Module):
    """One projection of a :class:`FusedGroup`: ``weight``/``bias`` are views into the fused tensors."""

    def __init__(self, group: FusedGroup, index: int) -> None:
        super().__init__()
        self.group, self.index = group, index
        start = sum(group.sizes[:index])
        stop = start + group.sizes[index]
        self.in_features, self.out_features = group.weight.shape[1], group.sizes[index]
        self.weight = nn.Parameter(group.weight[start:stop], requires_grad=False)
        self.bias = None if group.bias is None else nn.Parameter(group.bias[start:stop], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.index == 0:
            return self.group.run(x)[0]
        part = self.group.take(x, self.index)
        return part if part is not None else F.linear(x, self.weight, self.bias)


def fuse_projections(model: nn.Module) -> int:
    """Fuse the q/k/v and gate/up projections of every frozen decoder layer of a Llama-layout
    transformers model (``model.model.layers``) in place; returns how many groups were fused."""
    fused = 0
    for layer in getattr(getattr(model, "model", model), "layers", []):
        for block_name, names in _GROUPS.items():
            block = getattr(layer, block_name, None)
            linears = [getattr(block, n, None) for n in names]
            if block is None or not all(type(m) is nn.Linear for m in linears):
                continue  # already fused, LoRA-wrapped, or another layout
            if any(p.requires_grad for m in linears for p in m.parameters()):
                continue
            group = FusedGroup(linears)
            for i, name in enumerate(names):
                setattr(block, name, FusedSlice(group, i))
            fused += 1
    return fused
