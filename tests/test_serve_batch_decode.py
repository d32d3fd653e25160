"""mllmkit.generation_batch on the toy Llama (CPU, eager): every row decodes as it would alone."""

from __future__ import annotations

import pytest
import torch

from mllmkit.generation import generate
from mllmkit.generation_batch import BatchRow, generate_batch, rows_for
from mllmkit.testing.toy import ToyLLMConfig, build_toy_llm


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    model = build_toy_llm(ToyLLMConfig(hidden_size=32, num_layers=2, num_heads=4))
    model.eval()
    return model


def _prompt(llm, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return llm.embed(torch.randint(0, 256, (1, length), generator=g)).detach()[0]


def test_batched_greedy_equals_one_at_a_time(llm):
    prompts = [_prompt(llm, n, seed=n) for n in (3, 17, 9, 1, 30)]  # 5 rows: an 8-row decoder, 3 fillers
    limits = [12, 20, 5, 16, 9]
    alone = [generate(llm, p[None], max_new_tokens=n) for p, n in zip(prompts, limits)]
    assert all(len(a) == n for a, n in zip(alone, limits))
    results = generate_batch(llm, [BatchRow(p, max_new_tokens=n) for p, n in zip(prompts, limits)])
    assert [r.tokens for r in results] == alone
    assert [r.finish_reason for r in results] == ["length"] * 5
    assert len({tuple(a) for a in alone}) == 5  # the rows really differ


def test_stop_tokens_and_callbacks_end_only_their_row(llm):
    prompts = [_prompt(llm, 6, seed=40), _prompt(llm, 11, seed=41), _prompt(llm, 4, seed=42)]
    full = [generate(llm, p[None], max_new_tokens=15) for p in prompts]
    stop = full[0][4]
    seen: list[int] = []
    rows = [BatchRow(prompts[0], max_new_tokens=15, stop_token_ids=[stop]),
            BatchRow(prompts[1], max_new_tokens=15, on_token=lambda t: seen.append(t) or len(seen) == 3),
            BatchRow(prompts[2], max_new_tokens=15)]
    first, second, third = generate_batch(llm, rows)
    assert (first.tokens, first.finish_reason) == (full[0][:full[0].index(stop)], "stop")
    assert (second.tokens, second.finish_reason) == (full[1][:3], "callback") and seen == full[1][:3]
    assert (third.tokens, third.finish_reason) == (full[2], "length")


def test_sampling_rows_follow_their_own_generator(llm):
    prompts = [_prompt(llm, 8, seed=50), _prompt(llm, 13, seed=51)]
    settings = dict(do_sample=True, temperature=0.8, top_k=30, top_p=0.9, repetition_penalty=1.2)

    def sampled(seed: int, with_greedy_neighbour: bool) -> list[int]:
        rows = [BatchRow(prompts[0], max_new_tokens=16, generator=torch.Generator().manual_seed(seed), **settings)]
        if with_greedy_neighbour:
            rows.append(BatchRow(prompts[1], max_new_tokens=16))
        return generate_batch(llm, rows)[0].tokens

    alone = sampled(7, with_greedy_neighbour=False)
    assert sampled(7, with_greedy_neighbour=True) == alone
    assert sampled(8, with_greedy_neighbour=False) != alone  # it really samples
    # the same processors and draw as the batch-1 decoder with the global generator at that seed
    torch.manual_seed(7)
    assert generate(llm, prompts[0][None], max_new_tokens=16, **settings) == alone


def test_row_counts_and_bad_rows(llm):
    assert [rows_for(n) for n in (1, 2, 3, 5, 8, 9, 32)] == [1, 2, 4, 8, 8, 16, 32]
    assert generate_batch(llm, []) == []
    assert generate_batch(llm, [BatchRow(_prompt(llm, 3, 1), max_new_tokens=0)])[0].tokens == []
    with pytest.raises(ValueError, match=r"row 0: embeds must be \[length, hidden\], got \(1, 3, 32\)"):
        generate_batch(llm, [BatchRow(_prompt(llm, 3, 1)[None], max_new_tokens=2)])
