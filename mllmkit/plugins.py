"""Plugin discovery: entry points of group ``mllmkit`` into a pluggy manager and a registry.

Nothing is loaded at import time. ``get_plugin_host()`` loads every entry point (the core's own
built-ins included, registered the same way as third-party plugins), honours ``MLLMKIT_PLUGINS``
(comma-separated entry-point names to load, nothing else) and ``MLLMKIT_TRACE_PLUGINS=1`` (print
every hook call), reports plugins that fail to import without stopping the others, stops start-up
naming the plugin when it implements a hook the contract does not define (pluggy's
``check_pending``), and collects every registered component into a :class:`~mllmkit.registry.Registry`.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Iterable
from importlib import metadata

import attrs
import pluggy

from mllmkit import hookspecs
from mllmkit.errors import UserError
from mllmkit.registry import Registry

__all__ = ["PluginInfo", "BrokenPlugin", "PluginHost", "UnknownHookError", "get_plugin_host", "reset_plugin_host",
           "ENTRY_POINT_GROUP"]

ENTRY_POINT_GROUP = "mllmkit"


@attrs.frozen
class PluginInfo:
    """A loaded plugin: entry-point name, its distribution and version."""

    name: str
    distribution: str
    version: str


@attrs.frozen
class BrokenPlugin:
    """A plugin whose module failed to import or register; the message says why."""

    name: str
    distribution: str
    error: str


@attrs.define
class PluginHost:
    """The plugin manager, the registry built from it, and what loaded or failed."""

    manager: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]
    broken: list[BrokenPlugin]

    def warn_broken(self, stream=sys.stderr) -> None:
        for plugin in self.broken:
            print(f"mllmkit: plugin {plugin.name!r} ({plugin.distribution}) failed to load: {plugin.error}",
                  file=stream)


_HOST: PluginHost | None = None


def _allowlist() -> set[str] | None:
    raw = os.environ.get("MLLMKIT_PLUGINS", "").strip()
    return {name.strip() for name in raw.split(",") if name.strip()} if raw else None


def _entry_points() -> Iterable[metadata.EntryPoint]:
    return sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def build_plugin_host(entry_points: Iterable[metadata.EntryPoint] | None = None,
                      extra_plugins: Iterable[tuple[str, object]] = ()) -> PluginHost:
    """Load plugins into a fresh manager. ``extra_plugins`` are (name, module) pairs registered directly."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    if os.environ.get("MLLMKIT_TRACE_PLUGINS") == "1":
        manager.trace.root.setwriter(lambda message: print(message, end="", file=sys.stderr))
        manager.enable_tracing()
    allow = _allowlist()
    plugins: list[PluginInfo] = []
    broken: list[BrokenPlugin] = []
    sources: list[tuple[str, str, str, object]] = []
    for ep in entry_points if entry_points is not None else _entry_points():
        if allow is not None and ep.name not in allow:
            continue
        dist = ep.dist.name if ep.dist else "?"
        version = ep.dist.version if ep.dist else "?"
        try:
            module = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            broken.append(BrokenPlugin(ep.name, dist, _one_line(exc)))
            continue
        sources.append((ep.name, dist, version, module))
    for name, module in extra_plugins:
        sources.append((name, name, "local", module))

    registry = Registry()
    for name, dist, version, module in sources:
        try:
            manager.register(module, name=name)
        except Exception as exc:
            broken.append(BrokenPlugin(name, dist, _one_line(exc)))
            continue
        _check_hook_names(manager, module, dist)
        plugins.append(PluginInfo(name, dist, version))

    loaded = [manager.get_plugin(info.name) for info in plugins]
    for info, module in zip(plugins, loaded):
        others = [other for other in loaded if other is not module]
        for hook_name, kind in hookspecs.HOOK_KINDS.items():
            caller = manager.subset_hook_caller(hook_name, remove_plugins=others)
            try:
                results = caller()
            except Exception as exc:
                broken.append(BrokenPlugin(info.name, info.distribution, f"{hook_name} raised {_one_line(exc)}"))
                continue
            for specs in results:
                for spec in specs or []:
                    registry.add(kind, spec, distribution=info.distribution)
    return PluginHost(manager=manager, registry=registry, plugins=plugins, broken=broken)


class UnknownHookError(UserError):
    """A plugin implements a hook the contract does not define (most often a misspelled name)."""


def _check_hook_names(manager: pluggy.PluginManager, module: object, distribution: str) -> None:
    """pluggy's ``check_pending`` for one plugin: every hook implementation must match a hookspec."""
    try:
        manager.check_pending()
    except pluggy.PluginValidationError as exc:
        manager.unregister(module)
        known = ", ".join(sorted(n for n in vars(hookspecs) if n.startswith("mllmkit_")))
        raise UnknownHookError(f"plugin {distribution!r}: {exc.args[0].split(' in plugin ')[0]} is not a hook of "
                               f"mllmkit (misspelled?). The hooks are: {known}") from None


def get_plugin_host() -> PluginHost:
    """The process-wide plugin host, built on first use."""
    global _HOST
    if _HOST is None:
        _HOST = build_plugin_host()
    return _HOST


def reset_plugin_host(host: PluginHost | None = None) -> None:
    """Forget (or replace) the process-wide host; tests use this for a fresh manager."""
    global _HOST
    _HOST = host


def _one_line(exc: BaseException) -> str:
    last = traceback.extract_tb(exc.__traceback__)[-1:] if exc.__traceback__ else []
    where = f" (at {last[0].filename}:{last[0].lineno})" if last else ""
    return f"{type(exc).__name__}: {exc}{where}"
