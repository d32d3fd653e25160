"""The recipe's own schema (validation pass 1): sections, their keys, and component tables.

A component table is ``type = "<name>"`` plus that component's options; pass 2
(:mod:`mllmkit.recipe.resolve`) validates the options against the component's config class.
"""

from __future__ import annotations

import math
import pathlib
import re
from typing import Any, Literal

import attrs

from mllmkit.config import ConfigValueError, non_negative, positive
from mllmkit.generation_settings import GenerationSettings

__all__ = ["check_betas", "check_lr_scale_values", "finite", "ModelSection", "DataSection", "TrainSection", "ChatSection", "EvalSection", "RecipeSchema"]


@attrs.frozen(kw_only=True)
class ModelSection:
    vision: dict
    bridges: list[dict] = attrs.Factory(list)
    llm: dict
    init_from: pathlib.Path | None = None
    """An earlier run's export folder (or any checkpoint chat reads) loaded over the assembled model by
    parameter name, strictly (stage 1 → stage 2: ``init_from = "runs/stage1/export"``)."""


@attrs.frozen(kw_only=True)
class DataSection:
    train: list[dict] = attrs.Factory(list)
    eval: list[dict] = attrs.Factory(list)
    on_error: Literal["skip", "fail"] = "skip"
    """What to do with a record or image that cannot be used: skip it (counted and reported) or stop."""
    num_workers: int = attrs.field(default=0, validator=non_negative)
    group_by_length: bool = False
    """Batch samples of similar length together (less padding)."""
    pad_to_multiple: int = attrs.field(default=1, validator=positive)
    """Pad each micro-batch to a multiple of this many tokens (fewer shapes for the GPU's kernels; pads
    are unlabelled, so the loss is unchanged)."""
    packing: bool = False
    """Pack several whole samples into one row per micro-batch (no padding between them; positions restart
    and attention stays within each sample). Needs ``max_tokens_per_batch``, ``train.micro_batch_size = 1``
    and ``train.loss_reduction = "token"``."""
    max_tokens_per_batch: int | None = attrs.field(default=None, validator=positive)
    """With ``packing``: tokens per packed row (at least ``train.max_text_len``)."""
    augment: bool = True
    """Training images get the encoder's training transform (random crops); false = its eval transform."""
    system: str | None = None
    """System prompt for training and evaluation; unset uses the LLM template's default."""


