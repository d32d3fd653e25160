"""Recipe options of the ``pipeline`` backend (the ``[parallel]`` table).

Optimizer, schedule, batch sizes, clipping and precision come from ``[train]`` so a recipe means
the same thing under every backend; these tables only hold what is DeepSpeed-specific.
"""

from __future__ import annotations

import pathlib
from typing import Any, Literal

import attrs

from mllmkit.config import ConfigValueError, config, non_negative, positive

__all__ = ["PipelineConfig"]


def _stage_map(instance: Any, attribute: attrs.Attribute, value: list[int] | None) -> None:
    if value is None:
        return
    if len(value) != instance.num_stages:
        raise ConfigValueError(attribute.name, f"has {len(value)} entries but num_stages = {instance.num_stages}; "
                                               f"give one decoder-layer count per stage")
    if any(n < 0 for n in value):
        raise ConfigValueError(attribute.name, f"expected decoder-layer counts >= 0, found {value}")


def _one_of(*allowed: int, why: str = ""):
    def check(instance: Any, attribute: attrs.Attribute, value: int) -> None:
        if value not in allowed:
            raise ConfigValueError(attribute.name, f"expected one of {', '.join(map(str, allowed))}, found {value!r}"
                                                   + (f" ({why})" if why else ""))
    return check


@config
class PipelineConfig:
    """Options of ``pipeline`` (DeepSpeed pipeline parallel; data parallel = world size / num_stages)."""

    num_stages: int = attrs.field(default=2, validator=positive)
    stage_map: list[int] | None = attrs.field(default=None, validator=_stage_map)
    """Decoder layers per stage, e.g. [19, 21]; stage 0 also holds vision + bridges + embedding, the
    last stage the final norm + head. Unset: partition by estimated cost (parameters and FLOPs)."""
    partition: Literal["cost", "measured"] = "cost"
    """How stages are cut when ``stage_map`` is unset: by the FLOP cost model, or by measured per-layer
    forward + backward seconds (read from ``profile``; measured there first by rank 0 when the file is
    missing, which needs ``meta_init = false``)."""
    profile: pathlib.Path = pathlib.Path("pipeline_profile.json")
    """The per-layer time profile of ``partition = "measured"`` (JSON; relative to the recipe's folder)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in the backward pass (less activation memory)."""
    meta_init: bool = True
    """Build the model with parameters on the meta device and materialise only this rank's stage
    (random-weight presets: initialised on the device; parts loaded from files: the rest is freed)."""
    zero_stage: int = attrs.field(default=0, validator=_one_of(0, 1, why="DeepSpeed refuses ZeRO-2/3 with a pipeline"))
    """ZeRO with a pipeline: 0 or 1 (DeepSpeed refuses 2/3). 1 needs a trainable parameter on every stage."""
    plan_seq_len: int | None = attrs.field(default=None, validator=positive)
    """Sequence length the cost model assumes; unset = train.max_text_len."""
    images_per_sample: float = attrs.field(default=1.0, validator=non_negative)
    """Images per sample the cost model assumes."""
    timeout_s: int = attrs.field(default=600, validator=positive)
    """A collective or stage-to-stage transfer waiting longer than this raises instead of hanging."""
    extra: dict = attrs.Factory(dict)
    """Raw DeepSpeed config entries merged last (expert use)."""
