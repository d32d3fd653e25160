"""The assembly API: wiring checks from configs alone, then building an :class:`MLLM` from a recipe.

``check_wiring`` asks each model part for its widths (``ComponentSpec.dims``) and verifies the chain
vision → bridges → LLM hidden size before any weight is read. ``assemble`` builds the parts in order,
handing each bridge the previous width and the LLM's. ``build`` makes one component by name.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import attrs

from mllmkit.errors import RecipeError
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.recipe import Component, Recipe, load_recipe
from mllmkit.recipe.structure import structure

__all__ = ["Wiring", "check_wiring", "assemble", "build"]


@attrs.frozen
class Wiring:
    """Declared widths of every model part, in chain order, and the context each bridge gets."""

    vision: PartDims
    bridges: list[PartDims]
    llm: PartDims
    contexts: list[BuildContext]


def check_wiring(recipe: Recipe) -> Wiring:
    """Verify the width chain of the recipe's model without building anything."""
    try:
        return _check_wiring(recipe)
    except RecipeError as exc:
        raise exc.with_file(str(recipe.path) if recipe.path else "<recipe>") from None


def _check_wiring(recipe: Recipe) -> Wiring:
    llm = recipe.llm.spec.dims(recipe.llm.config, BuildContext(key=recipe.llm.key, recipe_dir=recipe.dir))
    vision = recipe.vision.spec.dims(recipe.vision.config, BuildContext(key=recipe.vision.key, recipe_dir=recipe.dir))
    width, tokens, source = vision.out_dim, vision.out_tokens, f"{recipe.vision.key} ({recipe.vision.type})"
    bridges, contexts = [], []
    for bridge in recipe.bridges:
        context = BuildContext(key=bridge.key, recipe_dir=recipe.dir, in_dim=width, in_tokens=tokens,
                               llm_hidden=llm.out_dim)
        dims = bridge.spec.dims(bridge.config, context)
        if dims.in_dim is not None and dims.in_dim != width:
            raise RecipeError(bridge.key, f"{bridge.type} expects input width {dims.in_dim}, but {source} "
                                          f"outputs {width}; set in_dim = {width} or leave it out to infer it")
        width, tokens = dims.out_dim, dims.out_tokens if dims.out_tokens is not None else tokens
        source = f"{bridge.key} ({bridge.type})"
        bridges.append(dims)
        contexts.append(context)
    if width != llm.out_dim:
        raise RecipeError(source.split(" ")[0], f"the last bridge outputs width {width}, but the LLM "
                          f"{recipe.llm.type} has hidden size {llm.out_dim}; set out_dim = {llm.out_dim} or "
                          f"leave it out to infer it")
    return Wiring(vision=vision, bridges=bridges, llm=llm, contexts=contexts)


def _trainable(component: Component, default: bool) -> bool:
    return bool(getattr(component.config, "trainable", default))


def assemble(recipe: Recipe | str | pathlib.Path | Mapping[str, Any]):
    """Build the recipe's model: vision encoder, bridge chain, LLM, with its freeze policy."""
    from mllmkit.model import MLLM

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    wiring = check_wiring(recipe)
    vision = recipe.vision.spec.build(recipe.vision.config, BuildContext(key=recipe.vision.key, recipe_dir=recipe.dir))
    bridges = [b.spec.build(b.config, ctx) for b, ctx in zip(recipe.bridges, wiring.contexts)]
    llm = recipe.llm.spec.build(recipe.llm.config, BuildContext(key=recipe.llm.key, recipe_dir=recipe.dir))
    trainable = {"vision": _trainable(recipe.vision, False), "llm": _trainable(recipe.llm, False)}
    trainable.update({f"bridges.{i}": _trainable(b, True) for i, b in enumerate(recipe.bridges)})
    return MLLM(vision, bridges, llm, trainable=trainable)


def build(kind: str, type: str, /, context: BuildContext | None = None, **options: Any) -> Any:
    """Build one component by kind and registered name, e.g. ``build("vision", "eva_tiny")``."""
    from mllmkit.plugins import get_plugin_host

    spec = get_plugin_host().registry.get(kind, type)
    key = f"{kind}:{type}"
    config = structure(spec.config, options, key, pathlib.Path.cwd())
    return spec.build(config, context or BuildContext(key=key, recipe_dir=pathlib.Path.cwd()))
