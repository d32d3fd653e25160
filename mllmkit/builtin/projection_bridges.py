"""The built-in bridges: ``linear`` (MiniGPT4Qwen's ``llm_proj``) and ``mlp`` (LLaVA-1.5's projector).

Widths are inferred: ``in_dim`` from the previous part, ``out_dim`` from the LLM's hidden size;
explicit values are checked at assembly. ``trainable`` (default true) and ``precision`` (default
fp32) are the core's shared keys. Both can start from released weights: ``weights`` names a
file (a LAVIS ``checkpoint_N.pth`` with ``model``, a bare ``model.pth``, DeepSpeed
``mp_rank_00_model_states.pt`` with ``module``, or a safetensors export) and ``prefix`` the key prefix
of this bridge inside it (``llm_proj.`` for MiniGPT4Qwen).
"""

from __future__ import annotations

import pathlib
from typing import Literal

import attrs
import torch
from torch import nn

from mllmkit.config import config, positive
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.registry import ComponentSpec
from mllmkit.weights import KeyMap, WeightsError, load_into

__all__ = ["LinearBridgeConfig", "MLPBridgeConfig", "LinearBridge", "MLPBridge", "SPECS"]


@config
class LinearBridgeConfig:
    in_dim: int | None = attrs.field(default=None, validator=positive)
    out_dim: int | None = attrs.field(default=None, validator=positive)
    bias: bool = True
    weights: pathlib.Path | None = None
    prefix: str = "llm_proj."
    """Key prefix of this bridge's tensors inside ``weights``."""


@config
class MLPBridgeConfig:
    in_dim: int | None = attrs.field(default=None, validator=positive)
    out_dim: int | None = attrs.field(default=None, validator=positive)
    depth: int = attrs.field(default=2, validator=positive)
    activation: Literal["gelu", "silu", "relu"] = "gelu"
    weights: pathlib.Path | None = None
    prefix: str = "mm_projector."


class LinearBridge(nn.Module):
    """One linear map of every token: ``[B, N, in_dim] → [B, N, out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.proj = nn.Linear(in_dim, out_dim, bias=bias)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.proj(feats.to(self.proj.weight.dtype))


class MLPBridge(nn.Module):
    """LLaVA-1.5 projector: Linear, then (activation, Linear) × (depth - 1)."""

    def __init__(self, in_dim: int, out_dim: int, depth: int = 2, activation: str = "gelu") -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        act = {"gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU}[activation]
        layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
        for _ in range(depth - 1):
            layers += [act(), nn.Linear(out_dim, out_dim)]
        self.net = nn.Sequential(*layers)

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.to(self.net[0].weight.dtype))


def _dims(cfg: LinearBridgeConfig | MLPBridgeConfig, ctx: BuildContext) -> PartDims:
    if ctx.in_dim is None and cfg.in_dim is None:
        raise WeightsError(f"{ctx.key}: in_dim cannot be inferred (no previous part); set in_dim")
    out_dim = cfg.out_dim or ctx.llm_hidden
    if out_dim is None:
        raise WeightsError(f"{ctx.key}: out_dim cannot be inferred; set out_dim")
    return PartDims(in_dim=cfg.in_dim, out_dim=out_dim, out_tokens=ctx.in_tokens)


def load_bridge_weights(module: nn.Module, path: pathlib.Path, prefix: str, inner_prefix: str, key: str) -> None:
    """Load this bridge's tensors from a release checkpoint: ``{prefix}*`` → ``{inner_prefix}*``."""
    from mllmkit.checkpoint_formats import read_trainable_weights

    tensors = read_trainable_weights(path)
    chosen = [(k, v) for k, v in tensors.items() if k.startswith(prefix)]
    if not chosen:
        sample = ", ".join(sorted(tensors)[:8])
        raise WeightsError(f"{key}.weights: {path} has no keys starting with {prefix!r} (found: {sample}); "
                           f"set {key}.prefix")
    key_map = KeyMap(rules=[(rf"{prefix.replace('.', '[.]')}(.*)", rf"{inner_prefix}\1")])
    load_into(module, [chosen], key_map, source=str(path))


def _build_linear(cfg: LinearBridgeConfig, ctx: BuildContext) -> LinearBridge:
    dims = _dims(cfg, ctx)
    bridge = LinearBridge(cfg.in_dim or ctx.in_dim, dims.out_dim, bias=cfg.bias)
    if cfg.weights is not None:
        load_bridge_weights(bridge, cfg.weights, cfg.prefix, "proj.", ctx.key)
    return bridge


def _build_mlp(cfg: MLPBridgeConfig, ctx: BuildContext) -> MLPBridge:
    dims = _dims(cfg, ctx)
    bridge = MLPBridge(cfg.in_dim or ctx.in_dim, dims.out_dim, depth=cfg.depth, activation=cfg.activation)
    if cfg.weights is not None:
        load_bridge_weights(bridge, cfg.weights, cfg.prefix, "net.", ctx.key)
    return bridge


SPECS = [
    ComponentSpec("linear", LinearBridgeConfig, _build_linear,
                  "one Linear layer per token (MiniGPT4Qwen's llm_proj)", dims=_dims),
    ComponentSpec("mlp", MLPBridgeConfig, _build_mlp, "LLaVA-1.5's GELU MLP projector", dims=_dims),
]
