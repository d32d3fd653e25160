"""Export of ``qformer`` / ``qformer_tiny`` into ``Blip2ForConditionalGeneration``.

The bridge is already transformers' ``Blip2QFormerModel`` (query path only) plus ``query_tokens``,
so those names carry over unchanged; LAVIS's ``ln_vision`` becomes ``vision_model.post_layernorm``
(Blip2 normalises the vision output there, before the Q-Former reads it). Blip2 computes that norm
with the vision config's one ``layer_norm_eps``: this part declares its own eps (LAVIS: 1e-5) so the
exporter can report the difference from EVA's 1e-6 instead of hiding it.
"""

from __future__ import annotations

from typing import Any

from mllmkit.export.spec import ExportSpec, Table

__all__ = ["BLIP2_TO_QFORMER", "QFORMER_TO_BLIP2", "SPECS", "qformer_config"]

QFORMER_TO_BLIP2 = Table(rules=[
    (r"ln_vision\.(weight|bias)", r"vision_model.post_layernorm.\1"),
    (r"query_tokens", "query_tokens"),
    (r"qformer\.(.+)", r"qformer.\1"),
])
"""Q-Former bridge state-dict names → ``Blip2ForConditionalGeneration`` names."""

BLIP2_TO_QFORMER = Table(rules=[
    (r"vision_model\.post_layernorm\.(weight|bias)", r"ln_vision.\1"),
    (r"query_tokens", "query_tokens"),
    (r"qformer\.(.+)", r"qformer.\1"),
])
"""The reverse of :data:`QFORMER_TO_BLIP2`."""

_QFORMER_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
                   "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
                   "cross_attention_frequency", "use_qformer_text_input")


def qformer_config(bridge: Any) -> dict[str, Any]:
    """``qformer_config``, ``num_query_tokens`` and the eps ``ln_vision`` computes with."""
    config = bridge.qformer.config
    return {"qformer_config": {name: getattr(config, name) for name in _QFORMER_FIELDS},
            "num_query_tokens": bridge.num_query_tokens,
            "vision_config": {"layer_norm_eps": bridge.ln_vision.eps}}


SPECS = [
    ExportSpec(name, "bridge", "qformer", "Q-Former + query_tokens → qformer; ln_vision → vision_model.post_layernorm",
               keys=QFORMER_TO_BLIP2, reverse=BLIP2_TO_QFORMER, config=qformer_config)
    for name in ("qformer", "qformer_tiny")
]
