"""The roles components play, as Protocols, and what builders receive.

A newcomer reads this file to learn what a vision encoder, a bridge, an LLM, a dataset and a
parallel backend must provide. Builders registered through :mod:`mllmkit.hookspecs` are called as
``build(config, context)`` with a :class:`BuildContext`; model parts also declare their widths
without reading weights through ``ComponentSpec.dims`` (see :class:`PartDims`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

from mllmkit.template import ChatTemplate, Message

__all__ = [
    "BuildContext", "PartDims", "Sample", "VisionEncoder", "Bridge", "Tokenizer", "LLM", "Dataset",
    "Engine", "ParallelBackend",
]


@attrs.frozen
class BuildContext:
    """What a builder may need beyond its own options.

    ``key`` is the recipe key path of the component (for error messages), ``recipe_dir`` the folder
    relative paths resolve against. For bridges, ``in_dim``/``in_tokens`` are the previous part's
    output and ``llm_hidden`` the LLM's width. ``model`` is the assembled MLLM when datasets or
    backends are built.
    """

    key: str
    recipe_dir: pathlib.Path | None = None
    in_dim: int | None = None
    in_tokens: int | None = None
    llm_hidden: int | None = None
    model: Any = None
    recipe: Any = None


@attrs.frozen
class PartDims:
    """Widths a model part declares from its config alone (no weights read).

    Vision encoders fill ``out_dim``/``out_tokens``; bridges ``in_dim`` (None = accepts whatever
    comes), ``out_dim``, ``out_tokens``; LLMs ``out_dim`` = hidden size.
    """

    out_dim: int
    out_tokens: int | None = None
    in_dim: int | None = None


@attrs.frozen
class Sample:
    """One training or evaluation example: images (PIL images or paths) and a conversation.

    ``messages`` use roles ``system``/``user``/``assistant``; ``mllmkit.template.IMAGE_MARKER`` in a
    message marks where each image goes, in order. ``source``/``index`` say where it came from.
    """

    images: Sequence[Any]
    messages: Sequence[Message]
    source: str = ""
    index: int = -1


@runtime_checkable
class VisionEncoder(Protocol):
    """Images to feature tokens: ``forward(pixels [B,3,H,W]) -> [B, num_tokens, out_dim]``."""

    out_dim: int
    num_tokens: int
    image_size: int

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def image_transform(self, train: bool) -> Callable[[Any], torch.Tensor]: ...
    def blocks(self) -> Sequence[nn.Module]: ...


@runtime_checkable
class Bridge(Protocol):
    """Feature tokens to other feature tokens: ``forward([B,N,in_dim]) -> [B, tokens_out(N), out_dim]``."""

    in_dim: int
    out_dim: int

    def __call__(self, feats: torch.Tensor) -> torch.Tensor: ...
    def tokens_out(self, tokens_in: int) -> int: ...


class Tokenizer(Protocol):
    """Text to ids. ``encode`` always treats special-token strings as plain text."""

    vocab_size: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@runtime_checkable
class LLM(Protocol):
    """A causal language model with its tokenizer and chat template.

    ``embed(ids)`` gives input embeddings; ``hidden(inputs_embeds, attention_mask, position_ids)``
    runs the decoder stack and final norm; ``logits(hidden)`` applies the head, so the loss can be
    computed at labelled positions only. ``hf_model`` is the underlying transformers model (for
    generation and pipeline partitioning through ``layers()``, ``norm``, ``head``).
    """

    hidden_size: int
    tokenizer: Tokenizer
    template: ChatTemplate

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor: ...
    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class Dataset(Protocol):
    """A map-style dataset of :class:`Sample` objects.

    ``__getitem__`` raises :class:`mllmkit.data.errors.SampleError` (cause, file, record index) for
    a record it cannot use; the loader skips or stops as ``[data] on_error`` says. Optional:
    ``approx_length(index)`` (a cheap length for ``group_by_length``), ``chance_accuracy()`` (the
    exact-match score of guessing, reported beside the held-out accuracy).
    """

    name: str

    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Sample: ...


class Engine(Protocol):
    """A model prepared by a backend: one optimizer step per :meth:`train_step`, checkpointable.

    ``train_step(micro_batches)`` takes this rank's ``grad_accum`` micro-batches
    (:class:`mllmkit.data.collate.Batch`), sets the learning rate ``lr_schedule(step)``, runs forward
    and backward, clips, steps the optimizer and returns ``{"loss", "lr", "grad_norm", "tokens",
    "samples"}`` — the true loss of the step over all ranks and the global counts. ``eval_loss(batch)``
    gives this rank's ``(loss sum, labelled tokens)``. ``state_dict()`` returns, on the main rank at
    least, ``{"model": {MLLM parameter name: full tensor}, "optimizer": {"state": {name: ...},
    "param_groups": [...]}, "step": int}``; ``load_state_dict`` accepts that from any backend.
    ``model`` is the unwrapped MLLM (used for generation), ``device`` where batches go.
    """

    model: nn.Module
    device: torch.device
    step: int

    def train_step(self, micro_batches: Sequence[Any]) -> dict[str, float]: ...
    def eval_loss(self, batch: Any) -> tuple[float, int]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class ParallelBackend(Protocol):
    """How training is spread: ``single``, ``ddp``, ``zero``, ``pipeline``.

    ``setup()`` joins the process group (torchrun's environment) and picks the device;
    ``prepare(model, optimizer_factory, lr_schedule, train)`` moves/wraps the model and returns an
    :class:`Engine`; ``optimizer_factory(named_trainable_params)`` builds AdamW with the recipe's
    parameter groups, ``lr_schedule(step)`` gives the learning rate of an optimizer step, ``train``
    is the recipe's ``[train]`` section. ``all_reduce`` sums a CPU tensor over ranks;
    ``all_gather_object`` collects a picklable object from every rank; only ``is_main`` writes files.
    """

    rank: int
    world_size: int
    is_main: bool
    device: torch.device

    def setup(self) -> None: ...
    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any],
                lr_schedule: Callable[[int], float], train: Any) -> Engine: ...
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def all_gather_object(self, obj: Any) -> list[Any]: ...
    def barrier(self) -> None: ...
    def shutdown(self) -> None: ...


def iter_named_trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Parameters that require grad, with names."""
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)
