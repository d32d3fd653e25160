"""Baichuan2's chat format and its fine-tuning label mask.

Layout (Baichuan2's ``build_chat_input``): the system text, if any, as plain text; then each user turn
is ``user_token`` (reserved id 195, ``<reserved_106>``) + text and each assistant turn
``assistant_token`` (196, ``<reserved_107>``) + answer; the generation prompt ends with
``assistant_token``. Labels follow Baichuan2's ``fine-tune.py``: answers are labelled; the
``user_token`` that follows an answer carries the label eos (the model learns to stop there without an
eos in the input); a conversation ending with an answer gets a final eos, labelled. Everything else
(system, user text, turn tokens, image placeholders) is ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mllmkit.errors import DataError
from mllmkit.template import Message, Piece, text_pieces

__all__ = ["BaichuanTemplate"]


class BaichuanTemplate:
    """Implements :class:`mllmkit.template.ChatTemplate` for Baichuan2-Chat."""

    def __init__(self, encode_plain: Callable[[str], list[int]], *, user_token_id: int, assistant_token_id: int,
                 eos_token_id: int, pad_token_id: int, image_token_id: int, default_system: str | None = None) -> None:
        self.encode_plain = encode_plain
        self.user_token_id = user_token_id
        self.assistant_token_id = assistant_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.image_token_id = image_token_id
        self.default_system = default_system
        self.stop_token_ids: tuple[int, ...] = (eos_token_id, user_token_id)

    def _text(self, text: str, tokens_per_image: int, labelled: bool) -> list[Piece]:
        return text_pieces(text, self.encode_plain, self.image_token_id, tokens_per_image, labelled=labelled)

    def pieces(self, messages: Sequence[Message], tokens_per_image: int, *, system: str | None = None,
               add_generation_prompt: bool = False) -> list[Piece]:
        messages = list(messages)
        if messages and messages[0].get("role") == "system":
            system = messages[0].get("content", "") if system is None else system
            messages = messages[1:]
        system = self.default_system if system is None else system
        out = self._text(system, tokens_per_image, labelled=False) if system else []
        after_answer = False
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content", "")
            if role == "user":
                eos_label = (self.eos_token_id,) if after_answer else None
                out.append(Piece((self.user_token_id,), label_ids=eos_label))
                out += self._text(content, tokens_per_image, labelled=False)
            elif role == "assistant":
                out.append(Piece((self.assistant_token_id,)))
                out += self._text(content, tokens_per_image, labelled=True)
            else:
                raise DataError(f"message {index}: role must be 'user' or 'assistant' (a system message may only "
                                f"come first), found {role!r}")
            after_answer = role == "assistant"
        if add_generation_prompt:
            out.append(Piece((self.assistant_token_id,)))
        elif after_answer:
            out.append(Piece((self.eos_token_id,), labelled=True))
        return out
