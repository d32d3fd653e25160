"""The ChatML chat template exactly as MiniGPT4Qwen trains and chats (its ``finetune`` preprocessing).

Layout: ``<|im_start|>`` "system" "\\n" system ``<|im_end|>`` "\\n", then per turn ``<|im_start|>``
"user" "\\n" content ``<|im_end|>`` "\\n" / ``<|im_start|>`` "assistant" "\\n" answer ``<|im_end|>``
"\\n"; the generation prompt ends with ``<|im_start|>`` "assistant" "\\n". Each fragment is encoded
on its own, as Qwen's finetune script does. Labels: in system and user blocks only ``<|im_start|>``,
``<|im_end|>`` and the trailing "\\n"; in assistant blocks ``<|im_start|>``, the answer, ``<|im_end|>``
and "\\n" (not "assistant\\n"). A first message (after an optional system message) that is not from
the user is dropped, as the seed does. Image markers in text become ``tokens_per_image`` copies of
the image placeholder (via :func:`mllmkit.template.text_pieces`); user text is always plain text.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from mllmkit.errors import DataError
from mllmkit.template import Message, Piece, text_pieces

__all__ = ["DEFAULT_SYSTEM", "ChatMLTemplate"]

DEFAULT_SYSTEM = "You are a helpful assistant."


class ChatMLTemplate:
    """ChatML with Qwen's label mask; implements :class:`mllmkit.template.ChatTemplate`."""

    def __init__(self, encode_plain: Callable[[str], list[int]], *, im_start_id: int, im_end_id: int,
                 image_token_id: int, pad_token_id: int, default_system: str | None = DEFAULT_SYSTEM) -> None:
        self.encode_plain = encode_plain
        self.im_start_id = im_start_id
        self.im_end_id = im_end_id
        self.image_token_id = image_token_id
        self.pad_token_id = pad_token_id
        self.stop_token_ids: tuple[int, ...] = (im_end_id, im_start_id)
        self.default_system = default_system
        self._nl = tuple(encode_plain("\n"))

    def _header(self, role: str) -> list[Piece]:
        """``<|im_start|>`` (labelled) then the role word and "\\n" (never labelled)."""
        return [Piece((self.im_start_id,), labelled=True), Piece(tuple(self.encode_plain(role)) + self._nl)]

    def _footer(self) -> Piece:
        return Piece((self.im_end_id,) + self._nl, labelled=True)

    def pieces(self, messages: Sequence[Message], tokens_per_image: int, *, system: str | None = None,
               add_generation_prompt: bool = False) -> list[Piece]:
        messages = list(messages)
        if messages and messages[0].get("role") == "system":
            if system is None:
                system = messages[0].get("content", "")
            messages = messages[1:]
        if system is None:
            system = self.default_system or ""
        if messages and messages[0].get("role") != "user":
            messages = messages[1:]  # the seed drops a leading non-user message
        out = self._header("system")
        if system:
            out.append(Piece(tuple(self.encode_plain(system))))
        out.append(self._footer())
        for index, message in enumerate(messages):
            role = message.get("role")
            if role not in ("user", "assistant"):
                raise DataError(f"message {index}: role must be 'user' or 'assistant' after the first "
                                f"message, found {role!r}")
            answer = role == "assistant"
            out += self._header(role)
            out += text_pieces(message.get("content", ""), self.encode_plain, self.image_token_id,
                               tokens_per_image, labelled=answer)
            out.append(self._footer())
        if add_generation_prompt:
            out += self._header("assistant")
        return out
