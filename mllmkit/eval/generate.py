"""Greedy answers for evaluation, in left-padded batches through transformers ``generate``.

Each item's conversation is rendered by the LLM's template with the generation prompt (the system
prompt of the :class:`~mllmkit.data.collate.SampleEncoder`), its images go through the encoder's
eval transform and the model's :meth:`~mllmkit.model.MLLM.embed`; a batch of prompts is left-padded
and decoded greedily with a KV cache (``do_sample=False``), stopping at the template's stop tokens.
Greedy decoding on the same device gives the same answers every run. An item that cannot be asked
(image missing, prompt longer than the limit) gets the empty answer and a :class:`Problem`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mllmkit.chat.streaming import cut_at_stop
from mllmkit.data.collate import SampleEncoder
from mllmkit.data.errors import SampleError
from mllmkit.eval.task import EvalItem, Problem
from mllmkit.interfaces import Sample

__all__ = ["generate_answers", "greedy_ids"]


@torch.inference_mode()
def greedy_ids(model, prompts: Sequence[list[int]], pixels: torch.Tensor | None, max_new_tokens: int) -> list[list[int]]:
    """New token ids for each prompt (stop token excluded), the prompts decoded together."""
    from transformers import GenerationConfig

    template, device = model.llm.template, model.llm.embedding.weight.device
    length = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), length), template.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, length - len(prompt):] = torch.tensor(prompt)
        mask[row, length - len(prompt):] = 1
    ids, mask = ids.to(device), mask.to(device)
    embeds = model.embed(ids, pixels=None if pixels is None else pixels.to(device))
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, temperature=None,
                              top_k=None, top_p=None, eos_token_id=list(template.stop_token_ids),
                              pad_token_id=template.pad_token_id, use_cache=True)
    out = model.llm.hf_model.generate(inputs_embeds=embeds, attention_mask=mask, generation_config=config)
    return [cut_at_stop(row.tolist(), template.stop_token_ids) for row in out]


def generate_answers(model, items: Sequence[EvalItem], encoder: SampleEncoder, max_new_tokens: int,
                     batch_size: int, on_batch: Callable[[int], None] | None = None) -> tuple[list[str], list[Problem]]:
    """The greedy answer to each item (``""`` for an item that could not be asked) and the problems."""
    answers = [""] * len(items)
    problems: list[Problem] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            rows, prompts, pixel_list = [], [], []
            for row in range(start, min(start + batch_size, len(items))):
                item = items[row]
                sample = Sample(images=item.images, messages=item.messages, source=item.id, index=row)
                try:
                    encoded = encoder.encode_text(sample, add_generation_prompt=True)
                    if encoded.num_images != len(item.images):
                        raise SampleError("malformed_record", item.id, row, f"{encoded.num_images} image marker(s) "
                                          f"in the text but {len(item.images)} image(s)")
                    pixel_list += encoder.pixels(sample, seed=None)
                except SampleError as exc:
                    problems.append(Problem(item.id, row, exc.detail))
                    continue
                rows.append(row)
                prompts.append(encoded.input_ids)
            if prompts:
                pixels = torch.stack(pixel_list) if pixel_list else None
                for row, ids in zip(rows, greedy_ids(model, prompts, pixels, max_new_tokens)):
                    answers[row] = model.llm.tokenizer.decode(ids)
            if on_batch is not None:
                on_batch(min(batch_size, len(items) - start))
    finally:
        model.train(was_training)
    return answers, problems
