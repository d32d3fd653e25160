"""A generic wrapper that makes any Llama-layout transformers causal LM an mllmkit :class:`LLM`.

LLM plugins (Qwen, Baichuan, …) convert their checkpoints into a native transformers model whose
``model`` has ``embed_tokens``, ``layers``, ``norm`` and ``rotary_emb`` and which has an ``lm_head``
(Qwen2, Llama, Mistral all do), then wrap it here with their tokenizer and chat template. This file
holds no family-specific code.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from mllmkit.interfaces import Tokenizer
from mllmkit.template import ChatTemplate

__all__ = ["HFCausalLM", "cache_keyword", "new_hf_model", "finish_meta_load"]


def cache_keyword(function) -> str:
    """The name a transformers function gives its KV-cache argument: ``cache`` in 5.2x releases,
    ``past_key_values`` before (still accepted by 5.2x, with a FutureWarning on every call)."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


def _checkpointed_forward(forward, *args, **kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


class HFCausalLM(nn.Module):
    """An mllmkit LLM around a transformers ``*ForCausalLM`` with the Llama module layout."""

    def __init__(self, hf_model: nn.Module, tokenizer: Tokenizer, template: ChatTemplate,
                 max_positions: int | None = None) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.tokenizer = tokenizer
        self.template = template
        self.hidden_size: int = hf_model.config.hidden_size
        self.max_positions = max_positions

    # -- the pieces the MLLM and pipeline backends use --
    @property
    def embedding(self) -> nn.Embedding:
        return self.hf_model.get_input_embeddings()

    def layers(self) -> Sequence[nn.Module]:
        return self.hf_model.model.layers

    @property
    def norm(self) -> nn.Module:
        return self.hf_model.model.norm

    @property
    def head(self) -> nn.Module:
        return self.hf_model.lm_head

    @property
    def rotary(self) -> nn.Module:
        return self.hf_model.model.rotary_emb

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(input_ids)

    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        self._check_length(inputs_embeds.shape[1])
        out = self.hf_model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations.

        transformers' own switch only acts on modules in training mode, and a frozen LLM stays in eval
        mode (``MLLM.train``) although gradients still flow through it to the bridge; so the layers'
        ``forward`` is wrapped here, checkpointing whenever autograd records.
        """
        for layer in self.layers():
            if enabled:
                layer.forward = functools.partial(_checkpointed_forward, type(layer).forward.__get__(layer))
            else:
                layer.__dict__.pop("forward", None)

    def _check_length(self, length: int) -> None:
        if self.max_positions is not None and length > self.max_positions:
            raise ValueError(
                f"sequence of {length} tokens is longer than this model's {self.max_positions} positions; "
                f"shorten the input (max_text_len, chat history window)"
            )


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def new_hf_model(model_cls: type, hf_config, dtype: torch.dtype, device: str | torch.device = "cpu") -> nn.Module:
    """``model_cls(hf_config)`` with parameters in ``dtype`` on ``device`` (``"meta"``: no memory, load later)."""
    with _default_dtype(dtype), torch.device(device):
        return model_cls(hf_config)


def finish_meta_load(model: nn.Module, source: str) -> None:
    """After streaming weights into a meta-built Llama-layout model: rebuild the rotary embedding
    (its ``inv_freq`` is a non-persistent buffer no checkpoint holds) and refuse anything still on meta."""
    from mllmkit.weights import WeightsError

    rotary = model.model.rotary_emb
    model.model.rotary_emb = type(rotary)(config=model.config)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise WeightsError(f"{source}: tensors never loaded: {', '.join(still_meta[:10])}")
