"""The ``qformer`` and ``qformer_tiny`` components: options, declared widths, and the builder.

``qformer`` is BLIP-2's Q-Former at bert-base size (768 wide, 12 layers, 32 queries);
``qformer_tiny`` the same code at toy size (64 wide, 2 layers, 4 heads, FFN 128, 8 queries).
``vision_width`` is taken from the vision encoder when left out; an explicit value is declared as
``in_dim`` so ``mllmkit check`` rejects a mismatch before anything is built. With ``weights`` the
module is built on the meta device and a LAVIS checkpoint is streamed into it. ``dropout`` (0.1)
and ``init_std`` (0.02, random initialisation only) default to BLIP-2's bert-base numbers; a small
Q-Former trained from scratch wants a larger ``init_std`` (at 64 wide and std 0.02 its output
hardly depends on the image) and no dropout. The core's shared keys apply: ``trainable`` (default
false here) and ``precision`` (default fp32; ``ln_vision`` computes in fp32 whatever it is).
"""

from __future__ import annotations

import pathlib

import attrs

from mllmkit.config import between, config, positive
from mllmkit.errors import RecipeError
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.registry import ComponentSpec
from mllmkit_bridge_qformer.lavis_weights import load_lavis_qformer
from mllmkit_bridge_qformer.model import (
    DROPOUT,
    INIT_STD,
    QFORMER_BASE,
    QFORMER_TINY,
    QFormerBridge,
    QFormerShape,
    build_qformer,
)

__all__ = ["SPECS", "QFormerConfig", "QFormerTinyConfig"]


@config
class QFormerConfig:
    num_query_tokens: int = attrs.field(default=32, validator=positive)
    cross_attention_freq: int = attrs.field(default=2, validator=positive)
    """Cross-attention to the image tokens in layers 0, f, 2f, …"""
    num_layers: int = attrs.field(default=12, validator=positive)
    vision_width: int | None = attrs.field(default=None, validator=positive)
    """Width of the vision tokens; unset = the vision encoder's output width."""
    weights: pathlib.Path | None = None
    """A LAVIS BLIP-2 checkpoint ({"model": state_dict}), e.g. blip2_pretrained_flant5xxl.pth."""
    dropout: float = attrs.field(default=DROPOUT, validator=between(0.0, 1.0))
    """Hidden and attention-probability dropout in training (bert-base's 0.1, as BLIP-2 trains)."""
    init_std: float = attrs.field(default=INIT_STD, validator=positive)
    """Std of the random initialisation when there are no ``weights`` (BERT's initializer_range)."""


@config
class QFormerTinyConfig:
    num_query_tokens: int = attrs.field(default=8, validator=positive)
    cross_attention_freq: int = attrs.field(default=2, validator=positive)
    num_layers: int = attrs.field(default=2, validator=positive)
    vision_width: int | None = attrs.field(default=None, validator=positive)
    weights: pathlib.Path | None = None
    dropout: float = attrs.field(default=DROPOUT, validator=between(0.0, 1.0))
    init_std: float = attrs.field(default=INIT_STD, validator=positive)


AnyQFormerConfig = QFormerConfig | QFormerTinyConfig


def _dims(shape: QFormerShape):
    def dims(cfg: AnyQFormerConfig, ctx: BuildContext) -> PartDims:
        _check_width(cfg, ctx)
        return PartDims(in_dim=cfg.vision_width, out_dim=shape.hidden, out_tokens=cfg.num_query_tokens)
    return dims


def _check_width(cfg: AnyQFormerConfig, ctx: BuildContext) -> None:
    """An explicit ``vision_width`` must equal the previous part's width (when known)."""
    if cfg.vision_width is not None and ctx.in_dim is not None and cfg.vision_width != ctx.in_dim:
        raise RecipeError(f"{ctx.key}.vision_width",
                          f"expected {ctx.in_dim} (the output width of the part before this bridge), found "
                          f"{cfg.vision_width}; set vision_width = {ctx.in_dim} or leave it out to infer it")


def _vision_width(cfg: AnyQFormerConfig, ctx: BuildContext) -> int:
    _check_width(cfg, ctx)
    if cfg.vision_width is None and ctx.in_dim is None:
        raise RecipeError(f"{ctx.key}.vision_width", "cannot be inferred (no vision encoder width was given to "
                                                     "this bridge); set vision_width")
    return cfg.vision_width or ctx.in_dim


def _builder(shape: QFormerShape):
    def build(cfg: AnyQFormerConfig, ctx: BuildContext) -> QFormerBridge:
        module = build_qformer(
            vision_width=_vision_width(cfg, ctx), hidden=shape.hidden, num_layers=cfg.num_layers,
            num_heads=shape.num_heads, ffn=shape.ffn, num_query_tokens=cfg.num_query_tokens,
            cross_attention_freq=cfg.cross_attention_freq, layer_norm_eps=shape.layer_norm_eps,
            dropout=cfg.dropout, init_std=cfg.init_std,
            device="meta" if cfg.weights is not None else None,
        )
        if cfg.weights is not None:
            load_lavis_qformer(module, cfg.weights)
        return module
    return build


SPECS = [
    ComponentSpec("qformer", QFormerConfig, _builder(QFORMER_BASE),
                  "BLIP-2 Q-Former (bert-base, 32 queries) with ln_vision; loads LAVIS checkpoints",
                  dims=_dims(QFORMER_BASE), defaults={"trainable": False}),
    ComponentSpec("qformer_tiny", QFormerTinyConfig, _builder(QFORMER_TINY),
                  "toy-size BLIP-2 Q-Former (64 wide, 2 layers, 8 queries) for tests and the CPU demo",
                  dims=_dims(QFORMER_TINY), defaults={"trainable": False}),
]
