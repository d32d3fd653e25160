"""Attention over packed rows with flash-attention's variable-length kernel: no mask, no cross-sample reads.

A packed row holds several samples, its position ids restarting at 0 for each (:mod:`mllmkit.data.packing`).
Given such a row, transformers builds a ``[T, T]`` per-sample mask for SDPA, which then cannot take
its flash kernel: the packed step measured slower than padding on one H200. Here each sample's
boundaries (:func:`sample_boundaries`, ``cu_seq_lens`` as flash-attention names them) go to the
decoder layers instead, and the attention of every layer runs ``torch.nn.attention.varlen.varlen_attn``
(torch's own flash varlen kernel, CUDA, with backward): each sample attends causally within itself.

:func:`packed_attention_name` registers (once) a variant of an attention implementation that takes
that path when the layer receives ``cu_seq_lens_q`` and otherwise calls the implementation it wraps,
so padded batches, evaluation and generation are untouched. The variant is installed on the model the
first time it sees a packed row (:meth:`mllmkit.hf_llm.HFCausalLM.hidden`) and kept: a layer recomputed
in backward takes the same path as its forward. Off CUDA (or on a torch without the kernel) the same
boundaries drive SDPA once per sample: exact, for the CPU tests and small runs.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["packed_attention_name", "sample_boundaries", "varlen_attention", "wraps_packable"]

_PREFIX = "mllmkit_packed_"


def sample_boundaries(position_ids: torch.Tensor) -> dict[str, Any]:
    """The samples of packed rows ``[B, T]`` (positions restarting at 0 at each sample and at the padding
    tail) as flash-attention's keyword arguments over the ``B·T`` flattened tokens: ``cu_seq_lens_q/k``
    (int32 offsets, first 0, last B·T) and ``max_length_q/k`` (a host int: one device sync)."""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    longest = int((cu[1:] - cu[:-1]).max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def _kernel() -> Callable | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _causal_window() -> dict[str, Any]:
    """The kernel's causal switch: ``window_size=(-1, 0)`` from torch 2.11, ``is_causal`` in 2.10."""
    parameters = inspect.signature(_kernel()).parameters
    return {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}


def varlen_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, cu_seq_lens: torch.Tensor,
                     max_length: int, scaling: float | None) -> torch.Tensor:
    """Causal attention within each sample: ``query [B, H, T, D]``, ``key``/``value [B, H_kv, T, D]``,
    samples delimited by ``cu_seq_lens`` over the B·T flattened tokens; returns ``[B, T, H, D]`` (what
    transformers' attention functions return)."""
    batch, heads, length, dim = query.shape
    if key.shape[1] != heads:  # grouped-query attention: each key/value head serves heads / H_kv queries
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    q, k, v = (t.transpose(1, 2).reshape(batch * length, heads, dim) for t in (query, key, value))
    kernel = _kernel() if q.is_cuda else None
    if kernel is not None:
        out = kernel(q, k, v, cu_seq_lens, cu_seq_lens, max_length, max_length, scale=scaling, **_causal_window())
    else:
        bounds = cu_seq_lens.tolist()
        out = torch.cat([F.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v)), is_causal=True, scale=scaling).transpose(0, 1)
            for a, b in zip(bounds[:-1], bounds[1:])])
    return out.reshape(batch, length, heads, dim)


def _packed(inner: Callable) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                  **kwargs):
        cu_seq_lens = kwargs.get("cu_seq_lens_q")
        if cu_seq_lens is None:
            return inner(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        if dropout:
            raise ValueError(f"packed rows: attention dropout ({dropout}) is not supported; set it to 0 in the "
                             f"model config or data.packing = false")
        return varlen_attention(query, key, value, cu_seq_lens, kwargs["max_length_q"], scaling), None

    return attention


def wraps_packable(name: str) -> bool:
    """Whether attention implementation ``name`` is SDPA (or an SDPA variant, e.g. ``qwen_v1_logn_sdpa``),
    whose packed rows this module's kernel takes over; eager, FlexAttention and flash keep transformers' path."""
    return name.startswith(_PREFIX) or name == "sdpa" or name.endswith("_sdpa")


def packed_attention_name(base: str) -> str:
    """Register (once) the packed variant of attention implementation ``base``; its name for the config."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if base.startswith(_PREFIX):
        return base
    name = _PREFIX + base
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _packed(ALL_ATTENTION_FUNCTIONS[base]))
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    return name
