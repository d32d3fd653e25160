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

from mllmkit.errors import UserError
from mllmkit.interfaces import Tokenizer
from mllmkit.packed_attention import packed_attention_name, sample_boundaries, wraps_packable
from mllmkit.template import ChatTemplate

__all__ = ["HFCausalLM", "PackingUnsupported", "cache_keyword", "new_hf_model", "finish_meta_load"]


def cache_keyword(function) -> str:
    """The name a transformers function gives its KV-cache argument: ``cache`` in 5.2x releases,
    ``past_key_values`` before (still accepted by 5.2x, with a FutureWarning on every call)."""
    return "cache" if "cache" in inspect.signature(function).parameters else "past_key_values"


_CACHE_KWARGS = ("cache", "past_key_values", "layer_past")


class PackingUnsupported(UserError):
    """Packed rows were given to a model whose attention kernel transformers builds no per-sample mask for."""


def _checkpointed_forward(forward, *args, **kwargs):
    """One decoder layer, recomputed in backward when autograd records. The KV cache is dropped then,
    as transformers' own checkpointing does: the recompute would append each layer's keys a second
    time (a model called with its cache on, ``hf_model(inputs_embeds, attention_mask, labels)``,
    failed in backward with 2T keys against a T-wide mask)."""
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    kwargs.update({name: None for name in (*_CACHE_KWARGS, "use_cache") if name in kwargs})
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
        self.checkpointing = False
        """Whether :meth:`gradient_checkpointing` is on (the pipeline's cost model counts the recompute)."""

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
        """Final hidden states of a training or scoring forward (no KV cache).

        Without ``attention_mask`` and ``position_ids`` every row attends causally from its first
        token: exact for right-padded rows (each pad follows every real token, so no real token sees
        one). Where the attention kernel reads a missing mask as causal, the decoder layers then run
        with no mask at all: SDPA takes its flash kernel (``is_causal``), and transformers' mask
        building, which reads GPU values on the host, is skipped. Left-padded rows need their mask,
        packed rows their ``position_ids``; both take transformers' own path (packed rows: positions
        restarting at 0 and no mask, from which transformers builds a per-sample document mask or
        takes flash-attention's varlen kernel; :meth:`_check_packing`), except under SDPA, where the
        samples' boundaries go to the layers and each attends within its sample through the varlen
        kernel (:mod:`mllmkit.packed_attention`), with no mask built.
        """
        self._check_length(inputs_embeds.shape[1])
        if attention_mask is None and position_ids is not None:
            self._check_packing()
            if self._causal_without_mask() and wraps_packable(self.hf_model.config._attn_implementation):
                config = self.hf_model.config
                config._attn_implementation = packed_attention_name(config._attn_implementation)
                return self._layers_hidden(inputs_embeds, position_ids, **sample_boundaries(position_ids))
        if attention_mask is None and position_ids is None and self._causal_without_mask():
            positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0)
            return self._layers_hidden(inputs_embeds, positions)
        out = self.hf_model.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, use_cache=False)
        return out.last_hidden_state

    def _causal_without_mask(self) -> bool:
        """Whether a decoder layer given no mask attends causally: SDPA (``is_causal``; also its variants,
        e.g. Qwen v1's log-n) and flash kernels do, eager attention does not; sliding-window layers need
        their mask."""
        config = self.hf_model.config
        kernel = config._attn_implementation or ""
        layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
        return ((wraps_packable(kernel) or kernel.startswith("flash_attention"))
                and layer_types == {"full_attention"})

    def _check_packing(self) -> None:
        """Refuse an attention kernel that transformers does not mask per packed sample (the rows would
        attend across samples): those without a mask builder in ``ALL_MASK_ATTENTION_FUNCTIONS``."""
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        kernel = self.hf_model.config._attn_implementation or "eager"
        if kernel not in ALL_MASK_ATTENTION_FUNCTIONS:
            known = ", ".join(sorted(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping))
            raise PackingUnsupported(f"data.packing: the LLM's attention kernel {kernel!r} has no per-sample mask "
                                     f"in transformers (kernels that have one: {known}); set data.packing = false "
                                     f"or pick one of those kernels for the LLM")

    def _layers_hidden(self, inputs_embeds: torch.Tensor, positions: torch.Tensor, **attention) -> torch.Tensor:
        """The decoder stack called layer by layer with no mask (``attention``: packed rows' boundaries)."""
        rotary = self.rotary(inputs_embeds, positions)
        hidden = inputs_embeds
        for layer in self.layers()[:self.hf_model.config.num_hidden_layers]:
            hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary, **attention)
        return self.norm(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)

    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each decoder layer in backward instead of keeping its activations.

        transformers' own switch only acts on modules in training mode, and a frozen LLM stays in eval
        mode (``MLLM.train``) although gradients still flow through it to the bridge; so the layers'
        ``forward`` is wrapped here, checkpointing whenever autograd records.
        """
        self.checkpointing = enabled
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
