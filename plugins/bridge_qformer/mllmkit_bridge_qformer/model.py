"""The Q-Former bridge module: ``ln_vision`` then BLIP-2's Q-Former query path, and its builder.

``build_qformer`` is the one builder; :data:`QFORMER_BASE` (bert-base-uncased's numbers, fixed here
so nothing is downloaded) and :data:`QFORMER_TINY` (tests, CPU demo) are shapes the presets pass it.
The Q-Former itself is transformers' ``Blip2QFormerModel`` without its text branch
(``use_qformer_text_input=False``): query embeddings → embeddings LayerNorm + dropout → per layer
self-attention, cross-attention to the image tokens on layers ``0, f, 2f, …`` and the query FFN
(``intermediate_query``/``output_query``), post-LayerNorm residuals as in BERT — the same math as
LAVIS's ``Qformer.py`` with ``query_embeds`` only.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn
from torch.nn import functional as F
from transformers import Blip2QFormerConfig, Blip2QFormerModel

__all__ = ["QFORMER_BASE", "QFORMER_TINY", "FP32LayerNorm", "QFormerBridge", "QFormerShape", "build_qformer"]

INIT_STD = 0.02
"""BERT's ``initializer_range``: LAVIS initialises ``query_tokens`` and every weight with normal(0, 0.02)."""
DROPOUT = 0.1
"""bert-base's hidden and attention-probability dropout, which BLIP-2 trains with."""


@attrs.frozen
class QFormerShape:
    """The BERT-like numbers of a Q-Former that a recipe does not choose."""

    hidden: int
    num_heads: int
    ffn: int
    layer_norm_eps: float = 1e-12


QFORMER_BASE = QFormerShape(hidden=768, num_heads=12, ffn=3072)
"""bert-base-uncased (hidden 768, 12 heads, FFN 3072, LayerNorm eps 1e-12, GELU), as BLIP-2 uses it."""
QFORMER_TINY = QFormerShape(hidden=64, num_heads=4, ffn=128)
"""A toy Q-Former for tests and the CPU demo."""


class FP32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 and cast back to the input dtype (LAVIS ``blip2.LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class QFormerBridge(nn.Module):
    """Vision tokens ``[B, N, in_dim]`` → ``ln_vision`` → Q-Former queries ``[B, num_query_tokens, out_dim]``."""

    def __init__(self, qformer: Blip2QFormerModel, vision_width: int, num_query_tokens: int,
                 init_std: float = INIT_STD) -> None:
        super().__init__()
        hidden = qformer.config.hidden_size
        self.in_dim, self.out_dim, self.num_query_tokens = vision_width, hidden, num_query_tokens
        self.ln_vision = FP32LayerNorm(vision_width)
        self.query_tokens = nn.Parameter(torch.empty(1, num_query_tokens, hidden))
        if not self.query_tokens.is_meta:
            nn.init.normal_(self.query_tokens, std=init_std)
        self.qformer = qformer

    def tokens_out(self, tokens_in: int) -> int:
        return self.num_query_tokens

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if feats.dim() != 3 or feats.shape[-1] != self.in_dim:
            raise ValueError(f"qformer expects vision features [B, N, {self.in_dim}], got {list(feats.shape)}")
        image = self.ln_vision(feats).to(self.query_tokens.dtype)
        queries = self.query_tokens.expand(feats.shape[0], -1, -1)
        out = self.qformer(query_embeds=queries, encoder_hidden_states=image).last_hidden_state
        return out[:, : self.num_query_tokens]


def build_qformer(*, vision_width: int, hidden: int, num_layers: int, num_heads: int, ffn: int,
                  num_query_tokens: int, cross_attention_freq: int = 2, layer_norm_eps: float = 1e-12,
                  dropout: float = DROPOUT, init_std: float = INIT_STD,
                  device: torch.device | str | None = None) -> QFormerBridge:
    """A Q-Former bridge of the given size; ``device="meta"`` builds it without storage (to stream weights).

    ``init_std`` is the standard deviation of the random initialisation (weights and query tokens;
    LayerNorms one/zero, biases zero); ``dropout`` the hidden and attention-probability dropout.
    """
    config = Blip2QFormerConfig(
        hidden_size=hidden, num_hidden_layers=num_layers, num_attention_heads=num_heads,
        intermediate_size=ffn, hidden_act="gelu", layer_norm_eps=layer_norm_eps,
        cross_attention_frequency=cross_attention_freq, encoder_hidden_size=vision_width,
        use_qformer_text_input=False, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
        initializer_range=init_std,
    )
    with torch.device(device or "cpu"):
        return QFormerBridge(Blip2QFormerModel(config), vision_width, num_query_tokens, init_std)
