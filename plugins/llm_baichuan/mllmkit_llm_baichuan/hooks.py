"""Hook implementations of the llm_baichuan plugin: registers ``baichuan2`` and ``baichuan2_tiny``."""

from __future__ import annotations

from mllmkit.export.spec import ExportSpec
from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_llms() -> list[ComponentSpec]:
    from mllmkit_llm_baichuan.components import SPECS

    return SPECS


@hookimpl
def mllmkit_register_exporters() -> list[ExportSpec]:
    from mllmkit_llm_baichuan.export import SPECS

    return SPECS
