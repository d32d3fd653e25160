"""Batched decoding: several prompts decoded together on one static cache, each row on its own terms.

:func:`generate_batch` takes :class:`BatchRow` requests (prompt embeddings, as
:meth:`mllmkit.model.MLLM.embed` makes them, plus that row's own new-token limit, stop ids, sampling
settings, random generator and token callback), left-pads them into one ``[rows, L, H]`` prefill and
then decodes one token a row per step through the :class:`mllmkit.generation.Decoder` of that many
rows (static KV cache; a CUDA graph on CUDA). Each row has its own valid keys and rotary positions,
so a row's tokens do not depend on the other rows (greedy: the same tokens as decoding it alone). A
row that has finished keeps a place in the batch until every row has; row counts are rounded up to
a power of two so that a few decoders (and graphs) serve every batch. Token selection per row
follows :func:`mllmkit.generation.generate` (float32 logits, transformers' processors, ``argmax`` or
``torch.multinomial``), sampling with the row's own ``torch.Generator``. As there, the host reads
each step's tokens while the next step runs.

Example::

    rows = [BatchRow(embeds_a, max_new_tokens=64, stop_token_ids=stops),
            BatchRow(embeds_b, max_new_tokens=32, stop_token_ids=stops, do_sample=True, temperature=0.7,
                     generator=torch.Generator().manual_seed(1))]
    for result in generate_batch(llm, rows):
        print(result.tokens, result.finish_reason)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import attrs
import torch
from torch import nn

from mllmkit.generation import TokenCallback, _logits_processors, decoder_for

__all__ = ["BatchRow", "RowResult", "generate_batch", "rows_for"]

FinishReason = Literal["stop", "length", "callback"]


@attrs.define(eq=False)
class BatchRow:
    """One prompt of a batch: ``embeds [L, H]`` and how to decode it (see :func:`mllmkit.generation.generate`)."""

    embeds: torch.Tensor
    max_new_tokens: int
    stop_token_ids: Sequence[int] = ()
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    generator: torch.Generator | None = None
    """Random source of this row's sampling (on the model's device); None: torch's global one."""
    on_token: TokenCallback | None = None
    """Called with each new token of this row; returning True ends this row."""


@attrs.define
class RowResult:
    """A row's new tokens (stop token not included) and why it ended: a stop token, its limit, or its callback."""

    tokens: list[int]
    finish_reason: FinishReason


def rows_for(count: int) -> int:
    """The decoder row count that serves ``count`` prompts: the next power of two."""
    return 1 << max(count - 1, 0).bit_length()


class _RowState:
    def __init__(self, row: BatchRow) -> None:
        self.row = row
        self.stops = {int(t) for t in row.stop_token_ids}
        self.processors = _logits_processors(row.do_sample, row.temperature, row.top_k, row.top_p,
                                              row.repetition_penalty)
        self.tokens: list[int] = []
        self.finish: FinishReason | None = None if row.max_new_tokens > 0 else "length"

    def take(self, token: int) -> None:
        """Record this row's next token (the host side of one step)."""
        if token in self.stops:
            self.finish = "stop"
            return
        self.tokens.append(token)
        if self.row.on_token is not None and self.row.on_token(token):
            self.finish = "callback"
        elif len(self.tokens) >= self.row.max_new_tokens:
            self.finish = "length"


def _select(states: Sequence[_RowState], logits: torch.Tensor, generated: torch.Tensor, step: int) -> torch.Tensor:
    """Each row's next token from its ``[rows, vocab]`` logits (greedy rows in one argmax)."""
    token = torch.argmax(logits, dim=-1)
    for i, state in enumerate(states):
        if state.finish is not None or not (state.processors or state.row.do_sample):
            continue
        scores = state.processors(generated[i:i + 1, :step], logits[i:i + 1]) if state.processors else logits[i:i + 1]
        if state.row.do_sample:
            choice = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1, generator=state.row.generator)[0]
        else:
            choice = torch.argmax(scores, dim=-1)
        token[i:i + 1] = choice
    return token


@torch.inference_mode()
def generate_batch(llm: nn.Module, rows: Sequence[BatchRow], *, use_cuda_graph: bool | None = None) -> list[RowResult]:
    """Decode ``rows`` together; one :class:`RowResult` per row, in order."""
    if not rows:
        return []
    for i, row in enumerate(rows):
        if row.embeds.dim() != 2:
            raise ValueError(f"row {i}: embeds must be [length, hidden], got {tuple(row.embeds.shape)}")
    states = [_RowState(row) for row in rows]
    steps = max(row.max_new_tokens for row in rows)
    if steps <= 0:
        return [RowResult([], "length") for _ in rows]
    length = max(row.embeds.shape[0] for row in rows)
    count = rows_for(len(rows))
    decoder = decoder_for(llm, length + steps, use_cuda_graph=use_cuda_graph, batch_size=count)
    device, hidden = decoder.device, rows[0].embeds.shape[-1]

    embeds = torch.zeros(count, length, hidden, dtype=decoder.dtype, device=device)
    valid = torch.zeros(count, length, dtype=torch.bool, device=device)
    valid[len(rows):, -1] = True  # filler rows: one (zero) token each, never read
    for i, row in enumerate(rows):  # left padding: every prompt ends at the last position
        embeds[i, length - row.embeds.shape[0]:] = row.embeds.to(device=device, dtype=decoder.dtype)
        valid[i, length - row.embeds.shape[0]:] = True
    embeds, valid = decoder.bucket(embeds, valid, steps)  # a few prefill shapes (each a CUDA graph)
    length = embeds.shape[1]
    next_pos = valid.sum(dim=1)  # rotary position of each row's first new token (padding not counted)

    generated = torch.zeros(count, steps, dtype=torch.long, device=device)
    host = torch.zeros(count, dtype=torch.long, pin_memory=device.type == "cuda")
    ready = torch.cuda.Event() if device.type == "cuda" else None
    logits = decoder.prefill(embeds, valid)
    for step in range(steps):
        token = _select(states, logits, generated, step)
        generated[:, step] = token
        host.copy_(token, non_blocking=ready is not None)
        if ready is not None:
            ready.record()
        if step + 1 < steps:  # queue the next step before looking at these tokens
            logits = decoder.step(token, next_pos + step, length + step)
        if ready is not None:
            ready.synchronize()
        values = host.tolist()
        for state, value in zip(states, values):
            if state.finish is None:
                state.take(value)
        if all(state.finish is not None for state in states):
            break
    return [RowResult(state.tokens, state.finish or "length") for state in states]
