"""Validation of a recipe in two passes, into a :class:`Recipe` of resolved components.

Pass 1 checks the recipe's own schema (sections, keys, types). Pass 2 looks up each component
table's ``type`` in the registry (exact names), splits off the keys every component of its kind
shares (:mod:`mllmkit.recipe.shared`: ``trainable``, ``precision``, ``gradient_checkpointing``,
``weight``), validates those with the core's class and the rest with the component's attrs config
class. Every error is a :class:`~mllmkit.errors.RecipeError` with file and key path.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from mllmkit.errors import RecipeError, UserError
from mllmkit.recipe.load import apply_overrides, key_origin, read_recipe_data
from mllmkit.recipe.schema import ChatSection, DataSection, EvalSection, RecipeSchema, TrainSection
from mllmkit.recipe.shared import KIND_DEFAULTS, MISSPELLINGS, SHARED_KEYS, check_tune_spellings, shared_names
from mllmkit.recipe.structure import structure, unknown_option, unstructure
from mllmkit.registry import ComponentSpec, Registry

__all__ = ["Component", "Recipe", "load_recipe", "resolve_component"]


@attrs.frozen
class Component:
    """A validated component: kind, registered name, recipe key path, its own config object, the
    shared keys of its kind (``shared``: a :mod:`mllmkit.recipe.shared` object, None for a backend)
    and its spec."""

    kind: str
    type: str
    key: str
    config: Any
    spec: ComponentSpec
    shared: Any = None

    def to_dict(self) -> dict[str, Any]:
        shared = unstructure(self.shared) if self.shared is not None else {}
        return {"type": self.type, **unstructure(self.config), **shared}


@attrs.frozen
class Recipe:
    """A fully validated recipe."""

    path: pathlib.Path | None
    dir: pathlib.Path
    vision: Component
    bridges: list[Component]
    llm: Component
    train_data: list[Component]
    eval_data: list[Component]
    parallel: Component
    data: DataSection
    train: TrainSection
    chat: ChatSection
    eval: EvalSection = attrs.Factory(EvalSection)
    eval_tasks: list[Component] = attrs.Factory(list)
    """The ``[[eval.tasks]]`` tables, resolved (kind ``eval_task``)."""
    init_from: pathlib.Path | None = None
    """``[model] init_from``: the export whose weights are loaded over the assembled model."""

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe, defaults filled in (what ``mllmkit print-config`` prints)."""
        data = unstructure(self.data)
        data["train"] = [c.to_dict() for c in self.train_data]
        data["eval"] = [c.to_dict() for c in self.eval_data]
        return {
            "model": {"vision": self.vision.to_dict(), "bridges": [b.to_dict() for b in self.bridges],
                      "llm": self.llm.to_dict(), **({"init_from": str(self.init_from)} if self.init_from else {})},
            "data": data,
            "train": unstructure(self.train),
            "parallel": self.parallel.to_dict(),
            "chat": unstructure(self.chat),
            "eval": {**unstructure(self.eval), "tasks": [c.to_dict() for c in self.eval_tasks]},
        }

    def missing_inputs(self) -> list[str]:
        """``key: not found: path`` for every file or folder a model part or dataset names that is not
        there (weights, LLM folders, annotations, image folders), so a run can stop before it starts."""
        missing = []
        for component in [self.vision, *self.bridges, self.llm, *self.train_data, *self.eval_data, *self.eval_tasks]:
            for field in attrs.fields(type(component.config)):
                value = getattr(component.config, field.name)
                if isinstance(value, pathlib.Path) and not value.exists():
                    missing.append(f"{component.key}.{field.name}: not found: {value}")
        if self.init_from is not None and not self.init_from.exists():
            missing.append(f"model.init_from: not found: {self.init_from}")
        return missing


