"""The roles components play, as Protocols, and what builders receive.

A newcomer reads this file to learn what a vision encoder, a bridge, an LLM, a dataset and a
parallel backend must provide. Builders registered through :mod:`mllmkit.hookspecs` are called as
``build(config, context)`` with a :class:`BuildContext`; model parts also declare their widths
without reading weights through ``ComponentSpec.dims`` (see :class:`PartDims`).
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs
import torch
from torch import nn

from mllmkit.template import ChatTemplate, Message

__all__ = [
    "BuildContext", "PartDims", "Sample", "VisionEncoder", "Bridge", "Tokenizer", "LLM", "Dataset",
    "Runner", "ParallelBackend",
]


@attrs.frozen
class BuildContext:
    """What a builder may need beyond its own options.

    ``key`` is the recipe key path of the component (for error messages), ``recipe_dir`` the folder
    relative paths resolve against. For bridges, ``in_dim``/``in_tokens`` are the previous part's
    output and ``llm_hidden`` the LLM's width. ``model`` is the assembled MLLM when datasets or
    backends are built. For model parts, ``dtype`` is what a builder that reads weights should read
    them into (the recipe's ``precision``, fp32 where the part trains or runs on CPU; LLMs: every
    weight, vision encoders and bridges: Linear/Conv weights, the rest fp32) and ``device`` where the
    model will run; the core casts and freezes the built part itself (``None``: not known).
    ``recipe`` is the loaded recipe where evaluation tasks are built.
    """

    key: str
    recipe_dir: pathlib.Path | None = None
    in_dim: int | None = None
    in_tokens: int | None = None
    llm_hidden: int | None = None
    dtype: torch.dtype | None = None
    device: torch.device | None = None
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
    """Images to feature tokens: ``forward(pixels [B,3,H,W]) -> [B, num_tokens, out_dim]``.

    ``gradient_checkpointing(enabled)`` recomputes the blocks in backward; the core calls it when the
    recipe sets ``gradient_checkpointing = true`` (an encoder without it refuses that setting).
    """

    out_dim: int
    num_tokens: int
    image_size: int

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor: ...
    def image_transform(self, train: bool) -> Callable[[Any], torch.Tensor]: ...
    def blocks(self) -> Sequence[nn.Module]: ...
    def gradient_checkpointing(self, enabled: bool) -> None: ...


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
    ``gradient_checkpointing(enabled)`` recomputes the decoder layers in backward (the core calls it
    from the recipe's ``gradient_checkpointing``); ``checkpointing`` says whether it is on.
    """

    hidden_size: int
    tokenizer: Tokenizer
    template: ChatTemplate
    checkpointing: bool

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...
    def hidden(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None) -> torch.Tensor: ...
    def logits(self, hidden: torch.Tensor) -> torch.Tensor: ...
    def gradient_checkpointing(self, enabled: bool) -> None: ...


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


class Runner(Protocol):
    """What a backend supplies to the core's optimizer step (:class:`mllmkit.train.engine.Engine`).

    ``forward_backward(window, autocast)`` runs forward (under ``autocast()``) and backward over
    ``window.micro_batches``, backpropagating ``window.share(loss_sum, tokens)`` of each micro-batch
    (a pipeline schedule calls ``share`` in its loss function on the last stage);
    ``loss_multiplier(n)`` is the factor the backend's gradient averaging divides by (data-parallel
    ranks; times ``n`` where it also divides by the accumulation steps). ``apply(clip, scaler)``
    unscales (fp16), clips the global gradient norm to ``clip`` (0 = off), steps and zeroes the
    gradients, returning the norm before clipping. ``eval_forward(batch)`` gives ``(loss sum, tokens)``.
    ``gather_state(step)`` returns ``{"model": {name: full tensor on CPU}, "optimizer": {"state": {name:
    {...}}, "param_groups": [...]}}`` (a collective under sharding); ``load_state(state)`` takes that
    from any backend. ``optimizer`` holds the groups whose ``lr`` the core sets every step;
    ``uses_grad_scaler`` says whether fp16 loss scaling goes through torch's GradScaler.
    """

    optimizer: Any
    uses_grad_scaler: bool

    def loss_multiplier(self, micro_batches: int) -> float: ...
    def forward_backward(self, window: Any, autocast: Callable[[], Any]) -> None: ...
    def apply(self, clip: float, scaler: Any) -> float: ...
    def eval_forward(self, batch: Any) -> tuple[torch.Tensor | float, torch.Tensor | int]: ...
    def gather_state(self, step: int) -> dict[str, Any]: ...
    def load_state(self, state: dict[str, Any]) -> None: ...


class ParallelBackend(Protocol):
    """How training is spread: ``single``, ``ddp``, ``zero``, ``pipeline`` (build on
    :class:`mllmkit.train.dist.BackendBase`, which holds the collectives and the defaults).

    Declared before anything starts: ``processes_needed()`` (the fewest processes of a job, e.g. one
    per pipeline stage; ``mllmkit run`` starts that many itself) and ``assemble(recipe)`` (how the
    model is built; default :func:`mllmkit.assemble.assemble`). ``setup()`` joins the process group
    (the launcher's environment) and picks the device; ``prepare(model, optimizer_factory, lr_schedule,
    train)`` moves or wraps the model and returns a :class:`mllmkit.train.engine.Engine` around its
    :class:`Runner` (``optimizer_factory(named_trainable_params)`` builds AdamW with the recipe's
    parameter groups). ``rank``/``world_size`` are the data-parallel view the loop splits data by,
    ``batch_replicas`` how many processes see each batch; ``all_reduce`` sums a CPU tensor over all
    processes; ``all_gather_object`` collects a picklable object from each; only ``is_main`` writes.
    """

    rank: int
    world_size: int
    batch_replicas: int
    is_main: bool
    device: torch.device

    def processes_needed(self) -> int: ...
    def assemble(self, recipe: Any) -> nn.Module: ...
    def setup(self) -> None: ...
    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any],
                lr_schedule: Callable[[int], float], train: Any) -> Any: ...
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def all_gather_object(self, obj: Any) -> list[Any]: ...
    def barrier(self) -> None: ...
    def shutdown(self) -> None: ...