def finite(instance: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not math.isfinite(value):
        raise ConfigValueError(attribute.name, f"expected a finite number, found {value!r}")


def check_betas(betas: tuple[float, ...]) -> None:
    """``train.betas``: two numbers in [0, 1)."""
    if len(betas) != 2:
        raise ConfigValueError("betas", f"expected two numbers [beta1, beta2], found {len(betas)}: {list(betas)}")
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ConfigValueError(f"betas[{i}]", f"expected a value in [0, 1), found {beta!r}")


def check_lr_scale_values(lr_scale: dict[str, float]) -> None:
    """``train.lr_scale``: keys name parts (vision, bridges, bridges.N, llm), values are finite and >= 0."""
    for key, value in lr_scale.items():
        if not re.fullmatch(r"vision|bridges|bridges\.\d+|llm", key):
            raise ConfigValueError(f"lr_scale.{key}", "unknown part; keys are vision, bridges, bridges.N or llm")
        if not (math.isfinite(value) and value >= 0):
            raise ConfigValueError(f"lr_scale.{key}", f"expected a finite value >= 0, found {value!r}")


@attrs.frozen(kw_only=True)
class TrainSection:
    output_dir: pathlib.Path | None = None
    """Run folder; unset = ./runs/<recipe name> under the current directory."""
    seed: int = 42
    epochs: int = attrs.field(default=1, validator=positive)
    max_steps: int | None = attrs.field(default=None, validator=positive)
    """Stop after this many optimizer steps (overrides epochs when set)."""
    lr: float = attrs.field(default=1e-4, validator=[positive, finite])
    min_lr: float = attrs.field(default=0.0, validator=non_negative)
    warmup_steps: int = attrs.field(default=0, validator=non_negative)
    """Linear warmup length, counted in optimizer steps."""
    warmup_lr: float = attrs.field(default=0.0, validator=non_negative)
    weight_decay: float = attrs.field(default=0.05, validator=non_negative)
    lr_scale: dict[str, float] = attrs.field(factory=dict, validator=lambda _, __, value: check_lr_scale_values(value))
    """Learning-rate multipliers by part, e.g. ``{vision = 0.3, llm = 1.0}``: keys are ``vision``,
    ``bridges``, ``bridges.N`` or ``llm`` (the longest matching one applies); unlisted parts get 1."""
    betas: tuple[float, float] = attrs.field(default=(0.9, 0.999), validator=lambda _, __, value: check_betas(value))
    """AdamW's two moment decays, each in [0, 1)."""
    eps: float = attrs.field(default=1e-8, validator=positive)
    grad_clip: float = attrs.field(default=1.0, validator=non_negative)
    """Clip the global gradient norm to this (0 = off); correct under fp16 loss scaling."""
    micro_batch_size: int = attrs.field(default=1, validator=positive)
    grad_accum: int = attrs.field(default=1, validator=positive)
    max_text_len: int = attrs.field(default=256, validator=positive)
    loss_reduction: Literal["token", "sample"] = "token"
    """token: mean over every labelled token of the optimizer step; sample: the seed's per-micro-batch mean."""
    loss_logits: Literal["labelled", "all"] = "labelled"
    """Where the LLM head runs: only at labelled positions, or at every position as the seed did (same
    loss, more time and memory: for comparing with the seed)."""
    cache_features: bool = False
    """Compute the frozen vision encoder's (and frozen leading bridges') features once per image and reuse
    them every epoch; needs a frozen encoder and ``[data] augment = false``."""
    feature_cache: Literal["memory", "disk"] = "memory"
    """Where cached features live: the training device's memory for this run, or also
    ``<run>/feature_cache/<fingerprint>/`` on disk, read back by a resumed or repeated run."""
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"
    """Autocast precision for the forward pass (fp32 turns autocast off)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    log_every: int = attrs.field(default=10, validator=positive)
    eval_every: int | None = attrs.field(default=None, validator=positive)
    save_every: int | None = attrs.field(default=None, validator=positive)
    keep_last: int = attrs.field(default=2, validator=positive)
    fused_kernels: Literal["none", "liger"] = "none"
    """Fused training kernels for the LLM: ``"liger"`` patches RMSNorm, rotary and SwiGLU with liger-kernel's
    Triton kernels and computes the loss with its fused linear + cross-entropy (CUDA only; the ``liger`` extra)."""
    eval_max_new_tokens: int = attrs.field(default=16, validator=positive)
    tensorboard: bool = True


@attrs.frozen(kw_only=True)
class ChatSection(GenerationSettings):
    """``[chat]``: the generation settings (see GenerationSettings) plus the chat's own options."""

    system: str | None = None
    """System prompt; unset uses the LLM template's default."""
    max_window_tokens: int = attrs.field(default=6144, validator=positive)
    """History window, image tokens included."""
    checkpoint: pathlib.Path | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"


@attrs.frozen(kw_only=True)
class EvalSection:
    """``[eval]``: evaluation tasks run at ``train.eval_every`` and at the end of training (``[[eval.tasks]]``
    tables: ``type`` plus the task's options), and which export to keep as the best."""

    tasks: list[dict] = attrs.Factory(list)
    batch_size: int = attrs.field(default=8, validator=positive)
    """Questions answered together (left-padded greedy decoding)."""
    best_metric: str | None = None
    """Keep the export with the best value of this metrics.jsonl key (``eval_accuracy``, ``pope/f1``, ...) in
    ``<run>/best/``."""
    best_mode: Literal["max", "min"] = "max"


@attrs.frozen(kw_only=True)
class RecipeSchema:
    """The top level of a recipe file (after ``extends`` merging)."""

    model: ModelSection
    data: DataSection = attrs.Factory(DataSection)
    train: TrainSection = attrs.Factory(TrainSection)
    parallel: dict = attrs.Factory(lambda: {"type": "single"})
    chat: ChatSection = attrs.Factory(ChatSection)
    eval: EvalSection = attrs.Factory(EvalSection)
    extends: Any = None
