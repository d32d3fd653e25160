"""A conversation with a multimodal LLM: images, history window, generation, streaming.

Use it through :func:`mllmkit.chat_session`::

    import mllmkit

    session = mllmkit.chat_session("recipes/demo.toml", checkpoint="runs/demo/export", device="cpu")
    print(session.ask("What is in this picture?", images=["cat.jpg"]))
    for piece in session.stream("And what colour is it?"):   # text pieces as they are generated
        print(piece, end="", flush=True)
    session.add_image("dog.jpg")          # goes into the next question
    session.settings = session.settings.with_value("do_sample", "true")   # or GenerationSettings(...)
    session.clear_history()               # forget the turns, keep the images
    session.clear()                       # forget everything

Each image is encoded once, when it is added (``model.encode_images``), and its embeddings are
reused in every later turn. An image is written into the user turn where it was added as
:data:`~mllmkit.template.IMAGE_SPAN` (prepended, one per image, unless the question already holds
one ``<ImageHere>`` per new image). The prompt keeps as many of the latest turns as fit in
``max_window_tokens``, image tokens included; the oldest turns go first, whole, so an image span is
never cut. Generation is greedy by default; sampling (temperature, top-k, top-p), repetition penalty
and beam search come from :class:`~mllmkit.generation_settings.GenerationSettings`; answers end at the
template's stop tokens.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs
import torch

from mllmkit.chat.streaming import QueueStreamer, cut_at_stop
from mllmkit.errors import UserError
from mllmkit.generation_settings import GenerationSettings
from mllmkit.template import IMAGE_MARKER, IMAGE_SPAN, encode_pieces

__all__ = ["ChatImage", "ChatSession", "PromptTooLong", "Turn", "load_image"]


class PromptTooLong(UserError):
    """The current question (with its images) does not fit the history window."""


@attrs.define
class ChatImage:
    """An image of the session: where it came from and its embeddings ``[tokens_per_image, hidden]``."""

    source: str
    embeds: torch.Tensor


@attrs.define
class Turn:
    """One exchange: the user's text (image spans included), the images it holds, the answer."""

    user: str
    images: list[int]
    answer: str | None = None


def load_image(image: Any):
    """A PIL RGB image from a path or a PIL image; any unusable file is a :class:`UserError` naming it."""
    from mllmkit.data.images import read_image

    return read_image(image)


