"""Hook implementations of the llm_qwen plugin: registers ``qwen`` (and its preset aliases)."""

from __future__ import annotations

from mllmkit.export.spec import ExportSpec
from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_llms() -> list[ComponentSpec]:
    from mllmkit_llm_qwen.components import SPECS

    return SPECS


@hookimpl
def mllmkit_register_exporters() -> list[ExportSpec]:
    from mllmkit_llm_qwen.export import SPECS

    return SPECS
