"""``mllmkit convert CKPT --to OUT``: any training checkpoint → the project's export folder.

The export (``trainable.safetensors`` keyed by MLLM parameter names + ``recipe.toml``) is what
``mllmkit chat`` and every backend load. Accepted inputs (read by
:func:`mllmkit.checkpoint_formats.read_checkpoint`, which chat uses too), recognised by their files and
key names, never by layer indices:

- mllmkit checkpoints of any backend (``single``, ``ddp``, ``zero`` at any stage, ``pipeline``):
  ``<run>/checkpoints/step_N`` or an export folder — already keyed by MLLM names;
- the seed's DeepSpeed ZeRO-0/1/2 folder (``mp_rank_00_model_states.pt`` with ``module``), also as
  the parent folder with DeepSpeed's ``latest`` file; a ZeRO-3 folder (partitioned ``module``) is
  consolidated with DeepSpeed's ``zero_to_fp32`` when DeepSpeed is installed;
- the seed's pipeline folder (``layer_XX-model_states.pt``): the projection is found by its name
  (``…llm_proj.weight``/``bias``, e.g. ``visionpipe.llm_proj.*``) in whichever layer file holds it;
- the seed's ``model.pth`` / LAVIS ``checkpoint_N.pth``.

``--merge-lora`` (:func:`merge_lora_export`) folds a LoRA run's adapters into the base weights (peft) and
writes an export of the merged parts' full weights whose recipe tunes them ``"full"`` (no adapters).

Seed names go to this project's: ``llm_proj.*`` → ``bridges.<i>.proj.*`` of the ``linear`` bridge
that outputs the LLM width. Only parameters the recipe trains are exported; the seed's full-LLM
weights (Qwen v1 layout) are refused by name. The recipe comes from ``--recipe``, else from a
``recipe.toml`` beside the checkpoint or in ``<run>/export``.
"""

from __future__ import annotations

import argparse
import pathlib
import re
from typing import Any

import torch

from mllmkit.errors import UserError
from mllmkit.weights import WeightsError

__all__ = ["convert_checkpoint", "merge_lora_export", "register_command"]

_SEED_PROJ = re.compile(r"(?:.*\.)?llm_proj\.(weight|bias)")
_SEED_LLM = re.compile(r"(?:.*\.)?(llm_model\.|transformer\.|wtepipe\.|layer\.|final_layernorm\.|lm_head\.)")
_SEED_FROZEN = re.compile(r"(?:.*\.)?(visual_encoder|ln_vision|Qformer|query_tokens|occupy)(\.|$)")


def _find_recipe(ckpt: pathlib.Path, recipe: str | None) -> pathlib.Path:
    if recipe is not None:
        return pathlib.Path(recipe)
    base = ckpt if ckpt.is_dir() else ckpt.parent
    for candidate in (base / "recipe.toml", base.parent.parent / "export" / "recipe.toml",
                      base.parent / "recipe.toml"):
        if candidate.is_file():
            return candidate
    raise UserError(f"{ckpt}: no recipe.toml beside this checkpoint or in its run's export folder; name the "
                    f"recipe it was trained with: --recipe RECIPE.toml")


def _trainable_prefixes(loaded) -> list[str]:
    prefixes = ["vision."] if loaded.vision.shared.trainable else []
    prefixes += [f"bridges.{i}." for i, b in enumerate(loaded.bridges) if b.shared.trainable]
    if loaded.llm.shared.trainable:
        prefixes.append("llm.")
    return prefixes


