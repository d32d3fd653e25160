"""Conversations to token ids and label masks, shared by every LLM plugin's chat template.

A template plugin turns a conversation into :class:`Piece` objects (token ids, whether they are
labelled, whether they are an image span); :func:`encode_pieces` joins them, truncates without ever
cutting an image span, and builds labels (``IGNORE_INDEX`` where unlabelled). Image positions in
message text are marked with :data:`IMAGE_MARKER`; :func:`text_pieces` splits text on it, encodes
the text as plain text (special-token strings stay text) and puts ``tokens_per_image`` copies of
the image placeholder id in each marker's place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import attrs

from mllmkit.errors import DataError

__all__ = [
    "IGNORE_INDEX", "IMAGE_MARKER", "IMAGE_SPAN", "Message", "Piece", "Encoded", "ChatTemplate",
    "SampleTooLong", "text_pieces", "encode_pieces",
]

IGNORE_INDEX = -100
IMAGE_MARKER = "<ImageHere>"
IMAGE_SPAN = "<Img><ImageHere></Img>"
"""How an image is written into user text (MiniGPT4Qwen's convention)."""

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}


@attrs.frozen
class Piece:
    """A run of token ids: labelled (trained on) or not; ``image`` marks one image's placeholders.

    ``label_ids`` (same length as ``ids``) gives explicit labels where they differ from the ids, e.g.
    Baichuan's fine-tuning labels the user token that follows an answer with eos.
    """

    ids: tuple[int, ...]
    labelled: bool = False
    image: bool = False
    label_ids: tuple[int, ...] | None = attrs.field(default=None)

    @label_ids.validator
    def _same_length(self, attribute: attrs.Attribute, value: tuple[int, ...] | None) -> None:
        if value is not None and len(value) != len(self.ids):
            raise ValueError(f"label_ids has {len(value)} entries for {len(self.ids)} ids")

    def labels(self) -> list[int]:
        """This piece's labels: ``label_ids``, else the ids when labelled, else IGNORE_INDEX."""
        if self.label_ids is not None:
            return list(self.label_ids)
        return list(self.ids) if self.labelled else [IGNORE_INDEX] * len(self.ids)


@attrs.frozen
class Encoded:
    """One encoded conversation: ids, labels (IGNORE_INDEX where not trained) and its image count."""

    input_ids: list[int]
    labels: list[int]
    num_images: int


class SampleTooLong(DataError):
    """The conversation cannot be cut to the length limit without dropping an image span."""


class ChatTemplate(Protocol):
    """What an LLM plugin's chat template provides."""

    image_token_id: int
    pad_token_id: int
    stop_token_ids: tuple[int, ...]
    default_system: str | None

    def pieces(self, messages: Sequence[Message], tokens_per_image: int, *, system: str | None = None,
               add_generation_prompt: bool = False) -> list[Piece]:
        """The conversation as pieces; with ``add_generation_prompt`` it ends with the assistant header."""


def text_pieces(text: str, encode_plain: Callable[[str], list[int]], image_token_id: int,
                tokens_per_image: int, labelled: bool = False) -> list[Piece]:
    """Split ``text`` on IMAGE_MARKER into plain-text pieces and image-placeholder pieces."""
    pieces: list[Piece] = []
    for i, chunk in enumerate(text.split(IMAGE_MARKER)):
        if i > 0:
            pieces.append(Piece((image_token_id,) * tokens_per_image, labelled=False, image=True))
        if chunk:
            pieces.append(Piece(tuple(encode_plain(chunk)), labelled=labelled))
    return pieces


def encode_pieces(pieces: Sequence[Piece], max_len: int | None = None) -> Encoded:
    """Join pieces into ids and labels, cutting at ``max_len`` but never through or past an image span."""
    input_ids: list[int] = []
    labels: list[int] = []
    num_images = 0
    for index, piece in enumerate(pieces):
        if max_len is not None and len(input_ids) + len(piece.ids) > max_len:
            if piece.image or any(p.image for p in pieces[index + 1:]):
                raise SampleTooLong(
                    f"conversation needs more than max_text_len={max_len} tokens to keep its image spans whole"
                )
            room = max_len - len(input_ids)
            input_ids.extend(piece.ids[:room])
            labels.extend(piece.labels()[:room])
            break
        input_ids.extend(piece.ids)
        labels.extend(piece.labels())
        num_images += piece.image
    return Encoded(input_ids=input_ids, labels=labels, num_images=num_images)
