"""The keys every component of a kind shares, owned by the core: one spelling each, validated once.

Model parts take ``trainable`` and ``precision`` (``"fp32"``, ``"bf16"`` or ``"fp16"``), ``tune`` (the
fine-tuning policy: ``"frozen"``, ``"full"`` or ``"lora"``; ``trainable = true/false`` is the short spelling
of ``"full"``/``"frozen"``, and the two may not disagree) with its ``lora`` options table; vision encoders
and LLMs also ``gradient_checkpointing``; LLMs also ``quantize`` (QLoRA); datasets take ``weight``. The resolver splits these off a
component table before the component's own config class sees it (pass 2), so plugin config classes
never declare them. Defaults come from the kind (:data:`KIND_DEFAULTS`), then from the component's
``ComponentSpec.defaults`` (``eva_vit_g`` says ``precision = "fp16"``), then from the recipe.
:data:`MISSPELLINGS` maps other spellings seen in the field to the one the core reads.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs

from mllmkit.config import ConfigValueError, Precision, non_negative, positive
from mllmkit.errors import RecipeError

__all__ = ["PartKeys", "BridgeKeys", "LLMKeys", "LoraKeys", "DatasetKeys", "SHARED_KEYS", "KIND_DEFAULTS",
           "MISSPELLINGS", "check_tune_spellings", "shared_names"]

Tune = Literal["frozen", "full", "lora"]


def _dropout(instance: Any, attribute: attrs.Attribute, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigValueError(attribute.name, f"expected a value in [0, 1), found {value!r}")


def _targets(instance: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    if not value or any(not t for t in value):
        raise ConfigValueError(attribute.name, 'expected a non-empty list of module-name patterns, e.g. ["q_proj", '
                                               '"v_proj"], ["layers.*.mlp.*"] or ["all-linear"]')


@attrs.frozen(kw_only=True)
class LoraKeys:
    """``[model.<part>.lora]``: the LoRA adapters of a part with ``tune = "lora"`` (built with peft)."""

    r: int = attrs.field(default=8, validator=positive)
    """Rank of each adapter."""
    alpha: float = attrs.field(default=16.0, validator=positive)
    """Scaling numerator: the adapter's output is multiplied by ``alpha / r``."""
    dropout: float = attrs.field(default=0.05, validator=_dropout)
    """Dropout on the adapter's input while training."""
    targets: list[str] = attrs.field(default=attrs.Factory(lambda: ["all-linear"]), validator=_targets)
    """Module-name patterns: a name (``q_proj``) matches every module whose dotted name ends with it, ``*``
    matches within a name (``layers.*.mlp.*_proj``); ``all-linear`` is every Linear layer but the LLM's output
    head. A pattern that matches no module is an error listing the module names there are."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train besides the adapters (peft's ``bias``)."""


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
    tune: Tune | None = None
    """The fine-tuning policy: ``"frozen"``, ``"full"`` (every weight trains) or ``"lora"`` (the weights stay
    frozen, peft LoRA adapters train; options in the part's ``lora`` table). Unset: ``trainable`` says."""
    lora: LoraKeys | None = None
    """LoRA options (``r``, ``alpha``, ``dropout``, ``targets``, ``bias``) of ``tune = "lora"``."""

    def __attrs_post_init__(self) -> None:
        if self.tune is not None:
            object.__setattr__(self, "trainable", self.tune != "frozen")
        if self.tune == "lora" and self.lora is None:
            object.__setattr__(self, "lora", LoraKeys())
        if self.lora is not None and self.tune != "lora":
            raise ConfigValueError("lora", f'LoRA options, but tune = {self.tune or "unset"}; set tune = "lora" or '
                                           f"remove the lora table")

    @property
    def policy(self) -> str:
        """``tune``, or what ``trainable`` stands for."""
        return self.tune or ("full" if self.trainable else "frozen")


@attrs.frozen(kw_only=True)
class PartKeys(BridgeKeys):
    """Shared keys of a vision encoder or an LLM."""

    gradient_checkpointing: bool = False
    """Recompute activations in backward (the part's ``gradient_checkpointing(True)``)."""


@attrs.frozen(kw_only=True)
class LLMKeys(PartKeys):
    """Shared keys of an LLM."""

    quantize: Literal["none", "nf4", "int8"] = "none"
    """QLoRA: hold the frozen base weights 4-bit (``nf4``) or 8-bit through bitsandbytes on CUDA; needs
    ``tune = "lora"``."""

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        if self.quantize != "none" and self.tune != "lora":
            raise ConfigValueError("quantize", f'a quantized LLM trains through adapters only; set tune = "lora" '
                                               f'(found {self.tune or "unset"}) or quantize = "none"')


@attrs.frozen(kw_only=True)
class DatasetKeys:
    """Shared keys of a dataset."""

    weight: float = attrs.field(default=1.0, validator=non_negative)
    """How often the dataset is drawn per epoch relative to the others (0 = not drawn)."""


SHARED_KEYS: dict[str, type | None] = {
    "vision": PartKeys, "bridge": BridgeKeys, "llm": LLMKeys, "dataset": DatasetKeys, "parallel": None,
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
    "finetune": "tune",
    "tune_type": "tune",
    "peft": "lora",
    "lora_config": "lora",
    "load_in_4bit": "quantize",
    "load_in_8bit": "quantize",
    "quantization": "quantize",
}
"""Spellings of the shared keys used elsewhere (LAVIS, transformers, older mllmkit recipes)."""


def check_tune_spellings(given: dict[str, Any], key: str) -> None:
    """``trainable`` is the short spelling of ``tune = "full"``/``"frozen"``: a recipe giving both must agree."""
    tune, trainable = given.get("tune"), given.get("trainable")
    if isinstance(tune, str) and isinstance(trainable, bool) and trainable != (tune != "frozen"):
        raise RecipeError(f"{key}.tune", f'is "{tune}" but trainable = {str(trainable).lower()}; keep one of them '
                                         f'(tune = "frozen" | "full" | "lora"; trainable = true/false is the short '
                                         f'form of "full"/"frozen")')


def shared_names(kind: str) -> tuple[str, ...]:
    """The shared key names of a kind, in declaration order."""
    cls = SHARED_KEYS.get(kind)
    return tuple(f.name for f in attrs.fields(cls)) if cls is not None else ()
