"""Export of the built-in ``linear`` bridge into ``Blip2ForConditionalGeneration.language_projection``."""

from __future__ import annotations

from typing import Any

from mllmkit.export.spec import ExportError, ExportSpec, Table

__all__ = ["LINEAR_TO_BLIP2", "BLIP2_TO_LINEAR", "SPECS", "linear_config"]

LINEAR_TO_BLIP2 = Table(rules=[(r"proj\.(weight|bias)", r"language_projection.\1")])
BLIP2_TO_LINEAR = Table(rules=[(r"language_projection\.(weight|bias)", r"proj.\1")])


def linear_config(bridge: Any) -> dict[str, Any]:
    """No config field of its own (widths come from the Q-Former and the LLM); Blip2's projection has a bias."""
    if bridge.proj.bias is None:
        raise ExportError("the linear bridge has bias = false, but Blip2's language_projection always has a "
                          "bias; train with bias = true to export")
    return {}


SPECS = [ExportSpec("linear", "bridge", "language_projection", "Linear → language_projection",
                    keys=LINEAR_TO_BLIP2, reverse=BLIP2_TO_LINEAR, config=linear_config)]
