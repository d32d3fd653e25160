"""The assembly API: wiring checks from configs alone, then building an :class:`MLLM` from a recipe.

``check_wiring`` asks each model part for its widths (``ComponentSpec.dims``) and verifies the chain
vision → bridges → LLM hidden size before any weight is read. ``assemble`` builds the parts in order,
handing each bridge the previous width and the LLM's, and applies the keys every part shares
(:mod:`mllmkit.recipe.shared`) itself: the dtype builders read weights into, the precision layout of
vision encoders and bridges (:mod:`mllmkit.precision`), gradient checkpointing, the fine-tuning policy
(``tune``: LoRA adapters and QLoRA quantization, :mod:`mllmkit.tune`) and freezing; ``[model] init_from``
then loads an earlier run's export over the assembled model.
``build`` makes one component by name, the same way.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import attrs
import torch

from mllmkit.config import torch_dtype
from mllmkit.errors import RecipeError
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.precision import effective_precision, layout_for_autocast, resolve_device
from mllmkit.recipe import Component, Recipe, load_recipe
from mllmkit.recipe.resolve import resolve_component
from mllmkit.recipe.shared import LLMKeys, PartKeys

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
    if recipe.llm.shared.quantize != "none":
        from mllmkit.tune.quantize import check_quantize_device

        check_quantize_device(recipe.train.device, recipe.llm.key)
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


def _with_precision(component: Component, context: BuildContext, device: torch.device) -> tuple[BuildContext, str]:
    """The context a model part is built with (``dtype``, ``device``) and the precision it runs in."""
    precision = effective_precision(component.shared.precision, device, component.key)
    stored = "fp32" if component.shared.trainable and component.kind != "llm" else precision
    return attrs.evolve(context, dtype=torch_dtype(stored), device=device), precision


def _build_part(component: Component, context: BuildContext) -> Any:
    """Build a model part and apply the shared keys but ``trainable`` (the MLLM's freeze policy applies it)."""
    part = component.spec.build(component.config, context)
    if component.kind != "llm":
        layout_for_autocast(part, context.dtype)
    if isinstance(component.shared, PartKeys) and component.shared.gradient_checkpointing:
        switch = getattr(part, "gradient_checkpointing", None)
        if not callable(switch):
            raise RecipeError(f"{component.key}.gradient_checkpointing",
                              f"{component.type} cannot recompute its activations (it has no "
                              f"gradient_checkpointing method); set it to false")
        switch(True)
    return _tune(part, component, context)


def _tune(part: Any, component: Component, context: BuildContext) -> Any:
    """Apply the part's fine-tuning policy beyond freezing: QLoRA quantization, then LoRA adapters (fp32)."""
    shared = component.shared
    if isinstance(shared, LLMKeys) and shared.quantize != "none":
        from mllmkit.tune.quantize import quantize_llm

        quantize_llm(part, shared.quantize, context.device, component.key)
    if shared.policy == "lora":
        from mllmkit.tune.lora import apply_lora

        apply_lora(part, shared.lora, component.kind, component.key, component.type)
        for param in part.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()  # adapters train in fp32 beside low-precision base weights
    return part


def assemble(recipe: Recipe | str | pathlib.Path | Mapping[str, Any], device: str | torch.device | None = None):
    """Build the recipe's model to run on ``device`` (default: the recipe's ``train.device``): vision
    encoder, bridge chain, LLM, each in its precision, with the recipe's freeze policy."""
    from mllmkit.model import MLLM

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    wiring = check_wiring(recipe)
    device = resolve_device(device or recipe.train.device)
    components = [recipe.vision, *recipe.bridges, recipe.llm]
    contexts = [BuildContext(key=recipe.vision.key, recipe_dir=recipe.dir), *wiring.contexts,
                BuildContext(key=recipe.llm.key, recipe_dir=recipe.dir)]
    names = ["vision", *(f"bridges.{i}" for i in range(len(recipe.bridges))), "llm"]
    parts, precision = [], {}
    try:
        for name, component, context in zip(names, components, contexts):
            context, precision[name] = _with_precision(component, context, device)
            parts.append(_build_part(component, context))
    except RecipeError as exc:
        raise exc.with_file(str(recipe.path) if recipe.path else "<recipe>") from None
    trainable = {name: c.shared.trainable for name, c in zip(names, components)}
    del precision["llm"]  # the LLM's weights hold its precision; it runs under the training autocast
    model = MLLM(parts[0], parts[1:-1], parts[-1], trainable=trainable, precision=precision)
    if recipe.init_from is not None:
        from mllmkit.tune.init_from import load_init_from

        load_init_from(model, recipe.init_from, recipe.path)
    return model


def build(kind: str, type: str, /, context: BuildContext | None = None, **options: Any) -> Any:
    """Build one component by kind and registered name, e.g. ``build("vision", "eva_tiny")``; model
    parts get the shared keys applied (``trainable`` included) for the device of ``context`` (CPU)."""
    from mllmkit.model import set_trainable
    from mllmkit.plugins import get_plugin_host

    key = f"{kind}:{type}"
    context = context or BuildContext(key=key, recipe_dir=pathlib.Path.cwd())
    component = resolve_component(kind, {"type": type, **options}, context.key,
                                  context.recipe_dir or pathlib.Path.cwd(), get_plugin_host().registry)
    if component.kind not in ("vision", "bridge", "llm"):
        return component.spec.build(component.config, context)
    context, _ = _with_precision(component, context, context.device or torch.device("cpu"))
    part = _build_part(component, context)
    set_trainable(part, component.shared.trainable)
    return part
