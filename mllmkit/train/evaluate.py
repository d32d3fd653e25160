"""Evaluation: loss on held-out data and exact-match accuracy of greedy answers.

For every held-out sample whose conversation ends with an assistant answer, the model answers the
conversation without that answer (greedy decoding, stopping at the template's stop tokens) and the
answer counts as correct when it equals the reference after trimming whitespace and trailing
punctuation, ignoring case. Each rank evaluates every ``world_size``-th sample; results are summed.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

import torch

from mllmkit.data.collate import SampleEncoder
from mllmkit.data.errors import SampleError
from mllmkit.interfaces import Sample

__all__ = ["exact_match", "greedy_answers", "normalize_answer"]


def normalize_answer(text: str) -> str:
    return text.strip().strip(string.punctuation + " ").lower()


@torch.no_grad()
def greedy_answers(model, prompts: Sequence[list[int]], pixels: torch.Tensor | None, stop_ids: Sequence[int],
                   pad_id: int, max_new_tokens: int, device: torch.device) -> list[list[int]]:
    """Greedy continuations of left-padded prompts (no KV cache: answers are short)."""
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    embeds = model.embed(ids, pixels=None if pixels is None else pixels.to(device))
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    stops = torch.tensor(list(stop_ids), device=device)
    for _ in range(max_new_tokens):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = model.llm.hidden(embeds, attention_mask=mask, position_ids=positions)
        next_ids = model.llm.logits(hidden[:, -1]).argmax(-1)
        done_now = done | torch.isin(next_ids, stops)
        for row in range(len(prompts)):
            if not done_now[row]:
                out[row].append(int(next_ids[row]))
        done = done_now
        if bool(done.all()):
            break
        embeds = torch.cat([embeds, model.llm.embed(next_ids[:, None]).to(embeds.dtype)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return out


def exact_match(model, samples: Sequence[Sample], encoder: SampleEncoder, tokenizer: Any, max_new_tokens: int,
                device: torch.device, batch_size: int = 16) -> tuple[int, int, list[dict]]:
    """(correct, total, examples) over samples that end with an assistant answer."""
    template = encoder.template
    correct = total = 0
    examples: list[dict] = []
    usable = [s for s in samples if s.messages and s.messages[-1]["role"] == "assistant"]
    model.eval()
    for start in range(0, len(usable), batch_size):
        chunk = usable[start:start + batch_size]
        prompts, pixel_list, refs = [], [], []
        for sample in chunk:
            try:
                encoded = encoder.encode_text(sample, add_generation_prompt=True, messages=sample.messages[:-1])
                pixels = encoder.pixels(sample, seed=None)
            except SampleError:
                continue
            prompts.append(encoded.input_ids)
            pixel_list += pixels
            refs.append(sample.messages[-1]["content"])
        if not prompts:
            continue
        pixels = torch.stack(pixel_list) if pixel_list else None
        answers = greedy_answers(model, prompts, pixels, template.stop_token_ids, template.pad_token_id,
                                 max_new_tokens, device)
        for ids, ref in zip(answers, refs):
            text = tokenizer.decode(ids)
            ok = normalize_answer(text) == normalize_answer(ref)
            correct += ok
            total += 1
            if len(examples) < 8:
                examples.append({"answer": text, "reference": ref, "correct": bool(ok)})
    return correct, total, examples
