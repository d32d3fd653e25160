"""The recipe's ``[[eval.tasks]]`` tables, validated in pass 2 like component tables.

Each table is ``type = "<task name>"`` (a registered ``eval_task``) plus that task's options,
validated by the task's config class with errors naming the key path (``eval.tasks[0].limit``).
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

from mllmkit.errors import RecipeError, UserError
from mllmkit.recipe.structure import structure
from mllmkit.registry import Registry

__all__ = ["resolve_eval_tasks", "task_component"]


def task_component(table: Any, key: str, folder: pathlib.Path, registry: Registry):
    """One ``[[eval.tasks]]`` table as a :class:`~mllmkit.recipe.resolve.Component` of kind ``eval_task``."""
    from mllmkit.recipe.resolve import Component

    if not isinstance(table, Mapping) or not isinstance(table.get("type"), str):
        raise RecipeError(f"{key}.type", f"required: the task's name; available: "
                                         f"{', '.join(registry.names('eval_task')) or '(none)'}")
    try:
        spec = registry.get("eval_task", table["type"])
    except UserError as exc:
        raise RecipeError(f"{key}.type", str(exc)) from None
    config = structure(spec.config, {k: v for k, v in table.items() if k != "type"}, key, folder)
    return Component(kind="eval_task", type=table["type"], key=key, config=config, spec=spec)


def resolve_eval_tasks(tables: list[Any], folder: pathlib.Path, registry: Registry) -> list:
    return [task_component(t, f"eval.tasks[{i}]", folder, registry) for i, t in enumerate(tables)]
