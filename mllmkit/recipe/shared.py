"""The keys every component of a kind shares, owned by the core: one spelling each, validated once.

Model parts take ``trainable`` and ``precision`` (``"fp32"``, ``"bf16"`` or ``"fp16"``); vision encoders
and LLMs also ``gradient_checkpointing``; datasets take ``weight``. The resolver splits these off a
component table before the component's own config class sees it (pass 2), so plugin config classes
never declare them. Defaults come from the kind (:data:`KIND_DEFAULTS`), then from the component's
``ComponentSpec.defaults`` (``eva_vit_g`` says ``precision = "fp16"``), then from the recipe.
:data:`MISSPELLINGS` maps other spellings seen in the field to the one the core reads.
"""

from __future__ import annotations

from typing import Any

import attrs

from mllmkit.config import Precision, non_negative

__all__ = ["PartKeys", "BridgeKeys", "DatasetKeys", "SHARED_KEYS", "KIND_DEFAULTS", "MISSPELLINGS", "shared_names"]


@attrs.frozen(kw_only=True)
class BridgeKeys:
    """Shared keys of a bridge."""

    trainable: bool
    """Whether the part trains; frozen parts get no gradient and stay in eval mode."""
    precision: Precision
    """What the part computes in. Vision encoders and bridges keep Linear/Conv weights in this dtype and
    everything else (LayerNorms, embeddings, biases outside Linear) in fp32, and run under autocast to
    it, whatever the training autocast is (LAVIS's ``vit_precision``); a trainable one keeps fp32
    weights. LLMs hold all weights in it. fp16 on CPU runs in fp32."""


@attrs.frozen(kw_only=True)
class PartKeys(BridgeKeys):
    """Shared keys of a vision encoder or an LLM."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward (the part's ``gradient_checkpointing(True)``)."""


@attrs.frozen(kw_only=True)
class DatasetKeys:
    """Shared keys of a dataset."""

    weight: float = attrs.field(default=1.0, validator=non_negative)
    """How often the dataset is drawn per epoch relative to the others (0 = not drawn)."""


SHARED_KEYS: dict[str, type | None] = {
    "vision": PartKeys, "bridge": BridgeKeys, "llm": PartKeys, "dataset": DatasetKeys, "parallel": None,
}
"""The shared-keys class of each component kind (``None``: the kind shares no keys)."""

KIND_DEFAULTS: dict[str, dict[str, Any]] = {
    "vision": {"trainable": False, "precision": "fp32"},
    "bridge": {"trainable": True, "precision": "fp32"},
    "llm": {"trainable": False, "precision": "fp32"},
    "dataset": {},
    "parallel": {},
}

MISSPELLINGS: dict[str, str] = {
    "dtype": "precision",
    "torch_dtype": "precision",
    "grad_checkpointing": "gradient_checkpointing",
    "activation_checkpointing": "gradient_checkpointing",
    "use_grad_checkpoint": "gradient_checkpointing",
    "freeze": "trainable",
    "tune": "trainable",
}
"""Spellings of the shared keys used elsewhere (LAVIS, transformers, older mllmkit recipes)."""


def shared_names(kind: str) -> tuple[str, ...]:
    """The shared key names of a kind, in declaration order."""
    cls = SHARED_KEYS.get(kind)
    return tuple(f.name for f in attrs.fields(cls)) if cls is not None else ()
