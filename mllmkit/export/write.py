"""``export_model``: a trained model (recipe + checkpoint) → a folder plain transformers loads.

The folder holds ``config.json`` (the target's config: ``Blip2Config``, ``LlavaConfig``), safetensors
shards with their index (written by ``huggingface_hub.save_torch_state_dict``, as ``save_pretrained``
does), ``generation_config.json``
with the chat template's stop ids, the processor (image processor, fast tokenizer with the special
tokens at the project's ids, Jinja chat template), ``mllmkit_recipe.toml`` (the resolved recipe
without weight paths, for :func:`mllmkit.export.load_export`) and ``mllmkit_manifest.json`` (sha256
and size of every file, the notes on inexact details, the verify figures). The folder is written
under a temporary name and renamed when complete; with ``verify`` a parity failure leaves nothing.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Any

import torch

from mllmkit.errors import UserError
from mllmkit.export.compose import Composed, compose
from mllmkit.export.spec import ExportError

__all__ = ["DTYPES", "MANIFEST", "RECIPE", "ExportResult", "export_model", "file_digests", "write_export"]

MANIFEST = "mllmkit_manifest.json"
RECIPE = "mllmkit_recipe.toml"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportResult(dict):
    """What was written: ``folder``, ``target`` (the class name), ``notes``, ``verify`` (a
    :class:`~mllmkit.export.verify.Report` or None)."""


def file_digests(folder: pathlib.Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file in ``folder`` except the manifest, by name."""
    out = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name != MANIFEST:
            digest = hashlib.sha256()
            with open(path, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            out[path.name] = {"sha256": digest.hexdigest(), "bytes": path.stat().st_size}
    return out


def _recipe_without_weights(recipe) -> dict[str, Any]:
    """The model and chat sections of the resolved recipe, every file or folder option removed."""
    import attrs

    model: dict[str, Any] = {}
    for name, components in (("vision", [recipe.vision]), ("bridges", recipe.bridges), ("llm", [recipe.llm])):
        tables = []
        for component in components:
            table = component.to_dict()
            for field in attrs.fields(type(component.config)):
                if isinstance(getattr(component.config, field.name), pathlib.Path):
                    table.pop(field.name, None)
            tables.append(table)
        model[name] = tables if name == "bridges" else tables[0]
    chat = recipe.to_dict()["chat"]
    chat.pop("checkpoint", None)
    return {"model": model, "chat": chat}


def _hf_processor(model, composed: Composed):
    """The target's processor: the vision part's image processor, the LLM's fast tokenizer and chat template."""
    from transformers import PreTrainedTokenizerFast

    vision_spec, llm_spec = composed.specs[0], composed.specs[-1]
    llm, template = model.llm, model.llm.template
    tokenizer = llm_spec.llm.tokenizer(llm)
    image_token = tokenizer.id_to_token(template.image_token_id)
    if image_token is None or tokenizer.encode(image_token, add_special_tokens=False).ids != [template.image_token_id]:
        raise ExportError(f"the image placeholder id {template.image_token_id} is not a special token of the exported "
                          f"tokenizer, so the rendered prompt would not tokenize to it")
    chat_template = llm_spec.llm.chat_template(llm, image_token,
                                               composed.target.template_image_tokens(model.tokens_per_image))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token=tokenizer.id_to_token(template.stop_token_ids[0]),
        pad_token=tokenizer.id_to_token(template.pad_token_id), extra_special_tokens={"image_token": image_token},
        chat_template=chat_template, model_max_length=getattr(llm, "max_positions", None) or 1 << 30)
    return composed.target.processor(composed.config, vision_spec.image_processor(model.vision), fast, chat_template)


def _own_storage(tensor: torch.Tensor) -> torch.Tensor:
    """A copy when ``tensor`` is a view of a larger storage (q/k/v split from a fused weight), which
    safetensors refuses to write; otherwise the tensor itself."""
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        return tensor.clone()
    return tensor


