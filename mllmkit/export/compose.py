"""From an assembled MLLM to the target's config and state dict, through the plugins' export specs.

:func:`plan_export` finds the spec of every part (vision, bridges, LLM) in the registry's ``export``
kind and picks the target whose slots those specs fill, in order (Blip2: vision_model → qformer →
language_projection → language_model; Llava: vision_tower → multi_modal_projector →
language_model); anything else is an :class:`ExportError` naming the parts and listing the
compositions the installed plugins support. :func:`compose` applies each part's key table and
merges the config fields; two parts setting one field to different values is recorded as a note
(the first part's value is kept) so the exporter can print it and verify can measure it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from mllmkit.export.spec import ExportError, ExportSpec
from mllmkit.export.targets import TARGETS, ExportTarget

__all__ = ["Composed", "Plan", "compose", "plan_export", "supported_compositions"]


@attrs.frozen
class Plan:
    """The target of a model and the export spec of each of its parts, in chain order."""

    target: ExportTarget
    specs: list[ExportSpec]


@attrs.frozen
class Composed:
    """The target's config keyword arguments, its tensors by name, and notes on inexact details."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    notes: list[str]
    target: ExportTarget
    specs: list[ExportSpec]


def supported_compositions(registry) -> str:
    """The chains the registered export specs make per target, e.g.
    ``Blip2ForConditionalGeneration: eva_tiny | eva_vit_g → qformer | … → qwen; LlavaForConditionalGeneration: …``."""
    specs = registry.specs("export")
    chains = []
    for target in TARGETS:
        by_role = [" | ".join(sorted(s.name for s in specs if s.role == role)) or "(none)" for role in target.roles]
        chains.append(f"{target.name}: {' → '.join(by_role)}")
    return "; ".join(chains)


def plan_export(recipe, registry) -> Plan:
    """The target and the export spec of each model part of ``recipe`` (checked against the slots)."""
    parts = [("vision", recipe.vision), *(("bridge", b) for b in recipe.bridges), ("llm", recipe.llm)]
    names = {s.name: s for s in registry.specs("export")}
    supported = f"supported compositions: {supported_compositions(registry)}"
    chain = " → ".join(component.type for _, component in parts)
    found = []
    for kind, component in parts:
        spec = names.get(component.type)
        if spec is None or spec.kind != kind:
            raise ExportError(f"{component.key}: {component.type!r} has no export to a transformers class (the model "
                              f"is {chain}); {supported}")
        found.append(spec)
    roles = tuple(spec.role for spec in found)
    target = next((t for t in TARGETS if t.roles == roles), None)
    if target is None:
        raise ExportError(f"the model {chain} fills the slots {' → '.join(roles)}, which no transformers class "
                          f"takes; {supported}")
    return Plan(target=target, specs=found)


def _merge(config: dict[str, Any], fields: Mapping[str, Any], where: str, owner: dict[str, str],
           notes: list[str], target: str, prefix: str = "") -> None:
    for key, value in fields.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _merge(config.setdefault(key, {}), value, where, owner, notes, target, prefix=f"{path}.")
        elif key not in config:
            config[key], owner[path] = value, where
        elif config[key] != value:
            notes.append(f"{path}: {owner[path]} uses {config[key]!r} and {where} uses {value!r}; {target} has one "
                         f"value, {config[key]!r} is kept (not exactly representable: {where} computes with "
                         f"{config[key]!r} in the export)")


def compose(model, recipe, registry) -> Composed:
    """Config and tensors of the target class for the assembled ``model``."""
    plan = plan_export(recipe, registry)
    components = [recipe.vision, *recipe.bridges, recipe.llm]
    parts = [part for _, part in model.parts()]
    config: dict[str, Any] = {}
    owner: dict[str, str] = {}
    notes: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for spec, component, part in zip(plan.specs, components, parts):
        where = f"{component.key} ({component.type})"
        _merge(config, spec.config(part), where, owner, notes, plan.target.name)
        for name, value in plan.target.to_target(spec, part.state_dict(), where).items():
            if name in tensors:
                raise ExportError(f"{where}: {name} is also exported by another part")
            tensors[name] = value
    config["image_token_index"] = model.llm.template.image_token_id
    plan.target.finish(config, model)
    return Composed(config=config, tensors=tensors, notes=notes, target=plan.target, specs=plan.specs)