def load_recipe(source: str | pathlib.Path | Mapping[str, Any], overrides: Iterable[str] = (),
                registry: Registry | None = None, base_dir: str | pathlib.Path | None = None) -> Recipe:
    """Read (a path) or take (a dict) a recipe, apply ``--set`` overrides, validate both passes."""
    if registry is None:
        from mllmkit.plugins import get_plugin_host

        registry = get_plugin_host().registry
    if isinstance(source, Mapping):
        path, data = None, dict(source)
        folder = pathlib.Path(base_dir or pathlib.Path.cwd()).resolve()
    else:
        path = pathlib.Path(source).resolve()
        folder = path.parent
        try:
            data = read_recipe_data(path)
        except RecipeError as exc:
            raise exc.with_file(str(path)) from None
    overrides = list(overrides)
    try:
        data = apply_overrides(data, overrides)
        return _resolve(data, path, folder, registry)
    except RecipeError as exc:
        # the file (or extends base, or --set) that wrote the value, else the recipe itself
        raise exc.with_file(key_origin(path, exc.key, overrides) or (str(path) if path else "<recipe>")) from None


def resolve_component(kind: str, table: Any, key: str, folder: pathlib.Path, registry: Registry) -> Component:
    """Validate one component table (``type`` plus options) of ``kind`` at recipe key ``key``."""
    if not isinstance(table, Mapping):
        raise RecipeError(key, f"expected a table with a 'type' key, found {table!r}")
    if "type" not in table:
        raise RecipeError(f"{key}.type", f"required: name the {kind} component; available: "
                          f"{', '.join(registry.names(kind)) or '(none)'}")
    name = table["type"]
    if not isinstance(name, str):
        raise RecipeError(f"{key}.type", f"expected a string, found {name!r}")
    try:
        spec = registry.get(kind, str(name))
    except UserError as exc:
        raise RecipeError(f"{key}.type", str(exc)) from None
    shared_keys = shared_names(kind)
    own = {k: v for k, v in table.items() if k != "type" and k not in shared_keys}
    _check_own_names(own, spec.config, shared_keys, key)
    config = structure(spec.config, own, key, folder)
    shared = None
    if SHARED_KEYS.get(kind) is not None:
        given = {k: v for k, v in table.items() if k in shared_keys}
        check_tune_spellings(given, key)
        shared = structure(SHARED_KEYS[kind], {**KIND_DEFAULTS[kind], **spec.defaults, **given}, key, folder)
    return Component(kind=kind, type=str(name), key=key, config=config, spec=spec, shared=shared)


def _check_own_names(own: Mapping[str, Any], config_cls: type, shared_keys: tuple[str, ...], key: str) -> None:
    """Unknown options name the component's and the shared keys; another spelling of a shared key
    (``dtype``, ``grad_checkpointing``) gets the core's spelling suggested."""
    fields = [f.name for f in attrs.fields(config_cls)]
    for name in own:
        if name not in fields:
            suggestion = MISSPELLINGS.get(name)
            raise unknown_option(f"{key}.{name}", [*fields, *shared_keys],
                                 suggestion if suggestion in shared_keys else None)


def _components(kind: str, tables: Any, key: str, folder: pathlib.Path, registry: Registry) -> list[Component]:
    if not isinstance(tables, list):
        raise RecipeError(key, f"expected an array of tables ([[{key}]]), found {tables!r}")
    return [resolve_component(kind, t, f"{key}[{i}]", folder, registry) for i, t in enumerate(tables)]


def _resolve(data: dict[str, Any], path: pathlib.Path | None, folder: pathlib.Path, registry: Registry) -> Recipe:
    from mllmkit.eval.section import resolve_eval_tasks

    if "model" not in data:
        raise RecipeError("model", "required: a recipe needs [model.vision], [[model.bridges]] and [model.llm]")
    schema: RecipeSchema = structure(RecipeSchema, data, "", folder)  # pass 1
    model = schema.model
    return Recipe(  # pass 2
        path=path,
        dir=folder,
        vision=resolve_component("vision", model.vision, "model.vision", folder, registry),
        bridges=_components("bridge", model.bridges, "model.bridges", folder, registry),
        llm=resolve_component("llm", model.llm, "model.llm", folder, registry),
        train_data=_components("dataset", schema.data.train, "data.train", folder, registry),
        eval_data=_components("dataset", schema.data.eval, "data.eval", folder, registry),
        parallel=resolve_component("parallel", schema.parallel, "parallel", folder, registry),
        data=schema.data,
        train=schema.train,
        chat=schema.chat,
        eval=schema.eval,
        eval_tasks=resolve_eval_tasks(schema.eval.tasks, folder, registry),
        init_from=model.init_from,
    )
