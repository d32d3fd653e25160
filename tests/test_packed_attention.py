"""Packed rows under SDPA take the varlen path (:mod:`mllmkit.packed_attention`): sample boundaries,
attention within each sample only (against a dense per-sample mask), hidden states of a packed row
equal to each sample run alone through transformers' own forward, padded batches untouched after.
The GPU test runs torch's flash varlen kernel, forward and backward, against the same reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mllmkit.assemble import assemble
from mllmkit.packed_attention import (
    packed_attention_name,
    sample_boundaries,
    varlen_attention,
    wraps_packable,
)
from mllmkit.recipe import load_recipe


def _positions(lengths: list[int]) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def test_sample_boundaries_are_the_offsets_of_each_sample_and_the_padding_tail():
    found = sample_boundaries(_positions([3, 5, 1, 4]))
    assert found["cu_seq_lens_q"].tolist() == [0, 3, 8, 9, 13] and found["cu_seq_lens_q"].dtype == torch.int32
    assert found["cu_seq_lens_k"] is found["cu_seq_lens_q"]
    assert found["max_length_q"] == found["max_length_k"] == 5


def _dense_reference(query, key, value, lengths):
    """SDPA over the whole row with a block-diagonal causal mask built from the sample lengths."""
    total = sum(lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(query.device)
    mask = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool, device=query.device).tril()
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_varlen_attention_attends_within_each_sample_only(kv_heads):
    torch.manual_seed(0)
    lengths = [5, 1, 7, 3]
    query = torch.randn(1, 4, sum(lengths), 8)
    key, value = torch.randn(2, 1, kv_heads, sum(lengths), 8).unbind(0)
    bounds = sample_boundaries(_positions(lengths))
    out = varlen_attention(query, key, value, bounds["cu_seq_lens_q"], bounds["max_length_q"], None)
    assert out.shape == (1, sum(lengths), 4, 8)
    torch.testing.assert_close(out, _dense_reference(query, key, value, lengths), atol=1e-6, rtol=1e-6)


def test_a_packed_row_gives_each_sample_its_own_hidden_states(plugin_host, toy_recipe):
    torch.manual_seed(0)
    llm = assemble(load_recipe(toy_recipe)).llm.eval()
    config = llm.hf_model.config
    assert config._attn_implementation == "sdpa" and wraps_packable("sdpa")
    lengths = [6, 3, 9]
    embeds = torch.randn(1, sum(lengths), config.hidden_size)
    with torch.no_grad():
        packed = llm.hidden(embeds, position_ids=_positions(lengths))
        assert config._attn_implementation == packed_attention_name("sdpa") == "mllmkit_packed_sdpa"
        starts = [0, 6, 9, 18]
        alone = [llm.hf_model.model(inputs_embeds=embeds[:, a:b]).last_hidden_state for a, b in zip(starts, starts[1:])]
        torch.testing.assert_close(packed, torch.cat(alone, dim=1), atol=1e-5, rtol=1e-5)
        # padded rows and left-padded masks still take the wrapped SDPA
        padded = llm.hidden(embeds[:, :6])
        masked = llm.hidden(embeds[:, :6], attention_mask=torch.ones(1, 6, dtype=torch.long))
    torch.testing.assert_close(padded, alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked, alone[0], atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_the_cuda_varlen_kernel_matches_the_dense_reference_forward_and_backward():
    torch.manual_seed(0)
    lengths = [200, 37, 511, 64, 300]
    shape = (1, 8, sum(lengths), 128)
    inputs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3)]
    bounds = sample_boundaries(_positions(lengths).cuda())
    out = varlen_attention(*inputs, bounds["cu_seq_lens_q"], bounds["max_length_q"], None)
    grad = torch.randn_like(out)
    mine = [out, *torch.autograd.grad(out, inputs, grad)]
    reference_inputs = [t.detach().float().requires_grad_() for t in inputs]
    expected = _dense_reference(*reference_inputs, lengths)
    theirs = [expected, *torch.autograd.grad(expected, reference_inputs, grad.float())]
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.float(), b, atol=2e-2, rtol=2e-2)
