"""Hook implementations of the ``bridge_qformer`` plugin: registers ``qformer`` and ``qformer_tiny``."""

from __future__ import annotations

from mllmkit.export.spec import ExportSpec
from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_bridges() -> list[ComponentSpec]:
    from mllmkit_bridge_qformer.component import SPECS

    return SPECS


@hookimpl
def mllmkit_register_exporters() -> list[ExportSpec]:
    from mllmkit_bridge_qformer.export import SPECS

    return SPECS
