"""The model a chat talks to: assemble the recipe, load trained weights by name, place and cast it.

:func:`load_trained_weights` reads any layout :func:`mllmkit.checkpoint_formats.read_trainable_weights`
accepts and loads it strictly by parameter name: mllmkit exports use the model's own names
(``bridges.1.proj.weight``); the seed's ``llm_proj.weight``/``llm_proj.bias`` go to the ``linear``
bridge that outputs the LLM's hidden size. A key that matches no parameter is refused with the
expected names; the seed's fine-tuned-LLM file (``llm_model.transformer.*``) is refused by name.
"""

from __future__ import annotations

import contextlib
import logging
import pathlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from mllmkit.config import torch_dtype
from mllmkit.errors import UserError
from mllmkit.precision import effective_precision, layout_for_autocast, resolve_device
from mllmkit.weights import KeyMap, WeightsError, load_into

__all__ = [
    "load_chat_model",
    "load_trained_weights",
    "place_model",
    "resolve_device",
    "seed_projection_index",
]

SUPPORTED = ("supported: an mllmkit export folder or its trainable.safetensors (keys named like the model's "
             "parameters), and the seed's projection checkpoints with llm_proj.weight and llm_proj.bias "
             "(LAVIS checkpoint_N.pth, model.pth, DeepSpeed mp_rank_00_model_states.pt)")


def seed_projection_index(model) -> int:
    """Index of the ``linear`` bridge that ends at the LLM's hidden size (the seed's ``llm_proj``)."""
    from mllmkit.builtin.projection_bridges import LinearBridge

    found = [i for i, b in enumerate(model.bridges)
             if isinstance(b, LinearBridge) and b.out_dim == model.llm.hidden_size]
    if not found:
        raise WeightsError("the checkpoint holds the seed's llm_proj.* projection, but the recipe has no "
                           f"'linear' bridge with out_dim = the LLM hidden size ({model.llm.hidden_size}); "
                           "add [[model.bridges]] type = \"linear\" after the last bridge")
    return found[-1]


def load_trained_weights(model, path: str | pathlib.Path) -> list[str]:
    """Load a trained checkpoint into ``model`` by name (strict: every key must be a model tensor).

    Returns the model names that were loaded.
    """
    from mllmkit.checkpoint_formats import read_trainable_weights

    tensors = read_trainable_weights(path)
    seed_llm = [k for k in tensors if k.startswith("llm_model.")]
    if seed_llm:
        raise WeightsError(
            f"{path}: holds a fine-tuned LLM in the seed's layout ({len(seed_llm)} keys like {seed_llm[0]!r}, "
            f"from unfreeze_llm_model.pth); loading it is not supported; {SUPPORTED}")
    rules: list[tuple[str, Any]] = []
    if any(k.startswith("llm_proj.") for k in tensors):
        rules.append((r"llm_proj[.](.*)", rf"bridges.{seed_projection_index(model)}.proj.\1"))
    rules.append((r"(.*)", r"\1"))
    key_map = KeyMap(rules=rules)
    names = dict(model.state_dict(keep_vars=True))
    unexpected = [k for k in tensors if key_map.apply(k, tensors[k])[0][0] not in names]
    if unexpected:
        expected = [n for n, p in model.named_parameters() if p.requires_grad] or list(names)[:10]
        raise WeightsError(
            f"{path}: keys that match no model parameter ({len(unexpected)}): {', '.join(sorted(unexpected)[:10])}; "
            f"expected this model's parameter names (trainable ones: {', '.join(expected[:10])}) or the seed's "
            f"llm_proj.weight, llm_proj.bias; {SUPPORTED}")
    report = load_into(model, [list(tensors.items())], key_map, source=str(path), allow_missing=[".*"])
    return report.loaded


def place_model(model, device: str | torch.device | None, precision: str | None):
    """Move ``model`` to ``device``; ``precision`` is the LLM's (``fp32`` casts every part to fp32). The
    vision encoder and bridges run in their own declared precision as in training (``MLLM.run_part``);
    one declared fp16 runs in fp32 on CPU (its weights cast, with a notice)."""
    if precision is not None and precision not in ("fp32", "bf16", "fp16"):
        raise UserError(f"precision must be one of fp32, bf16, fp16, found {precision!r}")
    device = resolve_device(device)
    if precision == "fp32":
        model.float()
    elif precision is not None:
        model.llm.to(torch_dtype(effective_precision(precision, device, "chat.precision")))
    for name, declared in model.part_precision.items():
        if effective_precision(declared, device, name) != declared:
            layout_for_autocast(model.get_submodule(name), torch.float32)
            model.part_precision[name] = "fp32"
    model.to(device)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _recipe_and_export(recipe: Any) -> tuple[Any, pathlib.Path | None]:
    """An export folder (with recipe.toml) stands for its recipe and its weights."""
    if isinstance(recipe, (str, pathlib.Path)) and pathlib.Path(recipe).is_dir():
        folder = pathlib.Path(recipe)
        if not (folder / "recipe.toml").is_file():
            raise UserError(f"{folder}: a folder was given as the recipe, but it has no recipe.toml "
                            f"(give a recipe file, or an mllmkit export folder)")
        return folder / "recipe.toml", folder
    return recipe, None


def load_chat_model(recipe: Any, *, checkpoint: str | pathlib.Path | None = None, device: str | None = None,
                    precision: str | None = None, overrides: Iterable[str] = ()):
    """Assemble ``recipe`` (a path, dict, Recipe or export folder), load ``checkpoint`` (or the recipe's
    ``chat.checkpoint``, or the export's weights), place it. Returns ``(model, recipe)``."""
    from mllmkit import assemble, load_recipe
    from mllmkit.recipe import Recipe

    source, export = _recipe_and_export(recipe)
    if not isinstance(source, Recipe):
        source = load_recipe(source, list(overrides))
    checkpoint = checkpoint or source.chat.checkpoint or export
    with _held_warnings() as held:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(source.train.seed)  # as training does: parts without weight files match its
            model = assemble(source, device=resolve_device(device or source.chat.device))
        if checkpoint is not None:
            loaded = set(load_trained_weights(model, checkpoint))
            held.drop(_part_keys(source, model, loaded))
    place_model(model, device or source.chat.device, precision or source.chat.precision)
    return model, source


class _HeldWarnings(logging.Handler):
    """The warnings logged while the chat model is built, held until its checkpoint is loaded."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def drop(self, keys: Iterable[str]) -> None:
        """Forget the records about these recipe keys (``model.vision: … randomly initialised`` is
        not true of a part whose every weight the checkpoint holds)."""
        prefixes = tuple(f"{key}:" for key in keys)
        self.records = [r for r in self.records if not r.getMessage().startswith(prefixes)]


@contextlib.contextmanager
def _held_warnings() -> Iterator[_HeldWarnings]:
    root = logging.getLogger()
    held = _HeldWarnings()
    root.addHandler(held)
    try:
        yield held
    finally:
        root.removeHandler(held)
        for record in held.records:
            logging.getLogger(record.name).handle(record)


def _part_keys(recipe, model, loaded: set[str]) -> list[str]:
    """Recipe keys (``model.vision``, ``model.bridges[1]``, ``model.llm``) of the parts whose every
    parameter came from the checkpoint."""
    keys = {"vision": recipe.vision.key, "llm": recipe.llm.key,
            **{f"bridges.{i}": bridge.key for i, bridge in enumerate(recipe.bridges)}}
    return [keys[name] for name, part in model.parts()
            if all(f"{name}.{n}" in loaded for n, _ in part.named_parameters())]
