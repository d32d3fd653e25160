"""Activation transfers between stages without DeepSpeed's per-micro-batch shape messages.

With ``dynamic_shape`` DeepSpeed sends a small metadata tensor before every activation transfer and
the receiver reads it with ``.item()``: a host sync per micro-batch that drains the receiving GPU's
queue, so the stage's Python launches and its GPU work stop overlapping. Here every stage already
holds the step's micro-batches (each stage of a pipeline reads the same data), so the receiver
knows each transfer's shape, ``(hidden [B, T, H], attention_mask [B, T])``, without asking. Only the
run's first transfer goes through DeepSpeed's metadata exchange, to learn the dtypes; the sender
checks every later transfer against the shape the receiver will expect.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["KnownShapeTransfers"]


class KnownShapeTransfers:
    """Replaces ``_send_tensor_meta`` / ``_recv_tensor_meta`` of one DeepSpeed ``PipelineEngine``."""

    def __init__(self, engine: Any, hidden_size: int) -> None:
        self.engine, self.hidden_size = engine, hidden_size
        self._send_meta, self._recv_meta = engine._send_tensor_meta, engine._recv_tensor_meta
        self._sends: deque[tuple[int, int]] = deque()
        self._recvs: deque[tuple[int, int]] = deque()
        self.dtypes: tuple[torch.dtype, ...] | None = None
        self._meta_sent = False
        engine._send_tensor_meta = self.send_meta
        engine._recv_tensor_meta = self.recv_meta

    def expect(self, shapes: Iterable[tuple[int, int]]) -> None:
        """The ``(batch, tokens)`` of the micro-batches the next ``train_batch``/``eval_batch`` runs."""
        shapes = list(shapes)
        self._sends = deque(shapes)
        self._recvs = deque(shapes)

    def send_meta(self, outputs: tuple[torch.Tensor, ...], recv_stage: int) -> None:
        expected = self._sends.popleft()
        hidden = outputs[0]
        if tuple(hidden.shape) != (*expected, self.hidden_size):
            raise RuntimeError(f"pipeline: stage output {tuple(hidden.shape)} differs from the shape the next stage "
                               f"expects, {(*expected, self.hidden_size)}")
        if not self._meta_sent:
            self._send_meta(outputs, recv_stage)
            self._meta_sent = True

    def recv_meta(self, send_stage: int):
        batch, tokens = self._recvs.popleft()
        if self.dtypes is None:
            buffers = self._recv_meta(send_stage)
            self.dtypes = tuple(b.dtype for b in buffers)
            return buffers
        hidden_dtype, mask_dtype = self.dtypes
        allocate = self.engine._allocate_or_extend_buffers
        return (allocate(0, [batch, tokens, self.hidden_size], hidden_dtype),
                allocate(1, [batch, tokens], mask_dtype))
