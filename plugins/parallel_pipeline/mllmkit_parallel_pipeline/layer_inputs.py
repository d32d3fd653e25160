"""What every decoder layer of a stage needs besides the hidden states, computed once per micro-batch.

Between pipeline stages only ``(hidden, attention_mask)`` travel, so each stage rebuilds the causal
mask, the positions and the rotary embedding itself. Building them in every layer is costly: the
transformers mask functions check the padding mask on the host (a device sync), so a per-layer
rebuild drains the GPU queue once a layer — forward and checkpoint recompute alike — and leaves
the stage waiting on Python. :class:`LayerInputsCache` builds them for the first layer that sees a
given attention-mask tensor and hands the same tensors to the stage's other layers (the mask tensor
travels unchanged from layer to layer, so its identity names the micro-batch).
"""

from __future__ import annotations

import inspect
import weakref
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from mllmkit.hf_llm import cache_keyword

__all__ = ["LayerInputsCache"]


def _no_cache_arguments(make_mask, hidden: torch.Tensor) -> dict:
    """The "no KV cache" arguments of a transformers mask function: 5.x before 5.2x names the cache
    ``past_key_values`` and may ask for ``cache_position``; later releases name it ``cache``."""
    parameters = inspect.signature(make_mask).parameters
    arguments: dict[str, Any] = {cache_keyword(make_mask): None}
    if "cache_position" in parameters:
        arguments["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return arguments


class LayerInputsCache:
    """``(mask, position_ids, rotary)`` per (attention mask, attention kind), kept for the last
    ``size`` micro-batches (a 1F1B stage has at most ``num_stages`` of them in flight)."""

    def __init__(self, config: Any, rotary: nn.Module, size: int = 16) -> None:
        self.config, self.rotary, self.size = config, rotary, size
        self._entries: OrderedDict[tuple, tuple[weakref.ref, tuple]] = OrderedDict()

    def get(self, kind: str, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        key = (id(attention_mask), kind, hidden.shape, hidden.dtype)
        entry = self._entries.get(key)
        if entry is not None and entry[0]() is attention_mask:
            return entry[1]
        value = self._build(kind, hidden, attention_mask)
        self._entries[key] = (weakref.ref(attention_mask), value)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return value

    def _build(self, kind: str, hidden: torch.Tensor, attention_mask: torch.Tensor) -> tuple:
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        position_ids = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)
        make_mask = create_sliding_window_causal_mask if kind == "sliding_attention" else create_causal_mask
        mask = make_mask(config=self.config, inputs_embeds=hidden, attention_mask=attention_mask,
                         position_ids=position_ids, **_no_cache_arguments(make_mask, hidden))
        with torch.no_grad():
            rotary = self.rotary(hidden, position_ids)
        return mask, position_ids, rotary
