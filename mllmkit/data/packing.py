"""Padding-free packing (``[data] packing = true``): several whole samples in one row.

Planning: :func:`pack_draws` groups an epoch's planned draws into micro-batches of at most
``max_tokens_per_batch`` tokens (best-fit decreasing inside windows of the shuffled order, then the
window's bins shuffled by the draws' own seeds), from the exact token length of every record
(:class:`TokenLengths`: the template's encoding of the text, image placeholders included). So the
plan stays a pure function of the seed and the epoch, and a resumed run sees the same rows.

Collation: :class:`PackingCollator` concatenates a micro-batch's samples into one right-padded row
with position ids restarting at 0 for each sample (and for the padding tail). A sample is never
split, so neither is an image span. The first label of each sample is ignored, so the last token of
one sample never predicts the first token of the next (in a row of its own that token is never a
target either): labels and token counts equal the unpacked batch's. The model then runs the LLM
with those ``position_ids`` and no attention mask, which is how transformers detects packed
sequences (``masking_utils.find_packed_sequence_indices``) and builds a document mask for SDPA,
eager and FlexAttention, or takes flash-attention's varlen kernel: attention never crosses samples.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence

import torch

from mllmkit.data.collate import Batch, EncodedDataset, EncodedSample, image_fields
from mllmkit.data.errors import SampleError, Skip
from mllmkit.errors import RecipeError
from mllmkit.template import IGNORE_INDEX

__all__ = ["PackingCollator", "TokenLengths", "check_packing", "pack_draws", "packed_position_ids",
           "steps_per_packed_epoch"]

Draw = tuple[int, int, int]


def check_packing(data, train) -> None:
    """Raise a :class:`RecipeError` for settings packing cannot honour (called when ``data.packing``)."""
    if data.max_tokens_per_batch is None:
        raise RecipeError("data.max_tokens_per_batch", "data.packing = true needs the tokens per packed row, "
                          "e.g. max_tokens_per_batch = 4096 (at least train.max_text_len)")
    if data.max_tokens_per_batch < train.max_text_len:
        raise RecipeError("data.max_tokens_per_batch", f"expected at least train.max_text_len = {train.max_text_len} "
                          f"(a sample is never split), found {data.max_tokens_per_batch}")
    if train.micro_batch_size != 1:
        raise RecipeError("train.micro_batch_size", "with data.packing = true each micro-batch is one packed row of "
                          f"up to data.max_tokens_per_batch tokens; set micro_batch_size = 1, found "
                          f"{train.micro_batch_size}")
    if train.loss_reduction != "token":
        raise RecipeError("train.loss_reduction", "'sample' averages per micro-batch, and packing changes what a "
                          "micro-batch holds; use loss_reduction = 'token' with data.packing = true")


class TokenLengths:
    """Exact token length of each record, ``(dataset_no, index) -> int``, computed once and kept.

    The length is the template's encoding of the record's text (image placeholders included, no
    image read). A record the encoder refuses counts 0: it becomes a skip when its micro-batch loads.
    """

    def __init__(self, samples: EncodedDataset) -> None:
        self.samples = samples
        self._known: dict[tuple[int, int], int] = {}

    def __call__(self, dataset_no: int, index: int) -> int:
        key = (dataset_no, index)
        if key not in self._known:
            try:
                sample = self.samples.datasets[dataset_no][index]
                self._known[key] = len(self.samples.encoder.encode_text(sample).input_ids)
            except SampleError:
                self._known[key] = 0
        return self._known[key]


def pack_draws(order: Sequence[Draw], lengths: Sequence[int], capacity: int, window: int = 1024) -> list[list[Draw]]:
    """The draws grouped into micro-batches of at most ``capacity`` tokens (``lengths[k]`` is the length
    of ``order[k]``): best-fit decreasing inside each window of ``window`` consecutive draws; each
    window's bins are then shuffled with a generator seeded by the window's first draw seed (so
    row lengths do not fall in steps). A draw longer than ``capacity`` gets a bin of its own."""
    packed: list[list[Draw]] = []
    for start in range(0, len(order), window):
        chunk = range(start, min(start + window, len(order)))
        bins: list[list[Draw]] = []
        free: list[tuple[int, int]] = []  # (tokens left, bin number), sorted
        for k in sorted(chunk, key=lambda k: -lengths[k]):  # stable: ties keep the shuffled order
            at = bisect.bisect_left(free, (lengths[k], -1))
            if at == len(free):
                bins.append([order[k]])
                bisect.insort(free, (capacity - lengths[k], len(bins) - 1))
            else:
                left, number = free.pop(at)
                bins[number].append(order[k])
                bisect.insort(free, (left - lengths[k], number))
        generator = torch.Generator().manual_seed(order[start][2])
        packed += [bins[i] for i in torch.randperm(len(bins), generator=generator).tolist()]
    return packed


def steps_per_packed_epoch(steps_of_epoch: Callable[[int], int], epochs: int, max_steps: int | None) -> int:
    """Optimizer steps taken from every epoch: the fewest any epoch the run reaches can fill (packed
    epochs differ a little in row count; the rows past it are dropped like an incomplete last batch)."""
    per_epoch = steps_of_epoch(0)
    reached = 1
    while per_epoch > 0 and reached < (epochs if max_steps is None else -(-max_steps // per_epoch)):
        per_epoch = min(per_epoch, steps_of_epoch(reached))
        reached += 1
    return per_epoch


def packed_position_ids(lengths: Sequence[int], total: int) -> torch.Tensor:
    """``[total]`` positions restarting at 0 for each length, and once more for the padding tail."""
    spans = [*lengths, total - sum(lengths)]
    return torch.cat([torch.arange(n, dtype=torch.long) for n in spans])


class PackingCollator:
    """A micro-batch of EncodedSample/Skip → a one-row :class:`Batch` (``position_ids`` per sample).

    ``pad_to_multiple`` rounds the row length up (fewer shapes for the GPU's kernels);
    ``image_token_id``: count the image placeholders on the host.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple: int = 1, image_token_id: int | None = None) -> None:
        self.pad_token_id, self.pad_to_multiple, self.image_token_id = pad_token_id, pad_to_multiple, image_token_id

    def __call__(self, items: Sequence[EncodedSample | Skip]) -> Batch:
        samples = [s for s in items if isinstance(s, EncodedSample)]
        skips = tuple(s for s in items if isinstance(s, Skip))
        lengths = [len(s.input_ids) for s in samples]
        rows = 1 if samples else 0
        length = -(-sum(lengths) // self.pad_to_multiple) * self.pad_to_multiple
        input_ids = torch.full((rows, length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((rows, length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((rows, length), dtype=torch.long)
        start = 0
        for sample, n in zip(samples, lengths):
            input_ids[0, start:start + n] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[0, start + 1:start + n] = torch.tensor(sample.labels[1:], dtype=torch.long)
            attention_mask[0, start:start + n] = 1
            start += n
        position_ids = packed_position_ids(lengths, length).unsqueeze(0)[:rows]
        return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask, skips=skips,
                     position_ids=position_ids, samples=len(samples),
                     **image_fields(samples, input_ids, self.image_token_id))