def _check_keys(target, config, tensors: dict[str, torch.Tensor]) -> None:
    """The tensors are exactly the target's state dict (a tied head may be left out)."""
    with torch.device("meta"):
        expected = target.model_class()(config).state_dict()
    tied = {target.head} if config.text_config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(tensors) - tied)
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f"{k} {list(tensors[k].shape)} vs {list(expected[k].shape)}" for k in tensors
             if k in expected and tensors[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        raise ExportError(f"the export specs do not produce {target.name}'s state dict: missing {missing[:8]}, "
                          f"unexpected {unexpected[:8]}, shapes {wrong[:8]}")


def write_export(model, recipe, folder: pathlib.Path, composed: Composed, dtype: torch.dtype,
                 max_shard_size: str | int = "5GB", source: dict[str, str] | None = None) -> None:
    """Write every file of the export into ``folder`` (an existing, empty folder); manifest last."""
    import tomli_w
    from huggingface_hub import save_torch_state_dict
    from transformers import GenerationConfig

    target = composed.target
    config = target.config_type()(**composed.config)
    config.dtype = dtype
    tensors = {k: _own_storage(v.detach().to("cpu", dtype) if v.is_floating_point() else v.detach().cpu())
               for k, v in composed.tensors.items()}
    if config.text_config.tie_word_embeddings:
        tensors.pop(target.head, None)
    _check_keys(target, config, tensors)
    config.save_pretrained(folder)
    save_torch_state_dict(tensors, folder, max_shard_size=max_shard_size, metadata={"format": "pt"})
    template = model.llm.template
    GenerationConfig(eos_token_id=list(template.stop_token_ids), pad_token_id=template.pad_token_id,
                     bos_token_id=None).save_pretrained(folder)
    _hf_processor(model, composed).save_pretrained(folder)
    (folder / RECIPE).write_text(tomli_w.dumps(_recipe_without_weights(recipe)))
    write_manifest(folder, {"target": target.name, "dtype": str(dtype).removeprefix("torch."), "notes": composed.notes,
                            "source": source or {}})


def write_manifest(folder: pathlib.Path, info: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps({**info, "files": file_digests(folder)}, indent=2, ensure_ascii=False))


def export_model(recipe: Any, checkpoint: str | pathlib.Path | None, out: str | pathlib.Path, *,
                 overrides: tuple[str, ...] = (), dtype: str | None = None, max_shard_size: str | int = "5GB",
                 verify: bool = False, verify_device: str = "cpu") -> ExportResult:
    """Export ``recipe`` with the trained weights of ``checkpoint`` to ``out``; with ``verify`` the
    folder is loaded back with transformers and compared (:mod:`mllmkit.export.verify`) before it
    is renamed into place; a failure raises :class:`ExportError` with the figures."""
    from mllmkit.chat.loading import load_chat_model
    from mllmkit.plugins import get_plugin_host
    from mllmkit.train.checkpoint import write_atomically

    model, loaded = load_chat_model(recipe, checkpoint=checkpoint, device="cpu", precision=dtype, overrides=overrides)
    name = dtype or loaded.chat.precision
    if name not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, found {name!r}")
    composed = compose(model, loaded, get_plugin_host().registry)
    result = ExportResult(folder=pathlib.Path(out), target=composed.target.name, notes=composed.notes, verify=None)
    source = {"recipe": str(loaded.path or "<dict>"), "checkpoint": str(checkpoint or "")}

    def write(folder: pathlib.Path) -> None:
        write_export(model, loaded, folder, composed, DTYPES[name], max_shard_size, source)
        if verify:
            from mllmkit.export.verify import round_like_export, verify_export

            round_like_export(model, DTYPES[name])
            report = verify_export(folder, model, device=verify_device)
            result["verify"] = report
            manifest = json.loads((folder / MANIFEST).read_text())
            manifest["verify"] = report.figures()
            (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
            if not report.passed:
                raise ExportError(f"parity check failed, nothing written to {out}:\n{report.describe()}")

    write_atomically(pathlib.Path(out), write)
    return result
