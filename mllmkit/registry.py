"""Typed component registry: what every plugin registers, looked up by exact name.

A plugin's registration hook returns :class:`ComponentSpec` objects. The registry keeps them per
kind (``vision``, ``bridge``, ``llm``, ``dataset``, ``parallel``), refuses a name registered twice
(naming both distributions) and answers unknown names with the list of available ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from mllmkit.errors import UserError

__all__ = ["KINDS", "ComponentSpec", "Registry", "DuplicateComponentError", "UnknownComponentError"]

KINDS: tuple[str, ...] = ("vision", "bridge", "llm", "dataset", "parallel", "export", "eval_task")
"""``export`` holds :class:`mllmkit.export.ExportSpec` objects (how a model part maps onto transformers)."""


@attrs.frozen
class ComponentSpec:
    """One buildable component.

    ``config`` is an attrs class validating the recipe table's options; ``build`` takes
    ``(config, context)`` and returns the component (see :mod:`mllmkit.interfaces`). Model parts
    (vision, bridge, llm) also give ``dims(config, context) -> PartDims``: their widths from the
    config alone, so ``mllmkit check`` verifies the chain without reading weights.
    ``defaults`` overrides the core's defaults of the keys every component of the kind shares
    (:mod:`mllmkit.recipe.shared`, e.g. ``{"precision": "fp16"}``); ``config`` never declares those keys.
    ``distribution`` is filled in by the registry from the plugin that returned the spec.
    """

    name: str
    config: type
    build: Callable[..., Any]
    description: str
    dims: Callable[..., Any] | None = None
    defaults: Mapping[str, Any] = attrs.Factory(dict)
    distribution: str = ""


class DuplicateComponentError(UserError):
    """Two plugins registered the same component name."""


class UnknownComponentError(UserError):
    """A recipe names a component nobody registered."""


def _check_shared_keys(kind: str, spec: ComponentSpec, distribution: str) -> None:
    """The core owns the shared keys: a config class must not declare them, ``defaults`` only them."""
    from mllmkit.recipe.shared import shared_names

    shared = shared_names(kind)
    declared = [f.name for f in attrs.fields(spec.config) if f.name in shared] if attrs.has(spec.config) else []
    if declared:
        raise ValueError(f"{distribution}: {kind} component {spec.name!r}: its config class declares "
                         f"{', '.join(declared)}, which the core validates and applies for every {kind} "
                         f"component; remove them (set different defaults with ComponentSpec(defaults=...))")
    foreign = [k for k in spec.defaults if k not in shared]
    if foreign:
        raise ValueError(f"{distribution}: {kind} component {spec.name!r}: defaults names {', '.join(foreign)}; "
                         f"only the shared keys of a {kind} component go there ({', '.join(shared) or 'none'})")


class Registry:
    """Components by kind and exact name."""

    def __init__(self) -> None:
        self._specs: dict[str, dict[str, ComponentSpec]] = {kind: {} for kind in KINDS}

    def add(self, kind: str, spec: ComponentSpec, distribution: str) -> None:
        if kind not in self._specs:
            raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")
        if kind in ("vision", "bridge", "llm") and spec.dims is None:
            raise ValueError(f"{distribution}: {kind} component {spec.name!r} must declare dims(config, context)")
        if isinstance(spec, ComponentSpec):
            _check_shared_keys(kind, spec, distribution)
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
