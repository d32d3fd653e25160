"""Inference calls replayed as CUDA graphs: one capture per input shape, then one replay per call.

At batch 1 the time to first token is mostly Python issuing kernels one by one (EVA ViT-g's 39 blocks,
the Q-Former, the LLM's prefill: some two thousand launches of small kernels). :class:`CapturedCall`
captures ``fn(*inputs)`` once for fixed input shapes (after warm-up runs on a side stream, as
``torch.cuda.graphs`` asks) and afterwards copies new inputs into its static buffers and replays the
graph. Its outputs are static buffers that the next replay overwrites. :func:`graphed_image_encoder`
keeps one per image-batch shape for a model's frozen image path (vision encoder → bridges);
:class:`mllmkit.generation.Decoder` keeps one per prefill length.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["CapturedCall", "graphed_image_encoder"]

log = logging.getLogger(__name__)


class CapturedCall:
    """``fn`` captured as a CUDA graph for inputs shaped like ``inputs`` (tensors on one CUDA device).

    ``pool``: a memory pool shared with other captures that never replay at the same time."""

    def __init__(self, fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], *, pool=None,
                 warmup: int = 2) -> None:
        self.inputs = [t.detach().clone() for t in inputs]
        side = torch.cuda.Stream(device=self.inputs[0].device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):  # library handles, workspaces, lazy initialisation: outside the graph
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def matches(self, inputs: Sequence[torch.Tensor]) -> bool:
        return all(s.shape == t.shape and s.dtype == t.dtype and s.device == t.device
                   for s, t in zip(self.inputs, inputs, strict=True))

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, new in zip(self.inputs, inputs, strict=True):
            static.copy_(new)
        self.graph.replay()
        return self.output


_IMAGE_GRAPHS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def graphed_image_encoder(model: nn.Module, parts: Sequence[nn.Module], encode: Callable[[torch.Tensor], torch.Tensor],
                          pixels: torch.Tensor) -> torch.Tensor:
    """``encode(pixels)`` (``model``'s image path, made of ``parts``) through a graph captured for this
    pixel shape; returns a new tensor, not the graph's buffer (chat keeps an image's rows for the whole
    conversation). Captured again when a part's parameters moved (``model.to``, a reload); eager from
    then on for a model whose image path cannot be captured (a host synchronisation inside it), with
    one warning."""
    graphs = _IMAGE_GRAPHS.setdefault(model, {})
    if graphs.get("failed"):
        return encode(pixels)
    params = tuple(p.data_ptr() for part in parts for p in part.parameters())
    if graphs.get("params") != params:
        graphs.clear()
        graphs["params"] = params
    key = (tuple(pixels.shape), pixels.dtype, pixels.device)
    call = graphs.get(key)
    if call is None:
        try:
            pool = graphs.setdefault("pool", torch.cuda.graph_pool_handle())
            call = graphs[key] = CapturedCall(encode, [pixels], pool=pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure means: run this model eagerly
            log.warning("image encoding stays eager: its CUDA graph capture failed (%s: %s)", type(exc).__name__, exc)
            graphs.clear()
            graphs["failed"] = True
            return encode(pixels)
    return call(pixels).clone()
