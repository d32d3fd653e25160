"""Registration of the ``zero`` and ``pipeline`` parallel backends."""

from __future__ import annotations

from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def mllmkit_register_parallel_backends() -> list[ComponentSpec]:
    from mllmkit_parallel_deepspeed.specs import SPECS

    return SPECS
