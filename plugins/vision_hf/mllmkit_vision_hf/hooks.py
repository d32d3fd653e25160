"""Hook implementations of the vision_hf plugin: registers the CLIP and SigLIP encoders, their tiny presets
and their export to ``LlavaForConditionalGeneration``."""

from __future__ import annotations

from mllmkit.export.spec import ExportSpec
from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_vision_encoders() -> list[ComponentSpec]:
    from mllmkit_vision_hf.components import SPECS

    return SPECS


@hookimpl
def mllmkit_register_exporters() -> list[ExportSpec]:
    from mllmkit_vision_hf.export import SPECS

    return SPECS
