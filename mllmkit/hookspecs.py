"""The whole plugin contract of mllmkit: every hook a plugin may implement.

Plugins implement these with ``mllmkit.hookimpl`` in one ``hooks.py`` module, exposed through the
entry-point group ``mllmkit``. Hooks are called with keywords only. Each registration hook returns
a list of :class:`mllmkit.registry.ComponentSpec`; the host collects them into the registry.
"""

from __future__ import annotations

import pluggy

from mllmkit.export.spec import ExportSpec
from mllmkit.registry import ComponentSpec

__all__ = ["hookspec", "hookimpl", "HOOK_KINDS"]

hookspec = pluggy.HookspecMarker("mllmkit")
hookimpl = pluggy.HookimplMarker("mllmkit")


@hookspec
def mllmkit_register_vision_encoders() -> list[ComponentSpec]:
    """Vision encoders: ``build(config, context)`` returns a :class:`~mllmkit.interfaces.VisionEncoder`."""


@hookspec
def mllmkit_register_bridges() -> list[ComponentSpec]:
    """Bridges between vision features and the LLM (Q-Former, linear, MLP, resamplers).

    ``build(config, context)`` returns a :class:`~mllmkit.interfaces.Bridge`; ``context.in_dim`` /
    ``context.in_tokens`` are the previous part's output and ``context.llm_hidden`` the LLM width.
    """


@hookspec
def mllmkit_register_llms() -> list[ComponentSpec]:
    """Language models: ``build(config, context)`` returns a :class:`~mllmkit.interfaces.LLM`."""


@hookspec
def mllmkit_register_datasets() -> list[ComponentSpec]:
    """Datasets: ``build(config, context)`` returns a :class:`~mllmkit.interfaces.Dataset` of samples."""


@hookspec
def mllmkit_register_parallel_backends() -> list[ComponentSpec]:
    """Parallel backends: ``build(config, context)`` returns a :class:`~mllmkit.interfaces.ParallelBackend`."""


@hookspec
def mllmkit_register_exporters() -> list[ExportSpec]:
    """How model parts export to a transformers class: :class:`~mllmkit.export.ExportSpec` per component name.

    Each spec names the component it exports, the target slot it fills (``vision_model``, ``qformer``,
    ``language_projection``, ``language_model`` of ``Blip2ForConditionalGeneration``; ``vision_tower``,
    ``multi_modal_projector``, ``language_model`` of ``LlavaForConditionalGeneration``), its key tables
    both ways and the config fields it sets; LLM specs add the tokenizer, chat template and restore.
    """


@hookspec
def mllmkit_register_eval_tasks() -> list[ComponentSpec]:
    """Evaluation tasks: ``build(config, context)`` returns a :class:`~mllmkit.eval.task.EvalTask`.

    ``config`` extends :class:`~mllmkit.eval.task.EvalTaskConfig` (``data``, ``limit``, ``prompt``,
    ``max_new_tokens``); ``context.recipe`` and ``context.model`` are the recipe and the model under test.
    """


HOOK_KINDS: dict[str, str] = {
    "mllmkit_register_vision_encoders": "vision",
    "mllmkit_register_bridges": "bridge",
    "mllmkit_register_llms": "llm",
    "mllmkit_register_datasets": "dataset",
    "mllmkit_register_parallel_backends": "parallel",
    "mllmkit_register_exporters": "export",
    "mllmkit_register_eval_tasks": "eval_task",
}
