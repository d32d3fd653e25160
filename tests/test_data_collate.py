"""Label masks against hand-written expectations (toy template), collation shapes and padding,
length grouping and the epoch plan (mixing by weight, sharding over ranks)."""

from __future__ import annotations

import torch

from mllmkit.data import (
    Collator,
    EncodedSample,
    SampleEncoder,
    epoch_order,
    group_by_length,
    rank_micro_batches,
)
from mllmkit.interfaces import Sample
from mllmkit.template import IGNORE_INDEX, IMAGE_SPAN
from mllmkit.testing.toy import ByteTokenizer, ToyTemplate

USER, ASSISTANT, END, IMAGE, PAD = 257, 258, 259, 260, 256
X = IGNORE_INDEX


def _b(text: str) -> list[int]:
    return list(text.encode())


def _encoder(max_len=512):
    from PIL import Image

    return SampleEncoder(ToyTemplate(ByteTokenizer()), 3, lambda im: torch.zeros(3, 2, 2), max_len), Image.new("RGB", (4, 4))


def test_label_mask_single_turn_with_image():
    encoder, image = _encoder()
    sample = Sample(images=[image], messages=[{"role": "user", "content": f"{IMAGE_SPAN} hi"},
                                              {"role": "assistant", "content": "ok"}])
    out = encoder(sample)
    expected_ids = [USER, *_b("<Img>"), IMAGE, IMAGE, IMAGE, *_b("</Img> hi"), END, ASSISTANT, *_b("ok"), END]
    expected_labels = [X] * (1 + 5 + 3 + 9 + 1 + 1) + [*_b("ok"), END]
    assert out.input_ids == expected_ids
    assert out.labels == expected_labels
    assert len(out.pixels) == 1


def test_label_mask_multi_turn_system_ignored():
    encoder, _ = _encoder()
    sample = Sample(images=[], messages=[{"role": "system", "content": "sys"}, {"role": "user", "content": "a"},
                                         {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                                         {"role": "assistant", "content": "de"}])
    out = encoder(sample)
    assert out.input_ids == [USER, 97, END, ASSISTANT, 98, END, USER, 99, END, ASSISTANT, 100, 101, END]
    assert out.labels == [X, X, X, X, 98, END, X, X, X, X, 100, 101, END]


def test_truncation_cuts_text_after_the_image_but_never_the_image():
    encoder, image = _encoder(max_len=22)
    sample = Sample(images=[image], messages=[{"role": "user", "content": f"{IMAGE_SPAN} hi"},
                                              {"role": "assistant", "content": "a long answer"}])
    out = encoder(sample)
    assert len(out.input_ids) == 22
    assert out.input_ids.count(IMAGE) == 3
    assert out.labels[-2:] == _b("a ")


def test_collation_pads_right_to_the_longest_and_masks_by_length():
    # a literal pad id inside a sample must stay attended: the mask comes from lengths
    a = EncodedSample([1, 2, PAD, 4], [X, X, PAD, 4], [torch.ones(3, 2, 2)])
    b = EncodedSample([5, 6], [X, 6], [])
    c = EncodedSample([7, 8, 9], [X, 8, 9], [torch.full((3, 2, 2), 2.0), torch.full((3, 2, 2), 3.0)])
    batch = Collator(pad_token_id=PAD)([a, b, c])
    assert batch.input_ids.tolist() == [[1, 2, PAD, 4], [5, 6, PAD, PAD], [7, 8, 9, PAD]]
    assert batch.labels.tolist() == [[X, X, PAD, 4], [X, 6, X, X], [X, 8, 9, X]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    assert batch.pixels.shape == (3, 3, 2, 2)
    assert batch.pixels[:, 0, 0, 0].tolist() == [1.0, 2.0, 3.0]
    assert batch.num_tokens == 5  # labelled targets after the shift: (PAD, 4), (6), (8, 9)


def test_collation_of_only_skips_is_an_empty_batch():
    from mllmkit.data import Skip

    batch = Collator(PAD)([Skip("missing_image", "f.json", 3, "gone")])
    assert batch.size == 0 and batch.pixels is None and batch.skips[0].index == 3


def test_epoch_order_mixes_by_weight_and_is_deterministic():
    order = epoch_order([10, 4], [1.0, 2.5], seed=7, epoch=0)
    assert order == epoch_order([10, 4], [1.0, 2.5], seed=7, epoch=0)
    assert order != epoch_order([10, 4], [1.0, 2.5], seed=7, epoch=1)
    counts = [sum(1 for d, _, _ in order if d == k) for k in (0, 1)]
    assert counts == [10, 10]  # round(4 × 2.5) = 10: every record twice plus 2 more
    second = sorted(i for d, i, _ in order if d == 1)
    assert all(second.count(i) >= 2 for i in range(4)) and len(second) == 10
    assert sorted(i for d, i, _ in order if d == 0) == list(range(10))


def test_ranks_split_each_global_batch():
    order = [(0, i, 0) for i in range(24)]
    one = rank_micro_batches(order, step=1, micro_batch_size=2, grad_accum=4, world_size=1, rank=0)
    two = [rank_micro_batches(order, step=1, micro_batch_size=2, grad_accum=2, world_size=2, rank=r) for r in (0, 1)]
    flat = lambda mbs: [i for mb in mbs for _, i, _ in mb]
    assert flat(one) == list(range(8, 16))
    assert flat(two[0]) + flat(two[1]) == flat(one)


def test_group_by_length_sorts_within_windows():
    order = [(0, i, 0) for i in range(8)]
    lengths = [3, 9, 1, 7, 5, 2, 8, 4]
    grouped = group_by_length(order, lengths, micro_batch_size=2, window=2)
    assert [i for _, i, _ in grouped] == [1, 3, 0, 2, 6, 4, 7, 5]