class ChatSession:
    """A conversation with ``model`` (an assembled :class:`~mllmkit.model.MLLM`, already placed)."""

    def __init__(self, model, *, settings: GenerationSettings | None = None, system: str | None = None,
                 max_window_tokens: int = 6144) -> None:
        self.model = model
        self.llm = model.llm
        self.template = model.llm.template
        self.tokenizer = model.llm.tokenizer
        self.settings = settings or GenerationSettings()
        self.system = system
        self.max_window_tokens = max_window_tokens
        self.images: list[ChatImage] = []
        self.turns: list[Turn] = []
        self.pending: list[int] = []
        self._transform = None
        self.last_prompt_ids: list[int] = []
        """The token ids of the latest prompt (after the history window was applied)."""
        self.last_dropped_turns = 0

    @classmethod
    def like(cls, other: ChatSession) -> ChatSession:
        """A new, empty session on the same model with the same settings (e.g. one per browser tab)."""
        return cls(other.model, settings=other.settings, system=other.system,
                   max_window_tokens=other.max_window_tokens)

    # -- state --
    @property
    def history(self) -> list[tuple[str, str]]:
        """The finished turns as (user text, answer) pairs."""
        return [(t.user, t.answer) for t in self.turns if t.answer is not None]

    @property
    def image_sources(self) -> list[str]:
        return [image.source for image in self.images]

    def clear_history(self) -> None:
        """Forget the turns but keep the images: they all go into the next question again."""
        self.turns = []
        self.pending = list(range(len(self.images)))

    def clear(self) -> None:
        """Forget the turns and the images."""
        self.turns, self.images, self.pending = [], [], []

    # -- images --
    @property
    def device(self) -> torch.device:
        return self.llm.embedding.weight.device

    def add_image(self, image: Any) -> int:
        """Read, transform and encode one image (once); it goes into the next question. Returns its index."""
        picture = load_image(image)
        if self._transform is None:
            self._transform = self.model.vision.image_transform(False)
        pixels = self._transform(picture).unsqueeze(0).to(self.device)
        with torch.inference_mode():
            embeds = self.model.encode_images(pixels)[0]
        source = str(image) if not hasattr(image, "size") else f"<image {len(self.images)}>"
        self.images.append(ChatImage(source=source, embeds=embeds))
        self.pending.append(len(self.images) - 1)
        return len(self.images) - 1

    # -- prompt --
    def _user_text(self, text: str, new_images: Sequence[int]) -> str:
        markers = text.count(IMAGE_MARKER)
        if markers == 0:
            return IMAGE_SPAN * len(new_images) + text
        if markers != len(new_images):
            raise UserError(f"the question has {markers} {IMAGE_MARKER} marker(s) but {len(new_images)} new "
                            f"image(s); use one marker per new image, or none to put them first")
        return text

    def _messages(self, turns: Sequence[Turn]) -> list[dict]:
        messages = []
        for turn in turns:
            messages.append({"role": "user", "content": turn.user})
            if turn.answer is not None:
                messages.append({"role": "assistant", "content": turn.answer})
        return messages

    def _encode(self, turns: Sequence[Turn]) -> list[int]:
        system = self.system if self.system is not None else self.template.default_system
        pieces = self.template.pieces(self._messages(turns), self.model.tokens_per_image, system=system,
                                      add_generation_prompt=True)
        return encode_pieces(pieces).input_ids

    def _window_limit(self) -> int:
        limit = self.max_window_tokens
        max_positions = getattr(self.llm, "max_positions", None)
        if max_positions:
            limit = min(limit, max_positions - 1)
        return limit

    def build_prompt(self, turns: Sequence[Turn]) -> tuple[list[int], list[int], int]:
        """Ids of the latest turns that fit the window, the images they hold, and how many turns were dropped."""
        limit = self._window_limit()
        for dropped in range(len(turns)):
            kept = turns[dropped:]
            ids = self._encode(kept)
            if len(ids) <= limit:
                return ids, [i for t in kept for i in t.images], dropped
        raise PromptTooLong(f"the question and its {len(turns[-1].images)} image(s) need {len(ids)} tokens, "
                            f"more than the history window of {limit} tokens (max_window_tokens; image "
                            f"tokens count); ask a shorter question or raise chat.max_window_tokens")

    def _inputs(self, text: str, images: Iterable[Any]) -> tuple[Turn, torch.Tensor, torch.Tensor, int]:
        for image in images:
            self.add_image(image)
        turn = Turn(user=self._user_text(text, self.pending), images=list(self.pending))
        ids, image_indices, dropped = self.build_prompt([*self.turns, turn])
        self.last_prompt_ids, self.last_dropped_turns = ids, dropped
        input_ids = torch.tensor([ids], device=self.device)
        image_embeds = (torch.stack([self.images[i].embeds for i in image_indices]) if image_indices else None)
        with torch.inference_mode():
            embeds = self.model.embed(input_ids, image_embeds=image_embeds)
        max_new = self.settings.max_new_tokens
        max_positions = getattr(self.llm, "max_positions", None)
        if max_positions:
            max_new = min(max_new, max_positions - len(ids))
        return turn, embeds, torch.ones_like(input_ids), max_new

    def _generation_config(self, max_new_tokens: int):
        from transformers import GenerationConfig

        s = self.settings
        options: dict[str, Any] = {
            "max_new_tokens": max_new_tokens, "do_sample": s.do_sample, "num_beams": s.num_beams,
            "repetition_penalty": s.repetition_penalty, "eos_token_id": list(self.template.stop_token_ids),
            "pad_token_id": self.template.pad_token_id, "use_cache": True,
        }
        if s.do_sample:
            options.update(temperature=s.temperature, top_k=s.top_k or None, top_p=s.top_p)
        else:
            options.update(temperature=None, top_k=None, top_p=None)
        return GenerationConfig(**options)

    def _seed(self) -> None:
        if self.settings.seed is not None:
            torch.manual_seed(self.settings.seed)

    def _finish(self, turn: Turn, answer: str) -> None:
        turn.answer = answer.strip()  # as Qwen's chat keeps it: its decode strips the answer before the history
        self.turns.append(turn)
        self.pending = []

    # -- asking --
    def _decode(self, embeds: torch.Tensor, mask: torch.Tensor, max_new: int,
                streamer: QueueStreamer | None = None) -> list[int]:
        """Answer ids: beam search through transformers ``generate``; greedy and sampling through
        :mod:`mllmkit.generation` (static KV cache, a CUDA-graph decode step on GPUs)."""
        from mllmkit.generation import decoder_for, generate

        s = self.settings
        with torch.inference_mode():
            if s.num_beams > 1:
                out = self.llm.hf_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                                 generation_config=self._generation_config(max_new))
                return cut_at_stop(out[0].tolist(), self.template.stop_token_ids)
            if s.compile_decode:
                decoder_for(self.llm, embeds.shape[1] + max_new, compile=True)
            return generate(self.llm, embeds, mask, max_new_tokens=max_new,
                            stop_token_ids=self.template.stop_token_ids, do_sample=s.do_sample,
                            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                            repetition_penalty=s.repetition_penalty,
                            on_token=streamer.token if streamer is not None else None)

    def ask(self, text: str, images: Iterable[Any] = ()) -> str:
        """Add ``images`` (paths or PIL images), ask ``text``, return the whole answer as the history keeps
        it (stripped of surrounding whitespace)."""
        turn, embeds, mask, max_new = self._inputs(text, images)
        self._seed()
        self._finish(turn, self.tokenizer.decode(self._decode(embeds, mask, max_new)))
        return turn.answer

    def stream(self, text: str, images: Iterable[Any] = ()) -> Iterator[str]:
        """Like :meth:`ask`, yielding the answer's text as it is generated (beam search: in one piece).

        The turn enters the history when the stream ends (also if it is closed early, with the text so far).
        """
        if self.settings.num_beams > 1:
            yield self.ask(text, images)
            return
        turn, embeds, mask, max_new = self._inputs(text, images)
        streamer = QueueStreamer(self.tokenizer.decode, self.template.stop_token_ids)
        self._seed()

        def work() -> None:
            try:
                self._decode(embeds, mask, max_new, streamer)
                streamer.end()
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer, re-raised there
                streamer.fail(exc)

        worker = threading.Thread(target=work, name="mllmkit-generate", daemon=True)
        worker.start()
        try:
            yield from streamer
        finally:
            streamer.cancel()  # a consumer that stopped early stops the generation too
            worker.join()
            self._finish(turn, streamer.decoder.emitted)
