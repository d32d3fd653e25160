"""Export of the built-in bridges: ``linear`` into ``Blip2ForConditionalGeneration.language_projection``,
``mlp`` into ``LlavaForConditionalGeneration``'s ``multi_modal_projector`` (``linear_1`` → act → ``linear_2``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from mllmkit.export.spec import ExportError, ExportSpec, Table

__all__ = ["BLIP2_TO_LINEAR", "LINEAR_TO_BLIP2", "LLAVA_TO_MLP", "MLP_TO_LLAVA", "SPECS", "linear_config",
           "mlp_config"]

LINEAR_TO_BLIP2 = Table(rules=[(r"proj\.(weight|bias)", r"language_projection.\1")])
BLIP2_TO_LINEAR = Table(rules=[(r"language_projection\.(weight|bias)", r"proj.\1")])

MLP_TO_LLAVA = Table(rules=[(r"net\.0\.(weight|bias)", r"model.multi_modal_projector.linear_1.\1"),
                            (r"net\.2\.(weight|bias)", r"model.multi_modal_projector.linear_2.\1")])
LLAVA_TO_MLP = Table(rules=[(r"model\.multi_modal_projector\.linear_1\.(weight|bias)", r"net.0.\1"),
                            (r"model\.multi_modal_projector\.linear_2\.(weight|bias)", r"net.2.\1")])

_ACTIVATIONS = {nn.GELU: "gelu", nn.SiLU: "silu", nn.ReLU: "relu"}
"""The MLP's activation module → transformers' ``ACT2FN`` name computing the same (GELU: exact erf)."""


def linear_config(bridge: Any) -> dict[str, Any]:
    """No config field of its own (widths come from the Q-Former and the LLM); Blip2's projection has a bias."""
    if bridge.proj.bias is None:
        raise ExportError("the linear bridge has bias = false, but Blip2's language_projection always has a "
                          "bias; train with bias = true to export")
    return {}


def mlp_config(bridge: Any) -> dict[str, Any]:
    """``projector_hidden_act`` and the projector bias; Llava's projector is exactly depth 2."""
    depth = (len(bridge.net) + 1) // 2
    if depth != 2:
        raise ExportError(f"the mlp bridge has depth = {depth}, but LlavaForConditionalGeneration's "
                          f"multi_modal_projector is Linear → activation → Linear (depth = 2)")
    return {"projector_hidden_act": _ACTIVATIONS[type(bridge.net[1])], "multimodal_projector_bias": True}


SPECS = [ExportSpec("linear", "bridge", "language_projection", "Linear → language_projection",
                    keys=LINEAR_TO_BLIP2, reverse=BLIP2_TO_LINEAR, config=linear_config),
         ExportSpec("mlp", "bridge", "multi_modal_projector", "MLP (depth 2) → multi_modal_projector.linear_1/linear_2",
                    keys=MLP_TO_LLAVA, reverse=LLAVA_TO_MLP, config=mlp_config)]
