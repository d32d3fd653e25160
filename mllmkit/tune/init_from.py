"""``[model] init_from``: start a run (or a chat) from an earlier run's export, by parameter name.

Stage 1 trains the projector and exports it; stage 2 names that export in ``init_from`` and trains
more (the LLM, fully or through LoRA). The export's tensors are loaded over the freshly assembled model
strictly: every key must name one of its tensors with the same shape (the seed's ``llm_proj.*`` goes to
the projection bridge, as chat reads it), else the run stops before training with the key named.
"""

from __future__ import annotations

import pathlib

from torch import nn

from mllmkit.errors import RecipeError
from mllmkit.weights import WeightsError

__all__ = ["load_init_from"]


def load_init_from(model: nn.Module, source: pathlib.Path, recipe_path: pathlib.Path | None = None) -> list[str]:
    """Load ``source`` (an export folder or any checkpoint chat reads) into ``model``; returns the names loaded."""
    from mllmkit.chat.loading import load_trained_weights

    try:
        return load_trained_weights(model, source)
    except WeightsError as exc:
        raise RecipeError("model.init_from", f"{exc} (starting from an earlier run needs the same parts, names "
                                             f"and shapes)").with_file(str(recipe_path or "<recipe>")) from None