def merge_lora_export(ckpt: str | pathlib.Path, out: str | pathlib.Path, recipe: str | None = None,
                      overrides: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """``convert --merge-lora``: load the recipe's model with the checkpoint's adapters, fold them into the
    base weights (peft), and write an export whose recipe fully tunes those parts (no adapters) and whose
    ``trainable.safetensors`` holds their merged weights beside the other trained tensors."""
    import tomli_w

    from mllmkit.chat.loading import load_chat_model
    from mllmkit.checkpoint_formats import EXPORT_WEIGHTS
    from mllmkit.train.checkpoint import write_atomically
    from mllmkit.tune.lora import merge_adapters

    ckpt = pathlib.Path(ckpt)
    recipe_path = _find_recipe(ckpt, recipe)
    model, loaded = load_chat_model(recipe_path, checkpoint=ckpt, device="cpu", precision="fp32",
                                    overrides=overrides)  # merged in fp32
    merged = merge_adapters(model)
    if not merged:
        raise UserError(f"--merge-lora: {recipe_path} tunes no part with LoRA (tune = \"lora\"); nothing to merge")
    prefixes = tuple(f"{p}." for p in {*merged, *(p.rstrip(".") for p in _trainable_prefixes(loaded))})
    exported = {n: t.detach().contiguous() for n, t in model.state_dict().items() if n.startswith(prefixes)}
    recipe_dict = loaded.to_dict()
    for part in merged:
        table = recipe_dict["model"]["bridges"][int(part.split(".")[1])] if part.startswith("bridges.") \
            else recipe_dict["model"][part]
        table.pop("lora", None)
        table.update(tune="full", trainable=True)
        if part == "llm":
            table["quantize"] = "none"

    def write(tmp: pathlib.Path) -> None:
        from safetensors.torch import save_file

        save_file(exported, str(tmp / EXPORT_WEIGHTS))
        (tmp / "recipe.toml").write_text(tomli_w.dumps(recipe_dict))

    write_atomically(pathlib.Path(out), write)
    return {k: tuple(v.shape) for k, v in exported.items()}


def convert_checkpoint(ckpt: str | pathlib.Path, out: str | pathlib.Path, recipe: str | None = None,
                       overrides: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """Write the export folder ``out``; returns the exported names and shapes."""
    import tomli_w

    from mllmkit.assemble import check_wiring
    from mllmkit.checkpoint_formats import EXPORT_WEIGHTS, read_checkpoint
    from mllmkit.recipe import load_recipe
    from mllmkit.train.checkpoint import write_atomically

    ckpt = pathlib.Path(ckpt)
    recipe_path = _find_recipe(ckpt, recipe)
    loaded = load_recipe(recipe_path, list(overrides))
    wiring = check_wiring(loaded)
    tensors, layout = read_checkpoint(ckpt)
    prefixes = _trainable_prefixes(loaded)
    exported: dict[str, torch.Tensor] = {}
    if layout == "mllmkit":
        exported = dict(tensors)
    else:
        seed_proj = {m.group(1): v for k, v in tensors.items() if (m := _SEED_PROJ.fullmatch(k))}
        own = {k: v for k, v in tensors.items() if any(k.startswith(p) for p in ("vision.", "bridges.", "llm."))}
        if own:  # a DeepSpeed folder written around an mllmkit model keeps the MLLM names
            exported = {k: v for k, v in own.items() if any(k.startswith(p) for p in prefixes)}
        elif seed_proj:
            index = [i for i, (b, dims) in enumerate(zip(loaded.bridges, wiring.bridges))
                     if b.type == "linear" and dims.out_dim == wiring.llm.out_dim]
            if not index:
                raise WeightsError(f"{ckpt}: holds the seed's llm_proj projection, but {recipe_path} has no 'linear' "
                                   f"bridge with out_dim = the LLM hidden size {wiring.llm.out_dim}")
            if "llm." in prefixes and any(_SEED_LLM.match(k) for k in tensors):
                raise WeightsError(f"{ckpt}: the recipe trains the LLM, and this seed checkpoint's LLM weights are "
                                   f"in Qwen v1 layout, which convert does not translate; only the projection can be "
                                   f"converted (set the LLM frozen)")
            exported = {f"bridges.{index[-1]}.proj.{part}": v for part, v in seed_proj.items()}
        else:
            raise WeightsError(f"{ckpt}: a {layout} checkpoint with neither mllmkit parameter names nor the seed's "
                               f"llm_proj.*; keys: {', '.join(sorted(tensors)[:8])}")
    outside = sorted(k for k in exported if not any(k.startswith(p) for p in prefixes))
    if outside:
        raise WeightsError(f"{ckpt}: tensors of parts {recipe_path} does not train: {', '.join(outside[:8])} "
                           f"(trainable parts: {', '.join(prefixes) or 'none'})")
    if not exported:
        raise WeightsError(f"{ckpt}: no trainable tensor of {recipe_path} found (trainable parts: "
                           f"{', '.join(prefixes) or 'none'})")
    for name, value in exported.items():
        match = re.fullmatch(r"bridges\.(\d+)\.proj\.weight", name)
        if match and loaded.bridges[int(match.group(1))].type == "linear":
            i = int(match.group(1))
            in_dim = wiring.bridges[i - 1].out_dim if i > 0 else wiring.vision.out_dim
            want = (wiring.bridges[i].out_dim, in_dim)
            if tuple(value.shape) != want:
                raise WeightsError(f"{ckpt}: {name} has shape {list(value.shape)}, {recipe_path} expects {list(want)}")

    def write(tmp: pathlib.Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().float().contiguous() if v.is_floating_point() and v.dtype != torch.float32
                   else v.detach().contiguous() for k, v in exported.items()}, str(tmp / EXPORT_WEIGHTS))
        (tmp / "recipe.toml").write_text(tomli_w.dumps(loaded.to_dict()))

    write_atomically(pathlib.Path(out), write)
    return {k: tuple(v.shape) for k, v in exported.items()}


def _cmd_convert(args: argparse.Namespace) -> int:
    convert = merge_lora_export if args.merge_lora else convert_checkpoint
    shapes = convert(args.checkpoint, args.to, args.recipe, tuple(args.overrides))
    print(f"wrote {args.to}: {len(shapes)} tensor(s)")
    for name, shape in sorted(shapes.items()):
        print(f"  {name} {list(shape)}")
    return 0


def register_command(sub: Any) -> None:
    parser = sub.add_parser("convert", help="turn a training checkpoint (any backend, or the seed's DeepSpeed "
                                            "layouts) into an export folder that chat loads")
    parser.add_argument("checkpoint", help="checkpoint folder or file")
    parser.add_argument("--to", required=True, metavar="OUT", help="export folder to write")
    parser.add_argument("--recipe", metavar="RECIPE", help="the recipe it was trained with (default: found beside it)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold the LoRA adapters into the base weights: an export of merged weights, no adapters")
    parser.set_defaults(func=_cmd_convert)
