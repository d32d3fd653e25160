"""The transformers classes an export can target, as data: :class:`ExportTarget`, :data:`TARGETS`.

A target names its model and config classes, its slots (``roles``) in chain order, and what the
composition needs beyond the parts' own declarations: where a part whose spec speaks a sub-model's
own names is placed (``placement``: the LLM spec maps to ``*ForCausalLM`` names, which Blip2 keeps
under ``language_model.`` and Llava splits into ``model.language_model.`` and ``lm_head.``), the
fields it derives from the assembled model (``finish``: image token counts), and its processor.
The target of a model is the one whose roles its parts' specs fill, in order
(:func:`mllmkit.export.compose.plan_export`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from mllmkit.export.spec import ExportError, ExportSpec, Table

__all__ = ["BLIP2", "LLAVA", "ROLES", "TARGETS", "ExportTarget", "target_named"]


@attrs.frozen
class ExportTarget:
    """One transformers multimodal class and how parts compose into it.

    ``placement[role]`` is ``(place, unplace)``: tables from the role's spec names to the target's
    and back (roles absent: the spec writes the target's names itself). ``finish(config, model)``
    adds the fields the assembled model decides and checks them. ``processor(config, image_processor,
    tokenizer, chat_template)`` builds the processor; ``expands_image_token``: the processor repeats
    each image placeholder itself, so the chat template writes one per image.
    """

    name: str
    config_class: str
    roles: tuple[str, ...]
    head: str
    """The LM head tensor's name, left out when the text config ties it to the embeddings."""
    finish: Callable[[dict[str, Any], Any], None]
    processor: Callable[[dict[str, Any], Any, Any, str], Any]
    expands_image_token: bool
    placement: Mapping[str, tuple[Table, Table]] = attrs.field(factory=dict)

    def model_class(self) -> type:
        import transformers

        return getattr(transformers, self.name)

    def config_type(self) -> type:
        import transformers

        return getattr(transformers, self.config_class)

    def to_target(self, spec: ExportSpec, state: Mapping[str, Any], where: str) -> dict[str, Any]:
        """``state`` (the part's names) renamed to the target's."""
        tensors = spec.keys.apply(state, where)
        return self.placement[spec.role][0].apply(tensors, where) if spec.role in self.placement else tensors

    def reads(self, spec: ExportSpec, key: str) -> bool:
        """Whether the target tensor ``key`` belongs to ``spec``'s part."""
        return (self.placement[spec.role][1] if spec.role in self.placement else spec.reverse).matches(key)

    def from_target(self, spec: ExportSpec, tensors: Mapping[str, Any], where: str) -> dict[str, Any]:
        """The target tensors of ``spec``'s part renamed back to the part's names."""
        if spec.role in self.placement:
            tensors = self.placement[spec.role][1].apply(tensors, where)
        return spec.reverse.apply(tensors, where)

    def template_image_tokens(self, tokens_per_image: int) -> int:
        """How many placeholders the chat template writes per image."""
        return 1 if self.expands_image_token else tokens_per_image


def _blip2_finish(config: dict[str, Any], model: Any) -> None:
    if config.get("num_query_tokens") != model.tokens_per_image:
        raise ExportError(f"the model puts {model.tokens_per_image} image tokens per image, but its Q-Former "
                          f"exports num_query_tokens = {config.get('num_query_tokens')}")


def _blip2_processor(config: dict[str, Any], image_processor: Any, tokenizer: Any, chat_template: str) -> Any:
    from transformers import Blip2Processor

    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=None)
    processor.chat_template = chat_template  # Blip2Processor's __init__ does not pass it on
    return processor


def _llava_finish(config: dict[str, Any], model: Any) -> None:
    config["image_seq_length"] = model.tokens_per_image


def _llava_processor(config: dict[str, Any], image_processor: Any, tokenizer: Any, chat_template: str) -> Any:
    """``LlavaProcessor`` counting ``image_seq_length`` tokens per image: patches, plus the tokens the
    tower adds (a class token), minus the one the ``default`` strategy drops."""
    from transformers import LlavaProcessor

    vision = config["vision_config"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    strategy = config["vision_feature_select_strategy"]
    added = config["image_seq_length"] - patches + (strategy == "default")
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=vision["patch_size"],
                          vision_feature_select_strategy=strategy, chat_template=chat_template,
                          image_token=tokenizer.image_token, num_additional_image_tokens=added)


BLIP2 = ExportTarget(
    name="Blip2ForConditionalGeneration", config_class="Blip2Config",
    roles=("vision_model", "qformer", "language_projection", "language_model"),
    head="language_model.lm_head.weight", finish=_blip2_finish, processor=_blip2_processor,
    expands_image_token=False,
    placement={"language_model": (Table(rules=[(r"(.+)", r"language_model.\1")]),
                                  Table(rules=[(r"language_model\.(.+)", r"\1")]))},
)
"""EVA → Q-Former → Linear → causal LM (MiniGPT4Qwen)."""

LLAVA = ExportTarget(
    name="LlavaForConditionalGeneration", config_class="LlavaConfig",
    roles=("vision_tower", "multi_modal_projector", "language_model"),
    head="lm_head.weight", finish=_llava_finish, processor=_llava_processor, expands_image_token=True,
    placement={"language_model": (Table(rules=[(r"model\.(.+)", r"model.language_model.\1"),
                                               (r"lm_head\.(.+)", r"lm_head.\1")]),
                                  Table(rules=[(r"model\.language_model\.(.+)", r"model.\1"),
                                               (r"lm_head\.(.+)", r"lm_head.\1")]))},
)
"""CLIP/SigLIP → 2-layer MLP → causal LM (LLaVA-1.5)."""

TARGETS: tuple[ExportTarget, ...] = (BLIP2, LLAVA)

ROLES: frozenset[str] = frozenset(role for target in TARGETS for role in target.roles)
"""Every slot of every target; an export spec's ``role`` is one of these."""


def target_named(name: str) -> ExportTarget:
    """The target whose class is ``name`` (as an export's manifest records it)."""
    for target in TARGETS:
        if target.name == name:
            return target
    raise ExportError(f"no export target {name!r}; known: {', '.join(t.name for t in TARGETS)}")
