"""Hook implementations of the example plugin: registers the ``avg_pool`` bridge."""

from __future__ import annotations

import attrs
import torch
from torch import nn

import mllmkit
from mllmkit.config import config, positive
from mllmkit.interfaces import PartDims


@config
class AvgPoolConfig:
    tokens: int = attrs.field(default=2, validator=positive)


class AvgPool(nn.Module):
    """``[B, N, D] → [B, tokens, D]`` by adaptive average pooling over tokens."""

    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.in_dim = self.out_dim = dim
        self.tokens = tokens

    def tokens_out(self, tokens_in: int) -> int:
        return self.tokens

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool1d(feats.transpose(1, 2), self.tokens).transpose(1, 2)


@mllmkit.hookimpl
def mllmkit_register_bridges():
    return [mllmkit.ComponentSpec(
        "avg_pool", AvgPoolConfig, lambda cfg, ctx: AvgPool(ctx.in_dim, cfg.tokens),
        "average-pools vision tokens", dims=lambda cfg, ctx: PartDims(out_dim=ctx.in_dim, out_tokens=cfg.tokens),
        defaults={"trainable": False})]
