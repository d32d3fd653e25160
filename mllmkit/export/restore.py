"""``load_export``: an exported folder back into an mllmkit :class:`~mllmkit.model.MLLM`.

No original file is needed: ``mllmkit_recipe.toml`` names the parts (weight paths removed), each part
is built on the meta device from its recipe options (the LLM by its plugin's ``restore`` from the
folder's ``text_config`` and ``tokenizer.json``), and the folder's tensors are renamed back through
the plugins' reverse tables and streamed in strictly (every tensor of every part accounted for).
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Iterator

import torch

from mllmkit.errors import UserError
from mllmkit.export.spec import ExportError
from mllmkit.export.write import RECIPE

__all__ = ["export_recipe", "load_export"]



def export_recipe(folder: str | pathlib.Path):
    """The validated recipe stored in an exported folder."""
    from mllmkit.recipe import load_recipe

    path = pathlib.Path(folder) / RECIPE
    if not path.is_file():
        raise UserError(f"{folder}: not an mllmkit export folder (no {RECIPE}); write one with mllmkit export")
    return load_recipe(path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Builders without weight files log 'randomly initialised'; here every tensor is loaded next."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _load(module: torch.nn.Module, tensors: dict[str, torch.Tensor], source: str, allow_missing=()) -> None:
    from mllmkit.weights import KeyMap, load_into

    load_into(module, [list(tensors.items())], KeyMap(rules=[(r"(.*)", r"\1")]), source=source,
              allow_missing=allow_missing)


def load_export(folder: str | pathlib.Path, *, device: str | None = None, precision: str | None = None):
    """The MLLM of an exported folder, placed on ``device`` (``precision`` as ``mllmkit chat`` takes it)."""
    from mllmkit.chat.loading import place_model
    from mllmkit.export.compose import plan_export
    from mllmkit.hf_llm import finish_meta_load
    from mllmkit.interfaces import BuildContext
    from mllmkit.model import MLLM
    from mllmkit.plugins import get_plugin_host
    from mllmkit.weights import checkpoint_files, iter_tensors, meta_parameters

    folder = pathlib.Path(folder)
    recipe = export_recipe(folder)
    plan = plan_export(recipe, get_plugin_host().registry)
    target, specs = plan.target, plan.specs
    config = target.config_type().from_pretrained(folder)
    stored: dict[str, torch.Tensor] = {}
    for shard in iter_tensors(checkpoint_files(folder)):
        stored.update(shard)
    claimed = [{k: v for k, v in stored.items() if target.reads(spec, k)} for spec in specs]
    unclaimed = sorted(set(stored) - {k for part in claimed for k in part})
    if unclaimed:
        raise ExportError(f"{folder}: tensors no part of {RECIPE} reads: {', '.join(unclaimed[:10])}")
    components = [recipe.vision, *recipe.bridges, recipe.llm]
    tensors = [target.from_target(spec, part, f"{folder} ({c.key})")
               for spec, part, c in zip(specs, claimed, components)]

    llm_dtype = next(iter(claimed[-1].values())).dtype
    llm = specs[-1].llm.restore(folder, config.text_config, recipe.llm.config, config.image_token_index, llm_dtype)
    tied = bool(config.text_config.tie_word_embeddings)
    _load(llm, tensors[-1], f"{folder} ({recipe.llm.key})", allow_missing=[r"hf_model\.lm_head\.weight"] if tied else ())
    if tied:
        llm.hf_model.lm_head.weight = llm.hf_model.model.embed_tokens.weight
    finish_meta_load(llm.hf_model, str(folder))

    with _quiet(), meta_parameters():
        vision = recipe.vision.spec.build(recipe.vision.config, BuildContext(key=recipe.vision.key, recipe_dir=folder))
    _load(vision, tensors[0], f"{folder} ({recipe.vision.key})")
    width, count, bridges = vision.out_dim, vision.num_tokens, []
    for component, part in zip(recipe.bridges, tensors[1:-1]):
        context = BuildContext(key=component.key, recipe_dir=folder, in_dim=width, in_tokens=count,
                               llm_hidden=llm.hidden_size)
        with _quiet(), meta_parameters():
            bridge = component.spec.build(component.config, context)
        _load(bridge, part, f"{folder} ({component.key})")
        width, count = bridge.out_dim, bridge.tokens_out(count)
        bridges.append(bridge)
    model = MLLM(vision, bridges, llm, trainable={name: False for name in ("vision", "llm", *(
        f"bridges.{i}" for i in range(len(bridges))))})
    return place_model(model, device or recipe.chat.device, precision or recipe.chat.precision)
