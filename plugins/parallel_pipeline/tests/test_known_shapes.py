"""Stage-to-stage transfers ask DeepSpeed for shapes once per run, then use the micro-batches' own."""

from __future__ import annotations

import pytest
import torch
from mllmkit_parallel_pipeline.known_shapes import KnownShapeTransfers


class _Engine:
    """The three DeepSpeed ``PipelineEngine`` methods the transfers replace or use."""

    def __init__(self) -> None:
        self.sent, self.asked = 0, 0

    def _send_tensor_meta(self, buffer, recv_stage) -> None:
        self.sent += 1

    def _recv_tensor_meta(self, send_stage):
        self.asked += 1
        return torch.zeros(2, 5, 8, dtype=torch.bfloat16), torch.zeros(2, 5, dtype=torch.long)

    def _allocate_or_extend_buffers(self, idx, shape, dtype):
        return torch.empty(shape, dtype=dtype)


def test_only_the_first_transfer_exchanges_metadata_and_later_buffers_follow_the_batches():
    engine = _Engine()
    transfers = KnownShapeTransfers(engine, hidden_size=8)
    transfers.expect([(2, 5), (3, 9)])
    first = engine._recv_tensor_meta(0)
    second = engine._recv_tensor_meta(0)
    assert engine.asked == 1 and tuple(first[0].shape) == (2, 5, 8)
    assert [tuple(t.shape) for t in second] == [(3, 9, 8), (3, 9)]
    assert [t.dtype for t in second] == [torch.bfloat16, torch.long]
    engine._send_tensor_meta((torch.zeros(2, 5, 8), torch.ones(2, 5)), 1)
    engine._send_tensor_meta((torch.zeros(3, 9, 8), torch.ones(3, 9)), 1)
    assert engine.sent == 1


def test_a_stage_output_of_an_unexpected_shape_is_refused_before_it_is_sent():
    engine = _Engine()
    transfers = KnownShapeTransfers(engine, hidden_size=8)
    transfers.expect([(2, 5)])
    with pytest.raises(RuntimeError, match=r"stage output \(2, 6, 8\) differs from the shape the next stage "
                                           r"expects, \(2, 5, 8\)"):
        engine._send_tensor_meta((torch.zeros(2, 6, 8), torch.ones(2, 6)), 1)
    assert engine.sent == 0
