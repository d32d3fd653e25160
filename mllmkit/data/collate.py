"""Samples to batches: image transforms, the LLM's template and label mask, dynamic padding.

:class:`SampleEncoder` turns one :class:`~mllmkit.interfaces.Sample` into ids, labels and pixels
(opening images, applying the encoder's transform with a per-sample random seed so augmentation
does not depend on workers or on where a run resumed). Errors become :class:`Skip` records (with
``on_error = "skip"``) that :class:`Collator` drops from the batch and hands to the loop for
counting. Batches are right-padded with the template's pad id to the longest sample of the batch
(rounded up to ``pad_to_multiple``);
the attention mask comes from the lengths, never from comparing ids with the pad id. Packed rows
(several samples in one row, ``position_ids`` per sample) come from
:class:`mllmkit.data.packing.PackingCollator`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch

from mllmkit.data.errors import MALFORMED_RECORD, MISSING_IMAGE, TOO_LONG, UNREADABLE_IMAGE, SampleError, Skip
from mllmkit.data.images import ImageMissing, ImageUnreadable, read_image
from mllmkit.errors import DataError
from mllmkit.interfaces import Sample
from mllmkit.model import labelled_rows
from mllmkit.template import IGNORE_INDEX, IMAGE_MARKER, ChatTemplate, SampleTooLong, encode_pieces

__all__ = ["Batch", "Collator", "EncodedDataset", "EncodedSample", "SampleEncoder", "image_fields", "open_image"]


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

    Rows are right-padded. ``num_tokens`` counts labelled target tokens (what the token-mean loss
    divides by), ``skips`` the samples of this batch that were dropped. ``loss_rows`` is
    :func:`~mllmkit.model.labelled_rows` of the host labels, computed where the batch is built (a
    DataLoader worker), so that no step gathers labelled positions on the GPU.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor
    pixels: torch.Tensor | None
    skips: tuple[Skip, ...] = ()
    image_keys: tuple[tuple[str, int, int], ...] = ()
    """Each image's ``(sample source, sample index, image number)``: what the feature cache is keyed by."""
    image_tokens: int | None = None
    """Image placeholders in ``input_ids``, counted on the host (``None``: the model counts them)."""
    image_features: torch.Tensor | None = None
    """The images' cached frozen features (:meth:`~mllmkit.model.MLLM.image_features`); replaces ``pixels``."""
    position_ids: torch.Tensor | None = None
    """Packed rows only: ``[B, T]`` positions restarting at 0 for each sample (``None``: 0, 1, … per row)."""
    samples: int | None = None
    """Packed rows only: how many samples the rows hold (``None``: one per row)."""
    loss_rows: tuple[torch.Tensor, torch.Tensor] = attrs.field(
        default=attrs.Factory(lambda self: labelled_rows(self.labels), takes_self=True))

    @property
    def size(self) -> int:
        """Samples in the batch (rows, unless packed)."""
        return int(self.input_ids.shape[0]) if self.samples is None else self.samples

    @property
    def num_tokens(self) -> int:
        return int(self.loss_rows[0].numel())

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (``DataLoader(pin_memory=True)`` calls this), so that
        :meth:`model_inputs` copies to the GPU without blocking the host."""
        def pin(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.pin_memory()

        return attrs.evolve(self, input_ids=pin(self.input_ids), labels=pin(self.labels),
                            attention_mask=pin(self.attention_mask), pixels=pin(self.pixels),
                            image_features=pin(self.image_features), position_ids=pin(self.position_ids),
                            loss_rows=(pin(self.loss_rows[0]), pin(self.loss_rows[1])))

    def model_inputs(self, device: torch.device | str) -> dict[str, Any]:
        """Keyword arguments for :meth:`mllmkit.model.MLLM.forward` on ``device``, with nothing the
        step must wait for: copies are asynchronous (from pinned memory), no attention mask (rows are
        right-padded, so the causal mask alone is exact and SDPA can take its flash kernel), the
        labelled rows, their targets and the placeholder count come from the host. Packed rows add
        their ``position_ids`` (then the LLM masks attention per sample)."""
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        rows, targets = self.loss_rows
        images = {"pixels": move(self.pixels)} if self.image_features is None \
            else {"image_features": move(self.image_features)}
        packed = {} if self.position_ids is None else {"position_ids": move(self.position_ids)}
        return {"input_ids": move(self.input_ids), "rows": move(rows), "targets": move(targets),
                "image_tokens": self.image_tokens, **images, **packed}


def image_fields(samples: Sequence[EncodedSample], input_ids: torch.Tensor,
                 image_token_id: int | None) -> dict[str, Any]:
    """A batch's ``pixels`` (stacked in sample order), ``image_keys`` and host ``image_tokens`` count."""
    images = [p for s in samples for p in s.pixels]
    return {"pixels": torch.stack(images) if images else None,
            "image_keys": tuple((s.source, s.index, j) for s in samples for j in range(len(s.pixels))),
            "image_tokens": None if image_token_id is None else int((input_ids == image_token_id).sum())}


