"""Registration of the ``pipeline`` parallel backend (DeepSpeed is imported at setup only)."""

from __future__ import annotations

from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_parallel_backends() -> list[ComponentSpec]:
    from mllmkit_parallel_pipeline.pipeline import SPECS

    return SPECS
