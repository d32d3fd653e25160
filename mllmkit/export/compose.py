"""From an assembled MLLM to the target's config and state dict, through the plugins' export specs.

:func:`export_specs` finds the spec of every part (vision, bridges, LLM) in the registry's ``export``
kind and checks the chain fills the target's slots in order (vision_model → qformer →
language_projection → language_model); anything else is an :class:`ExportError` listing the
compositions the installed plugins support. :func:`compose` applies each part's key table and
merges the config fields; two parts setting one field to different values is recorded as a note
(the first part's value is kept) so the exporter can print it and verify can measure it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import torch

from mllmkit.export.spec import ROLES, TARGET, ExportError, ExportSpec

__all__ = ["Composed", "compose", "export_specs", "supported_compositions"]


@attrs.frozen
class Composed:
    """The target's ``Blip2Config`` keyword arguments, its tensors by name, and notes on inexact details."""

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    notes: list[str]
    specs: list[ExportSpec]


def supported_compositions(registry) -> str:
    """The chains the registered export specs make, e.g. ``eva_tiny | eva_vit_g → qformer | … → qwen``."""
    by_role = {role: sorted(s.name for s in registry.specs("export") if s.role == role) for role in ROLES}
    return " → ".join(" | ".join(names) or "(none)" for names in by_role.values())


def export_specs(recipe, registry) -> list[ExportSpec]:
    """The export spec of each model part of ``recipe``, in chain order (checked against the slots)."""
    parts = [("vision", recipe.vision), *(("bridge", b) for b in recipe.bridges), ("llm", recipe.llm)]
    names = {s.name: s for s in registry.specs("export")}
    supported = f"supported compositions ({TARGET}): {supported_compositions(registry)}"
    chain = " → ".join(component.type for _, component in parts)
    found = []
    for kind, component in parts:
        spec = names.get(component.type)
        if spec is None or spec.kind != kind:
            raise ExportError(f"{component.key}: {component.type!r} has no {TARGET} export (the model is {chain}); "
                              f"{supported}")
        found.append(spec)
    if [spec.role for spec in found] != list(ROLES):
        raise ExportError(f"the model {chain} fills the slots {' → '.join(s.role for s in found)}, but {TARGET} "
                          f"needs {' → '.join(ROLES)}; {supported}")
    return found


def _merge(config: dict[str, Any], fields: Mapping[str, Any], where: str, owner: dict[str, str],
           notes: list[str], prefix: str = "") -> None:
    for key, value in fields.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            _merge(config.setdefault(key, {}), value, where, owner, notes, prefix=f"{path}.")
        elif key not in config:
            config[key], owner[path] = value, where
        elif config[key] != value:
            notes.append(f"{path}: {owner[path]} uses {config[key]!r} and {where} uses {value!r}; {TARGET} has one "
                         f"value, {config[key]!r} is kept (not exactly representable: {where} computes with "
                         f"{config[key]!r} in the export)")


def compose(model, recipe, registry) -> Composed:
    """Config and tensors of ``Blip2ForConditionalGeneration`` for the assembled ``model``."""
    specs = export_specs(recipe, registry)
    components = [recipe.vision, *recipe.bridges, recipe.llm]
    parts = [part for _, part in model.parts()]
    config: dict[str, Any] = {}
    owner: dict[str, str] = {}
    notes: list[str] = []
    tensors: dict[str, torch.Tensor] = {}
    for spec, component, part in zip(specs, components, parts):
        where = f"{component.key} ({component.type})"
        _merge(config, spec.config(part), where, owner, notes)
        for name, value in spec.keys.apply(part.state_dict(), where).items():
            if name in tensors:
                raise ExportError(f"{where}: {name} is also exported by another part")
            tensors[name] = value
    config["image_token_index"] = model.llm.template.image_token_id
    if config.get("num_query_tokens") != model.tokens_per_image:
        raise ExportError(f"the model puts {model.tokens_per_image} image tokens per image, but its Q-Former "
                          f"exports num_query_tokens = {config.get('num_query_tokens')}")
    return Composed(config=config, tensors=tensors, notes=notes, specs=specs)
