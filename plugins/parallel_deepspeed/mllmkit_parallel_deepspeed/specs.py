"""The component specs of this plugin: ``zero`` and ``pipeline`` (DeepSpeed is imported at setup only)."""

from __future__ import annotations

from mllmkit.interfaces import BuildContext
from mllmkit.registry import ComponentSpec
from mllmkit_parallel_deepspeed.configs import PipelineConfig, ZeroConfig

__all__ = ["SPECS"]


def _device(ctx: BuildContext) -> str:
    return ctx.recipe.train.device if ctx.recipe is not None else "auto"


def _build_zero(cfg: ZeroConfig, ctx: BuildContext):
    from mllmkit_parallel_deepspeed.zero import ZeroBackend

    return ZeroBackend(cfg, _device(ctx))


def _build_pipeline(cfg: PipelineConfig, ctx: BuildContext):
    from mllmkit_parallel_deepspeed.pipeline import PipelineBackend

    return PipelineBackend(cfg, _device(ctx), recipe=ctx.recipe)


SPECS = [
    ComponentSpec("zero", ZeroConfig, _build_zero,
                  "DeepSpeed ZeRO stage 0-3 data parallel over the trainable parts (torchrun / deepspeed launcher)"),
    ComponentSpec("pipeline", PipelineConfig, _build_pipeline,
                  "DeepSpeed pipeline parallel (N stages x data parallel), cost-based or explicit stage map"),
]
