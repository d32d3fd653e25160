"""Evaluation reports that say everything that produced them.

A report folder holds ``results.json`` (per-task metrics, problems and unparsed answers, and the
stamp: prompt template and system prompt, generation settings, the resolved recipe and its sha256,
the checkpoint's sha256, library and plugin versions, device, sample counts), ``results.md`` (the
same as tables), ``predictions/<task>.jsonl`` (one line per item: prompt, images, answer, what was
parsed, reference, credit) and ``run.json`` (start time, wall time, command line). Dates and times
live only in ``run.json`` and ``results.md``: a deterministic greedy evaluation writes the same
``results.json`` byte for byte, so two runs can be compared with ``diff``.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
import platform
from collections.abc import Sequence
from typing import Any

from mllmkit.eval.runner import TaskResult

__all__ = ["checkpoint_sha256", "recipe_sha256", "stamp", "write_report", "markdown"]


def _file_sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_sha256(path: str | pathlib.Path | None) -> str | None:
    """sha256 of a checkpoint file; of a folder, the sha256 of its ``relative/path<TAB>sha256`` lines, sorted."""
    if path is None:
        return None
    path = pathlib.Path(path)
    if path.is_file():
        return _file_sha256(path)
    lines = [f"{p.relative_to(path).as_posix()}\t{_file_sha256(p)}\n" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def recipe_sha256(resolved: dict[str, Any]) -> str:
    """sha256 of the resolved recipe as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def _versions() -> dict[str, str]:
    from importlib import metadata

    import torch
    import transformers

    import mllmkit
    from mllmkit.plugins import get_plugin_host

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "mllmkit": mllmkit.__version__}
    for name in ("pluggy", "tokenizers", "safetensors", "pillow", "torchvision"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    for plugin in get_plugin_host().plugins:
        versions[f"plugin:{plugin.name}"] = f"{plugin.distribution} {plugin.version}"
    return versions


def _device(model) -> str:
    import torch

    device = model.llm.embedding.weight.device
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def stamp(model, recipe, *, checkpoint, system: str | None, precision: str, batch_size: int) -> dict[str, Any]:
    """Every setting an evaluation depends on, as JSON-able data."""
    template = model.llm.template
    resolved = recipe.to_dict()
    return {
        "prompt": {"template": f"{type(template).__module__}.{type(template).__qualname__}",
                   "system_prompt": system if system is not None else template.default_system,
                   "image_tokens": model.tokens_per_image},
        "generation": {"strategy": "greedy", "do_sample": False, "num_beams": 1, "batch_size": batch_size,
                       "stop_token_ids": list(template.stop_token_ids), "padding": "left",
                       "decoder": "transformers generate with a KV cache"},
        "precision": precision, "device": _device(model),
        "recipe": {"path": str(recipe.path) if recipe.path else None, "sha256": recipe_sha256(resolved),
                   "resolved": resolved},
        "checkpoint": {"path": str(checkpoint) if checkpoint else None, "sha256": checkpoint_sha256(checkpoint)},
        "versions": _versions(),
    }


def _value(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def markdown(results: Sequence[TaskResult], settings: dict[str, Any], run: dict[str, Any] | None = None) -> str:
    """The metrics table and the stamped settings as Markdown."""
    lines = ["| task | metric | value |", "| --- | --- | --- |"]
    for result in results:
        lines += [f"| {result.name} | {key} | {_value(value)} |" for key, value in result.metrics.items()]
        lines.append(f"| {result.name} | samples / problems / unparsed | {len(result.records)} / "
                     f"{len(result.problems)} / {len(result.unparsed)} |")
    gen, prompt = settings["generation"], settings["prompt"]
    lines += ["", "| setting | value |", "| --- | --- |",
              f"| recipe | {settings['recipe']['path']} (sha256 {settings['recipe']['sha256'][:16]}…) |",
              f"| checkpoint | {settings['checkpoint']['path']} (sha256 {(settings['checkpoint']['sha256'] or '-')[:16]}…) |",
              f"| prompt template | {prompt['template']} |", f"| system prompt | {prompt['system_prompt']!r} |",
              f"| generation | greedy, batch {gen['batch_size']}, max new tokens "
              f"{', '.join(f'{r.name} {r.max_new_tokens}' for r in results)} |",
              f"| device / precision | {settings['device']} / {settings['precision']} |",
              "| versions | " + ", ".join(f"{k} {v}" for k, v in settings["versions"].items()) + " |"]
    if run is not None:
        lines.append(f"| wall time | {run['wall_s']:.1f} s (started {run['started']}) |")
    return "\n".join(lines) + "\n"


def write_report(out: pathlib.Path, results: Sequence[TaskResult], settings: dict[str, Any],
                 run: dict[str, Any]) -> pathlib.Path:
    """Write results.json, results.md, predictions/<task>.jsonl and run.json into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions").mkdir(exist_ok=True)
    document = {"tasks": {r.name: r.summary() for r in results}, "settings": settings}
    (out / "results.json").write_text(json.dumps(document, indent=1, sort_keys=True, default=str) + "\n")
    (out / "results.md").write_text(markdown(results, settings, run))
    for result in results:
        with (out / "predictions" / f"{result.name}.jsonl").open("w") as handle:
            for record in result.records:
                handle.write(json.dumps(record, sort_keys=True, default=str) + "\n")
    (out / "run.json").write_text(json.dumps(run, indent=1, sort_keys=True) + "\n")
    return out
