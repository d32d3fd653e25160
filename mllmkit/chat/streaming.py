"""Token-by-token text from ``generate``: a streamer that decodes incrementally with any tokenizer.

transformers' ``TextIteratorStreamer`` needs a HF tokenizer; mllmkit tokenizers only promise
``decode(ids)``. :class:`IncrementalDecoder` turns a growing list of ids into new text pieces,
holding back a trailing replacement character (a multi-byte UTF-8 character split across tokens)
until the next token completes it. Only the last one waits: UTF-8 decoding with replacement turns an
unfinished sequence at the end into exactly one U+FFFD, so any before it stand for invalid bytes that
no later token can change (a model emitting byte tokens that never form characters still streams). :class:`QueueStreamer` takes the tokens the generation thread
hands to its ``on_token`` callback and queues text pieces for the consumer; it stops at the first
stop token.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence

__all__ = ["IncrementalDecoder", "QueueStreamer", "cut_at_stop"]

_REPLACEMENT = "\ufffd"


def cut_at_stop(ids: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
    """The ids before the first stop token."""
    out = []
    for token in ids:
        if token in stop_ids:
            break
        out.append(int(token))
    return out


class IncrementalDecoder:
    """Feed ids one at a time, get the text they add (complete characters only until :meth:`flush`)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self._decode = decode
        self.ids: list[int] = []
        self.emitted = ""

    def push(self, token_ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in token_ids)
        text = self._decode(self.ids)
        return self._emit(text[:-1] if text.endswith(_REPLACEMENT) else text)

    def flush(self) -> str:
        return self._emit(self._decode(self.ids))

    def _emit(self, text: str) -> str:
        if not text.startswith(self.emitted) or len(text) <= len(self.emitted):
            return ""
        piece = text[len(self.emitted):]
        self.emitted = text
        return piece


class QueueStreamer:
    """Tokens from :func:`mllmkit.generation.generate`'s ``on_token`` → queued text pieces (stops at stop ids)."""

    _DONE = object()

    def __init__(self, decode: Callable[[Sequence[int]], str], stop_ids: Sequence[int]) -> None:
        self.decoder = IncrementalDecoder(decode)
        self.stop_ids = {int(i) for i in stop_ids}
        self.queue: queue.Queue = queue.Queue()
        self._stopped = False
        self._cancel = threading.Event()

    def cancel(self) -> None:
        self._cancel.set()

    # -- called by the generation (worker thread) --
    def token(self, token_id: int) -> bool:
        """An ``on_token`` callback for :func:`mllmkit.generation.generate`; True asks it to stop."""
        if not self._stopped:
            self._push([int(token_id)])
        return self._cancel.is_set()

    def _push(self, ids: list[int]) -> None:
        kept = cut_at_stop(ids, self.stop_ids)
        self._stopped = len(kept) < len(ids)
        piece = self.decoder.push(kept) if kept else ""
        if piece:
            self.queue.put(piece)

    def end(self) -> None:
        piece = self.decoder.flush()
        if piece:
            self.queue.put(piece)
        self.queue.put(self._DONE)

    # -- called by the consumer --
    def fail(self, exc: BaseException) -> None:
        self.queue.put(exc)

    def __iter__(self) -> Iterator[str]:
        while True:
            item = self.queue.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
