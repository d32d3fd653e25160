"""mllmkit.generation against transformers ``generate`` on the toy Llama (CPU, eager static-cache path)."""

from __future__ import annotations

import pytest
import torch

from mllmkit.generation import Decoder, decoder_for, generate
from mllmkit.testing.toy import ToyLLMConfig, build_toy_llm


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    model = build_toy_llm(ToyLLMConfig(hidden_size=32, num_layers=2, num_heads=4))
    model.eval()
    return model


def _prompt(llm, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (1, length), generator=g)
    return llm.embed(ids).detach()


def _hf_greedy(llm, embeds, mask, n):
    with torch.no_grad():
        out = llm.hf_model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=n,
                                    do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("length", [1, 7, 30])
def test_greedy_equals_hf_generate(llm, length):
    embeds = _prompt(llm, length, seed=length)
    mask = torch.ones(1, length, dtype=torch.long)
    expected = _hf_greedy(llm, embeds, mask, 20)
    assert len(expected) == 20
    assert generate(llm, embeds, mask, max_new_tokens=20) == expected
    assert generate(llm, embeds, mask, max_new_tokens=20, backend="hf") == expected


def test_left_padding_matches_unpadded(llm):
    embeds = _prompt(llm, 9, seed=3)
    expected = _hf_greedy(llm, embeds, torch.ones(1, 9, dtype=torch.long), 12)
    padded = torch.cat([torch.randn(1, 4, embeds.shape[-1]), embeds], dim=1)
    mask = torch.tensor([[0] * 4 + [1] * 9])
    assert generate(llm, padded, mask, max_new_tokens=12) == expected


@pytest.mark.filterwarnings("error::FutureWarning")  # the cache goes in under this transformers' own name
def test_decoder_reused_across_calls_and_prompts(llm):
    first = _prompt(llm, 12, seed=1)
    second = _prompt(llm, 5, seed=2)
    decoder = decoder_for(llm, 12 + 10)
    a1 = decoder.generate(first, max_new_tokens=10)
    b = decoder.generate(second, max_new_tokens=10)
    a2 = decoder.generate(first, max_new_tokens=10)
    assert a1 == a2 == _hf_greedy(llm, first, None, 10)
    assert b == _hf_greedy(llm, second, None, 10)
    assert decoder_for(llm, 30) is decoder  # 256-position cache serves it
    assert decoder_for(llm, 300) is not decoder and decoder_for(llm, 300).max_cache_len == 512


def test_stop_tokens_end_generation_and_are_not_returned(llm):
    embeds = _prompt(llm, 6, seed=4)
    full = _hf_greedy(llm, embeds, None, 15)
    stop = full[5]
    cut = full[:full.index(stop)]
    assert generate(llm, embeds, max_new_tokens=15, stop_token_ids=[stop, 10_000]) == cut
    assert generate(llm, embeds, max_new_tokens=15, stop_token_ids=[stop], backend="hf") == cut


def test_streaming_callback_order_and_early_stop(llm):
    embeds = _prompt(llm, 8, seed=5)
    seen: list[int] = []
    out = generate(llm, embeds, max_new_tokens=10, on_token=seen.append)
    assert seen == out and len(out) == 10
    seen2: list[int] = []
    out2 = generate(llm, embeds, max_new_tokens=10, on_token=lambda t: seen2.append(t) or len(seen2) == 3)
    assert out2 == seen2 == out[:3]
    seen3: list[int] = []
    assert generate(llm, embeds, max_new_tokens=10, on_token=lambda t: seen3.append(t) or len(seen3) == 3,
                    backend="hf") == out[:3] == seen3


def test_sampling_matches_hf_with_same_seed(llm):
    embeds = _prompt(llm, 10, seed=6)
    settings = dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)
    torch.manual_seed(123)
    with torch.no_grad():
        ref = llm.hf_model.generate(inputs_embeds=embeds, max_new_tokens=16, eos_token_id=None, pad_token_id=0,
                                    **settings)[0].tolist()
    torch.manual_seed(123)
    ours = generate(llm, embeds, max_new_tokens=16, **settings)
    assert ours == ref
    torch.manual_seed(124)
    assert generate(llm, embeds, max_new_tokens=16, **settings) != ref  # the seed matters: it really samples


def test_repetition_penalty_changes_greedy_like_hf(llm):
    embeds = _prompt(llm, 4, seed=7)
    with torch.no_grad():
        ref = llm.hf_model.generate(inputs_embeds=embeds, max_new_tokens=25, do_sample=False,
                                    repetition_penalty=5.0, eos_token_id=None, pad_token_id=0)[0].tolist()
    assert generate(llm, embeds, max_new_tokens=25, repetition_penalty=5.0) == ref


def test_refuses_batch_and_overlong_requests(llm):
    decoder = Decoder(llm, 16)
    with pytest.raises(ValueError, match=r"inputs_embeds \[1, length, hidden\], got \(2, 3, 32\)"):
        decoder.generate(torch.zeros(2, 3, 32), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"prompt \(10\) \+ max_new_tokens \(7\) exceeds this decoder's cache of 16"):
        decoder.generate(torch.zeros(1, 10, 32), max_new_tokens=7)
    with pytest.raises(ValueError, match="backend must be 'static' or 'hf', not 'x'"):
        generate(llm, torch.zeros(1, 3, 32), max_new_tokens=2, backend="x")
