"""Typed component registry: what every plugin registers, looked up by exact name.

A plugin's registration hook returns :class:`ComponentSpec` objects. The registry keeps them per
kind (``vision``, ``bridge``, ``llm``, ``dataset``, ``parallel``), refuses a name registered twice
(naming both distributions) and answers unknown names with the list of available ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from mllmkit.errors import UserError

__all__ = ["KINDS", "ComponentSpec", "Registry", "DuplicateComponentError", "UnknownComponentError"]

KINDS: tuple[str, ...] = ("vision", "bridge", "llm", "dataset", "parallel", "eval_task")


@attrs.frozen
class ComponentSpec:
    """One buildable component.

    ``config`` is an attrs class validating the recipe table's options; ``build`` takes
    ``(config, context)`` and returns the component (see :mod:`mllmkit.interfaces`). Model parts
    (vision, bridge, llm) also give ``dims(config, context) -> PartDims``: their widths from the
    config alone, so ``mllmkit check`` verifies the chain without reading weights.
    ``distribution`` is filled in by the registry from the plugin that returned the spec.
    """

    name: str
    config: type
    build: Callable[..., Any]
    description: str
    dims: Callable[..., Any] | None = None
    distribution: str = ""


class DuplicateComponentError(UserError):
    """Two plugins registered the same component name."""


class UnknownComponentError(UserError):
    """A recipe names a component nobody registered."""


class Registry:
    """Components by kind and exact name."""

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, ComponentSpec]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, spec: ComponentSpec, distribution: str) -> None:
        if kind not in self._specs:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        if kind in ("vision", "bridge", "llm") and spec.dims is None:
            raise ValueError(f"{distribution}: {kind} component {spec.name!r} must declare dims(config, context)")
        existing = self._specs[kind].get(spec.name)
        if existing is not None:
            raise DuplicateComponentError(
                f"{kind} component {spec.name!r} is registered twice: by {existing.distribution!r} and by "
                f"{distribution!r}. Uninstall one of them, or load only one with MLLMKIT_PLUGINS."
            )
        self._specs[kind][spec.name] = attrs.evolve(spec, distribution=distribution)

    def get(self, kind: str, name: str) -> ComponentSpec:
        try:
            return self._specs[kind][name]
        except KeyError:
            raise UnknownComponentError(
                f"unknown {kind} component {name!r}; available: {', '.join(self.names(kind)) or '(none)'}"
            ) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self._specs[kind])

    def specs(self, kind: str) -> list[ComponentSpec]:
        return [self._specs[kind][name] for name in self.names(kind)]
