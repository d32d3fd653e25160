"""Hook implementations of the vision_eva plugin: registers ``eva_vit_g`` and ``eva_tiny``."""

from __future__ import annotations

from mllmkit.export.spec import ExportSpec
from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_vision_encoders() -> list[ComponentSpec]:
    from mllmkit_vision_eva.components import SPECS

    return SPECS


@hookimpl
def mllmkit_register_exporters() -> list[ExportSpec]:
    from mllmkit_vision_eva.export import SPECS

    return SPECS
