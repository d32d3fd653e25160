"""Qwen v1 past ``seq_length``: dynamic NTK-aware rotary scaling and log-n query scaling, on Qwen2 modules.

Qwen v1 (``modeling_qwen.py``, ``use_dynamic_ntk``/``use_logn_attn``) extends its context beyond the
trained ``seq_length`` S in two ways, both reproduced here on transformers' native ``Qwen2Model``
without forking it:

- **Dynamic NTK.** A forward without past keys picks ``alpha = max(2 ** ceil(log2(n / S) + 1) - 1, 1)``
  from the sequence length n and rotates with base ``rope_theta * alpha ** (d / (d - 2))`` (d the head
  dim); forwards over cached keys keep the alpha of that forward. :class:`NTKRotaryEmbedding` replaces
  ``model.rotary_emb``; it tells a forward without past keys from a cached one by its positions (a
  sequence starting at position 0), so :mod:`mllmkit.generation`'s prefill picks alpha and its
  decode steps — a CUDA graph replaying the same kernels — read it from a tensor the prefill wrote
  in place. Each row has its own alpha from its own length (left padding not counted), as the later
  v1 code does; for one unpadded prompt this is the first release's choice from ``kv_seq_len``.
  In training mode alpha is 1.
- **Log-n.** Outside training, the rotated query at position p (0-based) is multiplied by
  ``log(p + 1) / log(S)`` when ``p + 1 > S``. :func:`logn_attention_name` registers a transformers
  attention function that scales the query and calls the chosen implementation (sdpa, eager, flash);
  each attention layer holds the per-position table (:class:`LognScale`, float32 as v1 builds it).

:func:`install_long_context` puts both on a built model, as the config's
:class:`~mllmkit_llm_qwen.convert.LongContext` says.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding, eager_attention_forward

from mllmkit_llm_qwen.convert import LongContext

__all__ = ["LognScale", "NTKRotaryEmbedding", "install_long_context", "logn_attention_name",
           "ntk_alpha"]


def ntk_alpha(length: int, seq_length: int) -> int:
    """Qwen v1's NTK alpha for a sequence of ``length`` tokens (1 up to ``seq_length``)."""
    return max(2 ** math.ceil(math.log(length / seq_length, 2) + 1) - 1, 1)


class NTKRotaryEmbedding(Qwen2RotaryEmbedding):
    """``Qwen2RotaryEmbedding`` with Qwen v1's dynamic NTK base, one alpha per batch row."""

    def __init__(self, config, seq_length: int) -> None:
        super().__init__(config)
        self.seq_length = seq_length
        self.theta = float(config.rope_parameters["rope_theta"])
        self.dim = config.hidden_size // config.num_attention_heads
        # The inverse frequencies in use, one row per batch row, per batch size: written in place by a
        # forward without past keys, read by the cached forwards after it (and by captured CUDA graphs).
        self._rows: dict[int, torch.Tensor] = {}

    def inv_freq_for(self, alpha: int) -> torch.Tensor:
        """The inverse frequencies for ``alpha``, computed on the CPU in float32 as v1 does."""
        base = self.theta * alpha ** (self.dim / (self.dim - 2))
        return 1.0 / (base ** (torch.arange(0, self.dim, 2).float() / self.dim))

    def _table(self, rows: int, device: torch.device) -> torch.Tensor:
        table = self._rows.get(rows)
        if table is None or table.device != device:
            with torch.inference_mode(False):  # a normal tensor: written in place in and out of inference mode
                table = self.original_inv_freq.to(device, torch.float32).expand(rows, -1).clone()
            self._rows[rows] = table
        return table

    def row_inv_freq(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``[rows, dim / 2]``: each row's inverse frequencies for this forward (updated in place)."""
        rows, length = position_ids.shape
        table = self._table(rows, position_ids.device)
        fresh = self.original_inv_freq.to(table.device, torch.float32).expand(rows, -1)
        if self.training:
            table.copy_(fresh)
            return table
        if length > self.seq_length:  # some row may be longer than seq_length: its own alpha
            lengths = (position_ids.amax(dim=-1) + 1).tolist()
            fresh = torch.stack([self.inv_freq_for(ntk_alpha(n, self.seq_length)) for n in lengths]).to(table.device)
        no_past = (position_ids[:, 0] == 0).any()  # device-side: no host sync in a decode step
        table.copy_(torch.where(no_past, fresh, table))
        return table

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.row_inv_freq(position_ids)
        freqs = position_ids[..., None].float() * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class LognScale(nn.Module):
    """Qwen v1's log-n query scale per position, ``log(p + 1, seq_length)`` past ``seq_length`` else 1."""

    def __init__(self, seq_length: int, max_positions: int) -> None:
        super().__init__()
        self.seq_length = seq_length
        table = [math.log(i, seq_length) if i > seq_length else 1 for i in range(1, max_positions + 1)]
        self.register_buffer("scale", torch.tensor(table, dtype=torch.float32), persistent=False)

    def forward(self, query: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """``query [batch, heads, length, head_dim]`` scaled at each row's positions ``[rows, length]``."""
        scale = self.scale[position_ids.clamp(max=self.scale.shape[0] - 1)].to(query.dtype)
        return query * scale[:, None, :, None]


def _with_logn(inner: Callable) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        # keys no longer than seq_length: every query position is below it, its scale is 1
        if not module.training and key.shape[-2] > module.logn.seq_length:
            query = module.logn(query, kwargs["position_ids"])
        return inner(module, query, key, value, attention_mask, **kwargs)

    return attention


def logn_attention_name(base: str) -> str:
    """Register (once) the log-n variant of attention implementation ``base``; its name for the config."""
    name = f"qwen_v1_logn_{base}"
    if name not in ALL_ATTENTION_FUNCTIONS:
        inner = eager_attention_forward if base == "eager" else ALL_ATTENTION_FUNCTIONS[base]
        AttentionInterface.register(name, _with_logn(inner))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name


def install_long_context(model: nn.Module, settings: LongContext) -> None:
    """Give a built ``Qwen2ForCausalLM`` Qwen v1's dynamic NTK and/or log-n scaling, as ``settings`` say."""
    if settings.dynamic_ntk:
        device = model.model.rotary_emb.inv_freq.device
        model.model.rotary_emb = NTKRotaryEmbedding(model.config, settings.seq_length).to(device)
    if settings.logn:
        for layer in model.model.layers:
            attn = layer.self_attn
            attn.logn = LognScale(settings.seq_length, settings.max_positions).to(attn.q_proj.weight.device)
        model.config._attn_implementation = logn_attention_name(model.config._attn_implementation)
