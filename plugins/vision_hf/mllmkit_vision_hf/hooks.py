"""Hook implementations of the vision_hf plugin: registers the CLIP and SigLIP encoders and their tiny presets."""

from __future__ import annotations

from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_vision_encoders() -> list[ComponentSpec]:
    from mllmkit_vision_hf.components import SPECS

    return SPECS
