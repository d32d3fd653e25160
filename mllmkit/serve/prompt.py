"""A request's messages as prompt ids and image pixels, built by the chat session's prompt code.

:func:`build_prompt` groups OpenAI messages into :class:`~mllmkit.chat.session.Turn` s (leading
``system``/``developer`` messages are the system prompt; user messages, with their text and
``image_url`` parts in order, each followed by an optional assistant answer) and lets
:meth:`ChatSession.build_prompt <mllmkit.chat.session.ChatSession.build_prompt>` render them with the
LLM's template and history window. Every image part becomes one
:data:`~mllmkit.template.IMAGE_SPAN`; an ``<ImageHere>`` the client wrote as text stays text (its
characters are encoded as plain text, never an image slot), so the image slots are exactly the
image parts.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch

from mllmkit.chat.session import ChatSession, Turn
from mllmkit.serve.errors import APIError
from mllmkit.serve.images import ImageLimits, read_image_url
from mllmkit.serve.schema import ImagePart, Message
from mllmkit.template import IMAGE_MARKER, IMAGE_SPAN, Piece, encode_pieces

__all__ = ["Prompt", "build_prompt"]


@attrs.frozen
class Prompt:
    """Token ids of a request's prompt and the ``[n, 3, H, W]`` pixels of the images they hold (or None)."""

    ids: list[int]
    pixels: torch.Tensor | None


@attrs.define
class _Turn(Turn):
    """A turn and, for each ``<ImageHere>`` in its user text then its answer, whether it is an image part."""

    markers: tuple[bool, ...] = ()


class _PromptSession(ChatSession):
    """The chat session's prompt building, with client-written ``<ImageHere>`` kept as plain text."""

    def _encode(self, turns: Sequence[_Turn]) -> list[int]:
        system = self.system if self.system is not None else self.template.default_system
        pieces = self.template.pieces(self._messages(turns), self.model.tokens_per_image, system=system,
                                      add_generation_prompt=True)
        real = [flag for turn in turns for flag in turn.markers]
        slots = [i for i, piece in enumerate(pieces) if piece.image]
        # A template that splits the system prompt on <ImageHere> puts its (literal) markers first.
        from_system = len(slots) - len(real)
        if from_system not in (0, (system or "").count(IMAGE_MARKER)):
            raise RuntimeError(f"the template made {len(slots)} image spans of {len(real)} markers in the messages")
        literal = tuple(self.tokenizer.encode(IMAGE_MARKER))
        pieces = list(pieces)
        for index, is_image in zip(slots, [False] * from_system + real):
            if not is_image:
                pieces[index] = Piece(literal, labelled=pieces[index].labelled)
        return encode_pieces(pieces).input_ids


def _text(content: str | list, param: str) -> str:
    if isinstance(content, str):
        return content
    if any(isinstance(part, ImagePart) for part in content):
        raise APIError(400, f"{param}: only user messages may hold images", param=param)
    return "\n".join(part.text for part in content)


def _user(content: str | list, param: str, images: list, limits: ImageLimits) -> tuple[str, list[int], list[bool]]:
    """User text with an image span per image part, the request-wide indices of its images, marker flags."""
    if isinstance(content, str):
        return content, [], [False] * content.count(IMAGE_MARKER)
    text, indices, markers, after_text = "", [], [], False
    for j, part in enumerate(content):
        if isinstance(part, ImagePart):
            if len(images) >= limits.max_images:
                raise APIError(400, f"{param}: more than this server's limit of {limits.max_images} images in one "
                                    f"request", param=param, code="too_many_images")
            images.append((part.image_url.url, f"{param}[{j}].image_url.url"))
            indices.append(len(images) - 1)
            text, markers, after_text = text + IMAGE_SPAN, markers + [True], False
        else:
            text += ("\n" if after_text else "") + part.text
            markers += [False] * part.text.count(IMAGE_MARKER)
            after_text = True
    return text, indices, markers


def _turns(messages: Sequence[Message], limits: ImageLimits) -> tuple[str | None, list[_Turn], list]:
    system: list[str] = []
    turns: list[_Turn] = []
    images: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        param = f"messages[{i}].content"
        if message.role in ("system", "developer"):
            if turns:
                raise APIError(400, f"messages[{i}]: a {message.role} message may only come before the first user "
                                    f"message", param=f"messages[{i}].role")
            system.append(_text(message.content, param))
        elif message.role == "user":
            text, indices, markers = _user(message.content, param, images, limits)
            if turns and turns[-1].answer is None:  # consecutive user messages: one turn
                last = turns[-1]
                last.user, last.images, last.markers = last.user + "\n" + text, last.images + indices, \
                    last.markers + tuple(markers)
            else:
                turns.append(_Turn(user=text, images=indices, markers=tuple(markers)))
        else:
            if not turns:
                raise APIError(400, f"messages[{i}]: an assistant message must follow a user message",
                               param=f"messages[{i}].role")
            answer = _text(message.content, param)
            last = turns[-1]
            last.answer = answer if last.answer is None else last.answer + "\n" + answer
            last.markers += (False,) * answer.count(IMAGE_MARKER)
    if not turns or turns[-1].answer is not None:
        raise APIError(400, "the last message must be from the user", param="messages")
    return ("\n".join(system) if system else None), turns, images


def build_prompt(model, messages: Sequence[Message], *, system: str | None, max_window_tokens: int,
                 limits: ImageLimits, transform) -> Prompt:
    """The prompt of ``messages`` for ``model``: ids within the history window (oldest turns dropped
    first) and the pixels (``transform`` applied) of the images the kept turns hold."""
    from mllmkit.chat.session import PromptTooLong

    asked_system, turns, images = _turns(messages, limits)
    session = _PromptSession(model, system=asked_system if asked_system is not None else system,
                             max_window_tokens=max_window_tokens)
    try:
        ids, kept, _ = session.build_prompt(turns)
    except PromptTooLong as exc:
        raise APIError(400, str(exc).replace("raise chat.max_window_tokens",
                                                   "start the server with --set chat.max_window_tokens=N"), param="messages",
                       code="context_length_exceeded") from None
    pictures = [read_image_url(images[i][0], limits, images[i][1]) for i in kept]
    pixels = torch.stack([transform(picture) for picture in pictures]) if pictures else None
    return Prompt(ids=ids, pixels=pixels)
