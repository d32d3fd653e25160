"""Inference replayed as CUDA graphs (:mod:`mllmkit.cuda_graphs`) gives what the eager code gives: the
image path captured per pixel shape, prefills captured per bucketed length, and greedy tokens of the
whole chat path unchanged. GPU only (CUDA graphs); CPU runs keep the eager code these compare against."""

from __future__ import annotations

import pytest
import torch

import mllmkit
from mllmkit.cuda_graphs import _IMAGE_GRAPHS
from mllmkit.generation import PREFILL_BUCKET, Decoder, generate

pytestmark = pytest.mark.gpu


@pytest.fixture
def model(plugin_host, toy_recipe):
    torch.manual_seed(0)
    return mllmkit.assemble(mllmkit.load_recipe(toy_recipe)).cuda().eval()


def test_image_encoding_replays_one_graph_per_pixel_shape_and_equals_eager(model):
    pixels = [torch.randn(n, 3, 16, 16, device="cuda") for n in (1, 1, 2)]
    with torch.no_grad():
        eager = [model.encode_images(p) for p in pixels]
    assert model not in _IMAGE_GRAPHS  # no_grad alone stays eager
    with torch.inference_mode():
        graphed = [model.encode_images(p) for p in pixels]
    shapes = {key for key in _IMAGE_GRAPHS[model] if isinstance(key, tuple)}
    assert shapes == {((1, 3, 16, 16), torch.float32, pixels[0].device), ((2, 3, 16, 16), torch.float32, pixels[0].device)}
    for a, b in zip(graphed, eager):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert graphed[0].data_ptr() != graphed[1].data_ptr()  # callers own their rows (not the graph's buffer)
    assert not torch.equal(graphed[0], graphed[1])


def test_a_graphed_prefill_gives_the_eager_logits_and_is_captured_once_per_length(model):
    hidden = model.llm.hf_model.config.hidden_size
    graphed = Decoder(model.llm, 256)
    eager = Decoder(model.llm, 256, use_cuda_graph=False)
    with torch.inference_mode():
        for length, seed in ((PREFILL_BUCKET, 0), (PREFILL_BUCKET, 1), (2 * PREFILL_BUCKET, 2), (PREFILL_BUCKET - 3, 3)):
            torch.manual_seed(seed)
            embeds = torch.randn(1, length, hidden, device="cuda") * 0.02
            valid = torch.ones(1, length, dtype=torch.bool, device="cuda")
            valid[0, :5] = False  # left padding
            torch.testing.assert_close(graphed.prefill(embeds, valid).clone(), eager.prefill(embeds, valid),
                                       atol=1e-5, rtol=1e-5)
    assert sorted(graphed._prefills) == [PREFILL_BUCKET, 2 * PREFILL_BUCKET]  # an unbucketed length runs eagerly


def test_greedy_chat_tokens_are_the_same_with_and_without_graphs(model):
    ids = torch.tensor([[1, 2, 3] + [model.llm.template.image_token_id] * model.tokens_per_image + [4, 5]],
                       device="cuda")
    pixels = torch.randn(1, 3, 16, 16, device="cuda")
    with torch.inference_mode():
        graphed = generate(model.llm, model.embed(ids, pixels=pixels), max_new_tokens=24)
    with torch.no_grad():
        embeds = model.embed(ids, pixels=pixels)
    eager = Decoder(model.llm, 256, use_cuda_graph=False).generate(embeds, max_new_tokens=24)
    assert graphed == eager and len(graphed) == 24