def open_image(image: Any, source: str, index: int):
    """A PIL RGB image from a PIL image or a path; a file that cannot be used raises :class:`SampleError`."""
    try:
        return read_image(image)
    except ImageMissing as exc:
        raise SampleError(MISSING_IMAGE, source, index, str(exc)) from None
    except ImageUnreadable as exc:
        raise SampleError(UNREADABLE_IMAGE, source, index, str(exc)) from None


class SampleEncoder:
    """Sample → :class:`EncodedSample` with the template, the length limit and the image transform."""

    def __init__(self, template: ChatTemplate, tokens_per_image: int, transform: Callable[[Any], torch.Tensor],
                 max_len: int, system: str | None = None) -> None:
        self.template, self.tokens_per_image, self.transform = template, tokens_per_image, transform
        self.max_len, self.system = max_len, system

    def encode_text(self, sample: Sample, add_generation_prompt: bool = False, messages=None):
        """Ids and labels of the conversation; a record the template rejects is malformed, one whose
        image spans (or, for training, every answer token) do not fit ``max_len`` is too long."""
        messages = messages if messages is not None else sample.messages
        try:
            pieces = self.template.pieces(messages, self.tokens_per_image, system=self.system,
                                          add_generation_prompt=add_generation_prompt)
            encoded = encode_pieces(pieces, self.max_len)
        except SampleTooLong as exc:
            raise SampleError(TOO_LONG, sample.source, sample.index, str(exc)) from None
        except DataError as exc:  # the template's own checks (e.g. a system turn after the first message)
            raise SampleError(MALFORMED_RECORD, sample.source, sample.index, str(exc)) from None
        if not add_generation_prompt and any(p.labelled or p.label_ids for p in pieces) \
                and all(label == IGNORE_INDEX for label in encoded.labels):
            raise SampleError(TOO_LONG, sample.source, sample.index,
                              f"no answer token is left within max_text_len={self.max_len} "
                              f"(the conversation needs {sum(len(p.ids) for p in pieces)} tokens)")
        return encoded

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
        placed = [m["role"] for m in sample.messages if m["role"] != "user" and IMAGE_MARKER in m["content"]]
        if placed:
            raise SampleError(MALFORMED_RECORD, sample.source, sample.index,
                              f"an {IMAGE_MARKER} marker in a {placed[0]} turn; only user turns may place images")
        encoded = self.encode_text(sample)
        if encoded.num_images != len(sample.images):
            raise SampleError(MALFORMED_RECORD, sample.source, sample.index,
                              f"{encoded.num_images} image marker(s) in the text but {len(sample.images)} image(s)")
        return EncodedSample(encoded.input_ids, encoded.labels, self.pixels(sample, seed), sample.source, sample.index)


class EncodedDataset:
    """Map-style view for a DataLoader: key ``(dataset_no, index, seed)`` → EncodedSample or Skip.

    An unusable sample is always returned as a :class:`Skip` (a DataLoader worker cannot re-raise a
    :class:`SampleError` intact); :func:`mllmkit.data.loader.load_micro_batches` raises it in the
    main process when ``on_error = "fail"``.
    """

    def __init__(self, datasets: Sequence[Any], encoder: SampleEncoder, on_error: str = "skip") -> None:
        self.datasets, self.encoder, self.on_error = list(datasets), encoder, on_error

    def __getitem__(self, key: tuple[int, int, int]) -> EncodedSample | Skip:
        dataset_no, index, seed = key
        dataset = self.datasets[dataset_no]
        try:
            return self.encoder(dataset[index], seed)
        except SampleError as exc:
            return Skip.from_error(exc)


class Collator:
    """List of EncodedSample/Skip → :class:`Batch` (skips dropped and recorded).

    ``pad_to_multiple``: pad each batch to a multiple of this many tokens (fewer distinct shapes for
    the GPU's kernels; pads are unlabelled, so the loss is unchanged). ``image_token_id``: count the
    image placeholders here, on the host.
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple: int = 1, image_token_id: int | None = None) -> None:
        self.pad_token_id, self.pad_to_multiple, self.image_token_id = pad_token_id, pad_to_multiple, image_token_id

    def __call__(self, items: Sequence[EncodedSample | Skip]) -> Batch:
        samples = [s for s in items if isinstance(s, EncodedSample)]
        skips = tuple(s for s in items if isinstance(s, Skip))
        longest = max((len(s.input_ids) for s in samples), default=0)
        length = -(-longest // self.pad_to_multiple) * self.pad_to_multiple
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(samples), length), dtype=torch.long)
        for row, sample in enumerate(samples):
            n = len(sample.input_ids)
            input_ids[row, :n] = torch.tensor(sample.input_ids, dtype=torch.long)
            labels[row, :n] = torch.tensor(sample.labels, dtype=torch.long)
            attention_mask[row, :n] = 1
        return Batch(input_ids=input_ids, labels=labels, attention_mask=attention_mask, skips=skips,
                     **image_fields(samples, input_ids, self.image_token_id))
