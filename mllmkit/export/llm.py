"""Shared pieces of LLM export specs for transformers causal LMs wrapped in :class:`~mllmkit.hf_llm.HFCausalLM`.

The wrapper keeps the transformers model as ``hf_model``, so its names become the ``*ForCausalLM``
names by one prefix rule each way (each target places those, :mod:`mllmkit.export.targets`); the
text config is the model's own config with the template's stop and pad ids, so the target's
``generate`` stops where chat stops.
"""

from __future__ import annotations

from typing import Any

import torch

from mllmkit.export.spec import Table, hf_config_fields

__all__ = ["CAUSAL_LM_KEYS", "CAUSAL_LM_REVERSE", "causal_lm_config", "meta_causal_lm"]

CAUSAL_LM_KEYS = Table(rules=[(r"hf_model\.(.+)", r"\1")])
CAUSAL_LM_REVERSE = Table(rules=[(r"(.+)", r"hf_model.\1")])


def causal_lm_config(llm: Any) -> dict[str, Any]:
    """``text_config``: the wrapped model's config, eos = the template's stop ids, its pad id, no bos."""
    config = hf_config_fields(llm.hf_model.config)
    config.update(eos_token_id=list(llm.template.stop_token_ids), pad_token_id=llm.template.pad_token_id)
    return {"text_config": config}


def meta_causal_lm(model_cls: type, text_config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """``model_cls(text_config)`` on the meta device in ``dtype`` (weights are loaded by the caller)."""
    from mllmkit.hf_llm import new_hf_model

    return new_hf_model(model_cls, text_config, dtype, device="meta")
