"""The core's own plugin: built-in bridges, datasets and parallel backends (``single``, ``ddp``, ``zero``, ``fsdp``),
registered like any other."""

from __future__ import annotations

from mllmkit.export.spec import ExportSpec
from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_bridges() -> list[ComponentSpec]:
    from mllmkit.builtin.projection_bridges import SPECS

    return SPECS


@hookimpl
def mllmkit_register_datasets() -> list[ComponentSpec]:
    from mllmkit.builtin import datasets, demo_shapes

    return [*datasets.SPECS, *demo_shapes.SPECS]


@hookimpl
def mllmkit_register_parallel_backends() -> list[ComponentSpec]:
    from mllmkit.builtin import backends, fsdp, zero

    return [*backends.SPECS, *zero.SPECS, *fsdp.SPECS]


@hookimpl
def mllmkit_register_exporters() -> list[ExportSpec]:
    from mllmkit.builtin.export import SPECS

    return SPECS


@hookimpl
def mllmkit_register_eval_tasks() -> list[ComponentSpec]:
    from mllmkit.eval.tasks import SPECS

    return SPECS
