"""Samples to batches: image transforms, the LLM's template and label mask, dynamic padding.

:class:`SampleEncoder` turns one :class:`~mllmkit.interfaces.Sample` into ids, labels and pixels
(opening images, applying the encoder's transform with a per-sample random seed so augmentation
does not depend on workers or on where a run resumed). Errors become :class:`Skip` records (with
``on_error = "skip"``) that :class:`Collator` drops from the batch and hands to the loop for
counting. Batches are right-padded with the template's pad id to the longest sample of the batch;
the attention mask comes from the lengths, never from comparing ids with the pad id.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from mllmkit.data.errors import MALFORMED_RECORD, MISSING_IMAGE, TOO_LONG, UNREADABLE_IMAGE, SampleError, Skip
from mllmkit.interfaces import Sample
from mllmkit.template import IGNORE_INDEX, ChatTemplate, SampleTooLong, encode_pieces

__all__ = ["Batch", "Collator", "EncodedDataset", "EncodedSample", "SampleEncoder", "open_image"]


@attrs.frozen
class EncodedSample:
    """One sample ready to batch."""

    input_ids: list[int]
    labels: list[int]
    pixels: list[torch.Tensor]
    source: str = ""
    index: int = -1


@attrs.frozen
class Batch:
    """A micro-batch: ``input_ids``/``labels``/``attention_mask`` ``[B, T]``, ``pixels`` ``[n_images, 3, H, W]``.

    ``num_tokens`` counts labelled target tokens (what the token-mean loss divides by), ``skips``
    the samples of this batch that were dropped.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixels: torch.Tensor | None
    skips: tuple[Skip, ...] = ()

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_tokens(self) -> int:
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def model_inputs(self, device: torch.device | str) -> dict[str, torch.Tensor | None]:
        """Keyword arguments for :meth:`mllmkit.model.MLLM.forward`, moved to ``device``."""
        return {"input_ids": self.input_ids.to(device), "labels": self.labels.to(device),
                "attention_mask": self.attention_mask.to(device),
                "pixels": None if self.pixels is None else self.pixels.to(device)}


def open_image(image: Any, source: str, index: int):
    """A PIL RGB image from a PIL image or a path; missing/unreadable files raise :class:`SampleError`."""
    from PIL import Image, UnidentifiedImageError

    if not isinstance(image, (str, pathlib.Path)):
        return image.convert("RGB")
    path = pathlib.Path(image)
    if not path.is_file():
        raise SampleError(MISSING_IMAGE, source, index, f"image not found: {path}")
    try:
        with Image.open(path) as handle:
            return handle.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise SampleError(UNREADABLE_IMAGE, source, index, f"cannot read image {path}: {exc}") from None


class SampleEncoder:
    """Sample → :class:`EncodedSample` with the template, the length limit and the image transform."""

    def __init__(self, template: ChatTemplate, tokens_per_image: int, transform: Callable[[Any], torch.Tensor],
                 max_len: int, system: str | None = None) -> None:
        self.template, self.tokens_per_image, self.transform = template, tokens_per_image, transform
        self.max_len, self.system = max_len, system

    def encode_text(self, sample: Sample, add_generation_prompt: bool = False, messages=None):
        pieces = self.template.pieces(messages if messages is not None else sample.messages, self.tokens_per_image,
                                      system=self.system, add_generation_prompt=add_generation_prompt)
        try:
            return encode_pieces(pieces, self.max_len)
        except SampleTooLong as exc:
            raise SampleError(TOO_LONG, sample.source, sample.index, str(exc)) from None

    def pixels(self, sample: Sample, seed: int | None) -> list[torch.Tensor]:
        images = [open_image(image, sample.source, sample.index) for image in sample.images]
        if seed is None:
            return [self.transform(image) for image in images]
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also seeds every accelerator backend lazily,
            # recording a stack trace each time (2 ms a sample, more than the transform itself)
            torch.random.default_generator.manual_seed(seed)
            return [self.transform(image) for image in images]

    def __call__(self, sample: Sample, seed: int | None = None) -> EncodedSample:
        encoded = self.encode_text(sample)
        if encoded.num_images != len(sample.images):
            raise SampleError(MALFORMED_RECORD, sample.source, sample.index,
                              f"{encoded.num_images} image marker(s) in the text but {len(sample.images)} image(s)")
        return EncodedSample(encoded.input_ids, encoded.labels, self.pixels(sample, seed), sample.source, sample.index)


class EncodedDataset:
    """Map-style view for a DataLoader: key ``(dataset_no, index, seed)`` → EncodedSample or Skip.

    With ``on_error = "fail"`` the :class:`SampleError` propagates (the run stops with its message).
    """

    def __init__(self, datasets: Sequence[Any], encoder: SampleEncoder, on_error: str = "skip") -> None:
        self.datasets, self.encoder, self.on_error = list(datasets), encoder, on_error

    def __getitem__(self, key: tuple[int, int, int]) -> EncodedSample | Skip:
        dataset_no, index, seed = key
        dataset = self.datasets[dataset_no]
        try:
            return self.encoder(dataset[index], seed)
        except SampleError as exc:
            if self.on_error == "fail":
                raise
            return Skip.from_error(exc)


class Collator:
    """List of EncodedSample/Skip → :class:`Batch` (skips dropped and recorded)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, items: Sequence[EncodedSample | Skip]) -> Batch:
        samples = [s for s in items if isinstance(s, EncodedSample)]
        skips = tuple(s for s in items if isinstance(s, Skip))
        length = max((len(s.input_ids) for s in samples), default=0)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
        images = [p for s in samples for p in s.pixels]
        pixels = torch.stack(images) if images else None
        return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask, pixels=pixels, skips=skips)
