"""Chatting with an assembled model: :class:`ChatSession`, the ``mllmkit chat`` REPL, the web UI.

``mllmkit.chat_session(recipe, checkpoint=..., device=...)`` is the one-call entry point; see
:mod:`mllmkit.chat.session` for the session API (``ask``, ``stream``, ``add_image``, history).
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable
from typing import Any

from mllmkit.chat.session import ChatSession
from mllmkit.generation_settings import GenerationSettings

__all__ = ["ChatSession", "GenerationSettings", "chat_session"]


def chat_session(recipe: Any, *, checkpoint: str | pathlib.Path | None = None, device: str | None = None,
                 precision: str | None = None, overrides: Iterable[str] = (), system: str | None = None,
                 **settings: Any) -> ChatSession:
    """A :class:`ChatSession` on the recipe's model.

    ``recipe``: a recipe file, dict, loaded Recipe, or an mllmkit export folder (its recipe.toml and
    weights). ``checkpoint``: trained weights (export folder, trainable.safetensors, or the seed's
    checkpoint_N.pth / model.pth / mp_rank_00_model_states.pt); default ``chat.checkpoint``.
    ``device``: ``cpu``, ``cuda`` or ``auto``; ``precision``: ``fp32``, ``bf16`` or ``fp16`` (defaults
    from the recipe's ``[chat]``). Keyword ``settings`` override generation settings
    (``max_new_tokens=64, do_sample=True, temperature=0.7, top_k=…, top_p=…, repetition_penalty=…,
    num_beams=…, seed=…``)::

        session = mllmkit.chat_session("recipes/demo.toml", checkpoint="runs/demo/export", device="cpu")
        answer = session.ask("Describe the image.", images=["photo.jpg"])
        for piece in session.stream("What colour is it?"):
            print(piece, end="", flush=True)
    """
    from mllmkit.chat.loading import load_chat_model

    model, loaded = load_chat_model(recipe, checkpoint=checkpoint, device=device, precision=precision,
                                    overrides=overrides)
    generation = GenerationSettings.from_chat_section(loaded.chat)
    for name, value in settings.items():
        generation = generation.with_value(name, value)
    return ChatSession(model, settings=generation, system=system if system is not None else loaded.chat.system,
                       max_window_tokens=loaded.chat.max_window_tokens)
