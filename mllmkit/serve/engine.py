"""The server's decoding loop: a bounded queue of requests, decoded together in batches by one thread.

Requests arrive as :class:`Job` s (prompt ids and pixels, sampling settings, stop strings, and where
to send their events). :meth:`Engine.submit` refuses a job when ``max_queue`` jobs are already
waiting (a 429 the client sees at once). One worker thread owns the model: it takes every waiting
job up to ``max_batch``, encodes their images and prompt embeddings, and decodes them together with
:func:`mllmkit.generation_batch.generate_batch` (each row with its own length, stop conditions,
sampling settings and seed), so a batch is as many requests as arrived while the previous one ran.
Each job's text is decoded incrementally and cut at its stop strings as tokens arrive; the pieces go
back to the job's event loop as :class:`Delta` events, then one :class:`Done` (or :class:`Failed`).
:meth:`Engine.stop` lets the worker finish every job already accepted before it returns.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Callable, Sequence

import attrs
import torch

from mllmkit.chat.streaming import IncrementalDecoder
from mllmkit.generation_batch import BatchRow, generate_batch
from mllmkit.generation_settings import GenerationSettings
from mllmkit.serve.errors import APIError
from mllmkit.serve.prompt import Prompt

__all__ = ["Delta", "Done", "Engine", "Failed", "Job"]

log = logging.getLogger(__name__)


@attrs.frozen
class Delta:
    """New answer text."""

    text: str


@attrs.frozen
class Done:
    """The answer is complete: its whole text (decoded at once, cut at the first stop string), why it
    ended (``stop`` or ``length``) and the token counts."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@attrs.frozen
class Failed:
    """The request could not be answered."""

    error: APIError


@attrs.define(eq=False)
class Job:
    """One request for the engine: what to decode and where its events go (an asyncio queue of ``loop``)."""

    prompt: Prompt
    max_new_tokens: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    cancelled: threading.Event = attrs.field(factory=threading.Event)
    """Set when the client has gone: the job's row ends at its next token."""

    def emit(self, event: Delta | Done | Failed) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the client's event loop is closed: nobody is listening any more
            self.cancelled.set()


class _Text:
    """A job's answer text: decoded incrementally, cut at the first stop string, held back while it may
    still be the start of one. (Streamed pieces can differ from :meth:`whole` where the tokens are
    not valid UTF-8: a replacement character is never taken back once sent.)"""

    def __init__(self, decode: Callable[[Sequence[int]], str], stops: Sequence[str]) -> None:
        self.decode = decode
        self.decoder = IncrementalDecoder(decode)
        self.stops = tuple(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token: int) -> str:
        """The text that ``token`` makes safe to send."""
        return self._add(self.decoder.push([token]))

    def whole(self) -> str:
        """The answer decoded at once and cut at its first stop string."""
        text = self.decode(self.decoder.ids)
        found = [i for i in (text.find(stop) for stop in self.stops) if i >= 0]
        return text[:min(found)] if found else text

    def finish(self) -> str:
        """The text still held back when the answer ends."""
        if not self.stopped:
            self._add(self.decoder.flush())
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece

    def _add(self, piece: str) -> str:
        start = max(0, len(self.text) - self.hold)
        self.text += piece
        found = [i for i in (self.text.find(stop, start) for stop in self.stops) if i >= 0]
        if found:
            self.text, self.stopped = self.text[:min(found)], True
        ready = len(self.text) if self.stopped else len(self.text) - self.hold
        if ready <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:ready], ready
        return piece


_STOP = object()


class Engine:
    """Owns the model; queues :class:`Job` s and decodes them in batches of up to ``max_batch`` on one thread."""

    def __init__(self, model, *, settings: GenerationSettings | None = None, system: str | None = None,
                 max_window_tokens: int = 6144, max_batch: int = 1, max_queue: int = 64) -> None:
        if max_batch < 1 or max_queue < 1:
            raise ValueError(f"max_batch and max_queue must be at least 1, found {max_batch} and {max_queue}")
        self.model = model
        self.settings = settings or GenerationSettings()
        self.system = system
        self.max_window_tokens = max_window_tokens
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.transform = model.vision.image_transform(False)
        self.device = model.llm.embedding.weight.device
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        """How many batches of each size were decoded (requests per batch)."""
        self._worker: threading.Thread | None = None
        self._closing = False

    @property
    def waiting(self) -> int:
        """Jobs accepted and not yet taken into a batch."""
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        """Queue ``job``; a full queue or a server shutting down refuses it."""
        if self._closing:
            raise APIError(503, "the server is shutting down; retry on another instance", code="shutting_down")
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise APIError(429, f"the server is busy: {self.max_queue} requests are already waiting "
                                f"(--max-queue); retry later", code="queue_full") from None

    def start(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name="mllmkit-serve-decode", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        """Refuse new jobs, finish every accepted one, then end the worker."""
        self._closing = True
        if self._worker is not None:
            self._queue.put(_STOP)
            self._worker.join()
            self._worker = None

    # -- the worker --
    def _run(self) -> None:
        while True:
            jobs = [self._queue.get()]
            while jobs[-1] is not _STOP and len(jobs) < self.max_batch:
                try:
                    jobs.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            live = [job for job in jobs if job is not _STOP and not job.cancelled.is_set()]
            if live:
                self._decode(live)
            if jobs[-1] is _STOP:
                return

    @torch.inference_mode()
    def _embed(self, prompt: Prompt) -> torch.Tensor:
        ids = torch.tensor([prompt.ids], device=self.device)
        image_embeds = self.model.encode_images(prompt.pixels.to(self.device)) if prompt.pixels is not None else None
        return self.model.embed(ids, image_embeds=image_embeds)[0]

    def _row(self, job: Job) -> tuple[BatchRow, _Text]:
        text = _Text(self.model.llm.tokenizer.decode, job.stop)
        generator = None
        if job.do_sample:
            generator = torch.Generator(device=self.device)
            if job.seed is not None:
                generator.manual_seed(job.seed)
            else:
                generator.seed()

        def on_token(token: int) -> bool:
            piece = text.push(token)
            if piece:
                job.emit(Delta(piece))
            return text.stopped or job.cancelled.is_set()

        row = BatchRow(self._embed(job.prompt), max_new_tokens=job.max_new_tokens,
                       stop_token_ids=self.model.llm.template.stop_token_ids, do_sample=job.do_sample,
                       temperature=job.temperature, top_k=job.top_k, top_p=job.top_p,
                       repetition_penalty=job.repetition_penalty, generator=generator, on_token=on_token)
        return row, text

    def _decode(self, jobs: list[Job]) -> None:
        rows, texts, ready = [], [], []
        for job in jobs:
            try:
                row, text = self._row(job)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                log.exception("preparing a request failed")
                job.emit(Failed(APIError(500, f"preparing the request failed: {exc}")))
                continue
            rows.append(row)
            texts.append(text)
            ready.append(job)
        self.batch_sizes[len(rows)] += 1
        try:
            results = generate_batch(self.model.llm, rows)
        except Exception as exc:  # noqa: BLE001 - reported to every request of the batch; the server goes on
            log.exception("decoding a batch failed")
            for job in ready:
                job.emit(Failed(APIError(500, f"generation failed: {exc}")))
            return
        for job, text, result in zip(ready, texts, results):
            tail = text.finish()
            if tail:
                job.emit(Delta(tail))
            reason = "length" if result.finish_reason == "length" else "stop"
            job.emit(Done(text.whole(), reason, len(job.prompt.ids), len(result.tokens)))
