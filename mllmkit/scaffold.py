"""``mllmkit new-plugin KIND NAME [--dir DIR]``: write a working plugin skeleton into a new folder.

The skeleton is what ``docs/plugins.md`` describes: a distribution ``mllmkit-<name>`` with a
``pyproject.toml`` declaring the ``mllmkit`` entry point, a package ``mllmkit_<name>`` holding one
``hooks.py`` and one ``component.py`` (attrs config class, one builder, a tiny preset), and a test
that passes as written, using the ``mllmkit.testing`` fixtures. KIND is ``vision``, ``bridge``,
``llm`` (built on the toy byte tokenizer and template, to be replaced) or ``dataset``. The file
texts live here as templates (no package data needed).
"""

from __future__ import annotations

import argparse
import keyword
import pathlib
import re
import string

from mllmkit.errors import UserError

__all__ = ["KINDS", "register_command", "render", "write_plugin"]

KINDS = ("vision", "bridge", "llm", "dataset")

_HOOKS = {"vision": "mllmkit_register_vision_encoders", "bridge": "mllmkit_register_bridges",
          "llm": "mllmkit_register_llms", "dataset": "mllmkit_register_datasets"}

_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "${dist}"
version = "0.1.0"
description = "mllmkit plugin: ${kind} component ${name}"
requires-python = ">=3.10"
dependencies = ["mllmkit", "torch>=2.4", "attrs>=23.1"${extra_deps}]

[project.entry-points.mllmkit]
${name} = "${pkg}.hooks"

[tool.setuptools.packages.find]
include = ["${pkg}*"]
'''

_INIT = '''\
"""${dist}: the ${kind} component ``${name}`` for mllmkit (entry point ``${name}`` → ``${pkg}.hooks``)."""

from ${pkg}.component import SPECS, ${Cls}Config, build_${name}

__all__ = ["SPECS", "${Cls}Config", "build_${name}"]
'''

_HOOKS_PY = '''\
"""Hook implementations of ${dist}: registers the ${kind} components of this package."""

from __future__ import annotations

from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec


@hookimpl
def ${hook}() -> list[ComponentSpec]:
    from ${pkg}.component import SPECS

    return SPECS
'''

_COMPONENTS = {
    "bridge": '''\
"""Bridge ``${name}``: LayerNorm → Linear → GELU → Linear on every token (replace with your design).

Widths are inferred: ``in_dim`` from the previous part, ``out_dim`` from the LLM's hidden size.
``${name}_tiny`` is the same builder with a small hidden width.
"""

from __future__ import annotations

import attrs
import torch
from torch import nn

from mllmkit.config import config, positive
from mllmkit.errors import UserError
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.registry import ComponentSpec

__all__ = ["${Cls}Config", "${Cls}", "build_${name}", "SPECS"]


@config
class ${Cls}Config:
    in_dim: int | None = attrs.field(default=None, validator=positive)
    out_dim: int | None = attrs.field(default=None, validator=positive)
    hidden: int = attrs.field(default=1024, validator=positive)


class ${Cls}(nn.Module):
    """``[B, N, in_dim] → [B, N, out_dim]``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_dim, self.out_dim = in_dim, out_dim
        self.net = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def tokens_out(self, tokens_in: int) -> int:
        return tokens_in

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats.to(self.net[1].weight.dtype))


def build_${name}(in_dim: int, out_dim: int, hidden: int) -> ${Cls}:
    """The one builder; presets call it."""
    return ${Cls}(in_dim, out_dim, hidden)


def _dims(cfg: ${Cls}Config, ctx: BuildContext) -> PartDims:
    out_dim = cfg.out_dim or ctx.llm_hidden
    if (cfg.in_dim or ctx.in_dim) is None or out_dim is None:
        raise UserError(f"{ctx.key}: widths cannot be inferred here; set in_dim and out_dim")
    return PartDims(in_dim=cfg.in_dim, out_dim=out_dim, out_tokens=ctx.in_tokens)


def _build(cfg: ${Cls}Config, ctx: BuildContext) -> ${Cls}:
    return build_${name}(cfg.in_dim or ctx.in_dim, _dims(cfg, ctx).out_dim, cfg.hidden)


def _build_tiny(cfg: ${Cls}Config, ctx: BuildContext) -> ${Cls}:
    return build_${name}(cfg.in_dim or ctx.in_dim, _dims(cfg, ctx).out_dim, 16)


SPECS = [
    ComponentSpec("${name}", ${Cls}Config, _build, "${name}: LayerNorm + 2-layer GELU MLP per token", dims=_dims),
    ComponentSpec("${name}_tiny", ${Cls}Config, _build_tiny, "${name} with hidden width 16 (tests)", dims=_dims),
]
''',
    "vision": '''\
"""Vision encoder ``${name}``: patches → Linear → Transformer encoder (replace with your design).

``${name}_tiny`` is the same builder at toy size (16 px, width 24).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import attrs
import numpy as np
import torch
from torch import nn

from mllmkit.config import config, positive
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.registry import ComponentSpec

__all__ = ["${Cls}Config", "${Cls}", "build_${name}", "SPECS"]


@config
class ${Cls}Config:
    image_size: int = attrs.field(default=224, validator=positive)
    patch_size: int = attrs.field(default=16, validator=positive)
    width: int = attrs.field(default=768, validator=positive)
    depth: int = attrs.field(default=12, validator=positive)


class ${Cls}(nn.Module):
    """``[B, 3, H, W] → [B, (H/patch)², width]``."""

    def __init__(self, image_size: int, patch_size: int, width: int, depth: int) -> None:
        super().__init__()
        self.image_size, self.out_dim = image_size, width
        self.num_tokens = (image_size // patch_size) ** 2
        self.patch = nn.Conv2d(3, width, patch_size, patch_size)
        self.pos = nn.Parameter(torch.zeros(1, self.num_tokens, width))
        layer = nn.TransformerEncoderLayer(width, nhead=max(1, width // 64) if width % 64 == 0 else 1,
                                           dim_feedforward=4 * width, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.patch(pixels).flatten(2).transpose(1, 2) + self.pos)

    def image_transform(self, train: bool) -> Callable[[Any], torch.Tensor]:
        size = self.image_size

        def transform(image) -> torch.Tensor:
            array = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
            return torch.from_numpy(array).permute(2, 0, 1)
        return transform

    def blocks(self) -> Sequence[nn.Module]:
        return list(self.encoder.layers)


def build_${name}(image_size: int, patch_size: int, width: int, depth: int) -> ${Cls}:
    """The one builder; presets call it."""
    return ${Cls}(image_size, patch_size, width, depth)


def _build(cfg: ${Cls}Config, ctx: BuildContext) -> ${Cls}:
    return build_${name}(cfg.image_size, cfg.patch_size, cfg.width, cfg.depth)


def _dims(cfg: ${Cls}Config, ctx: BuildContext) -> PartDims:
    return PartDims(out_dim=cfg.width, out_tokens=(cfg.image_size // cfg.patch_size) ** 2)


TINY = dict(image_size=16, patch_size=8, width=24, depth=1)

SPECS = [
    ComponentSpec("${name}", ${Cls}Config, _build, "${name}: patch embedding + Transformer encoder", dims=_dims),
    ComponentSpec("${name}_tiny", ${Cls}Config, lambda cfg, ctx: build_${name}(**TINY),
                  "${name} at toy size (16 px, width 24)",
                  dims=lambda cfg, ctx: PartDims(out_dim=TINY["width"], out_tokens=4)),
]
''',
    "llm": '''\
"""LLM ``${name}``: a transformers Llama wrapped in :class:`mllmkit.hf_llm.HFCausalLM`.

It starts from mllmkit's toy byte tokenizer and template (``mllmkit.testing.toy``) so that it runs
as written; replace them with your model's tokenizer and chat template, and load real weights with
``mllmkit.weights`` (``checkpoint_files``, ``iter_tensors``, ``KeyMap``, ``load_into``).
``${name}_tiny`` is the same builder at toy size.
"""

from __future__ import annotations

import attrs

from mllmkit.config import config, positive
from mllmkit.hf_llm import HFCausalLM
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.registry import ComponentSpec
from mllmkit.testing.toy import ByteTokenizer, ToyTemplate

__all__ = ["${Cls}Config", "build_${name}", "SPECS"]


@config
class ${Cls}Config:
    hidden_size: int = attrs.field(default=1024, validator=positive)
    num_layers: int = attrs.field(default=8, validator=positive)
    num_heads: int = attrs.field(default=8, validator=positive)


def build_${name}(hidden_size: int, num_layers: int, num_heads: int) -> HFCausalLM:
    """The one builder; presets call it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = ByteTokenizer()
    hf_config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden_size,
                            intermediate_size=hidden_size * 2, num_hidden_layers=num_layers,
                            num_attention_heads=num_heads, max_position_embeddings=1024,
                            pad_token_id=tokenizer.special_ids["<pad>"], eos_token_id=tokenizer.special_ids["<end>"],
                            bos_token_id=None)
    return HFCausalLM(LlamaForCausalLM(hf_config), tokenizer, ToyTemplate(tokenizer), max_positions=1024)


def _build(cfg: ${Cls}Config, ctx: BuildContext) -> HFCausalLM:
    return build_${name}(cfg.hidden_size, cfg.num_layers, cfg.num_heads)


TINY = dict(hidden_size=32, num_layers=1, num_heads=4)

SPECS = [
    ComponentSpec("${name}", ${Cls}Config, _build, "${name}: Llama decoder (toy tokenizer)",
                  dims=lambda cfg, ctx: PartDims(out_dim=cfg.hidden_size)),
    ComponentSpec("${name}_tiny", ${Cls}Config, lambda cfg, ctx: build_${name}(**TINY), "${name} at toy size",
                  dims=lambda cfg, ctx: PartDims(out_dim=TINY["hidden_size"])),
]
''',
    "dataset": '''\
"""Dataset ``${name}``: a JSON list of ``{"image", "question", "answer"}`` records (adapt to your format).

Image paths are relative to ``images`` (default: the annotation file's folder). A malformed record
raises :class:`mllmkit.errors.DataError` naming the file and record index.
"""

from __future__ import annotations

import json
import pathlib

from mllmkit.config import config
from mllmkit.errors import DataError, UserError
from mllmkit.interfaces import BuildContext, Sample
from mllmkit.registry import ComponentSpec
from mllmkit.template import IMAGE_SPAN

__all__ = ["${Cls}Config", "${Cls}", "build_${name}", "SPECS"]


@config
class ${Cls}Config:
    annotations: pathlib.Path
    images: pathlib.Path | None = None


class ${Cls}:
    """Map-style dataset of :class:`mllmkit.interfaces.Sample`."""

    name = "${name}"

    def __init__(self, annotations: pathlib.Path, images: pathlib.Path | None = None) -> None:
        if not annotations.is_file():
            raise UserError(f"${name}: annotation file not found: {annotations}")
        self.annotations = annotations
        self.images = images or annotations.parent
        self.records = json.loads(annotations.read_text())

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        try:
            image, question, answer = record["image"], record["question"], record["answer"]
        except (KeyError, TypeError):
            raise DataError(f"{self.annotations}: record {index}: needs image, question and answer") from None
        messages = [{"role": "user", "content": f"{IMAGE_SPAN} {question}"},
                    {"role": "assistant", "content": answer}]
        return Sample(images=[self.images / image], messages=messages, source=str(self.annotations), index=index)


def build_${name}(annotations: pathlib.Path, images: pathlib.Path | None = None) -> ${Cls}:
    """The one builder."""
    return ${Cls}(annotations, images)


SPECS = [ComponentSpec("${name}", ${Cls}Config, lambda cfg, ctx: build_${name}(cfg.annotations, cfg.images),
                       "${name}: JSON image question/answer records")]
''',
}

_TESTS = {
    "bridge": '''\
"""The bridge between mllmkit's toy vision encoder and toy LLM: widths, assembly, gradients."""

import torch

from mllmkit import assemble, check_wiring, load_recipe


def test_${name}_in_a_toy_model(plugin_host, toy_recipe):
    toy_recipe["model"]["bridges"] = [{"type": "${name}_tiny"}]
    wiring = check_wiring(load_recipe(toy_recipe))
    assert wiring.bridges[0].out_dim == wiring.llm.out_dim
    model = assemble(toy_recipe)
    embeds = model.encode_images(torch.rand(2, 3, 16, 16))
    assert embeds.shape == (2, model.tokens_per_image, model.llm.hidden_size)
    embeds.sum().backward()
    assert all(p.grad is not None for p in model.bridges[0].parameters())
    assert all(p.grad is None for p in model.llm.parameters())
''',
    "vision": '''\
"""The encoder in front of mllmkit's toy bridge and LLM: widths, transform, features."""

import torch

from mllmkit import assemble, check_wiring, load_recipe


def test_${name}_in_a_toy_model(plugin_host, toy_recipe, tiny_image):
    from PIL import Image

    toy_recipe["model"]["vision"] = {"type": "${name}_tiny"}
    wiring = check_wiring(load_recipe(toy_recipe))
    assert (wiring.vision.out_dim, wiring.vision.out_tokens) == (24, 4)
    model = assemble(toy_recipe)
    pixels = model.vision.image_transform(train=False)(Image.open(tiny_image))
    assert pixels.shape == (3, 16, 16)
    embeds = model.encode_images(pixels.unsqueeze(0))
    assert embeds.shape == (1, 4, model.llm.hidden_size) and torch.isfinite(embeds).all()
''',
    "llm": '''\
"""The LLM behind mllmkit's toy encoder and bridge: template, loss on the answer only."""

import torch

from mllmkit import assemble
from mllmkit.template import IMAGE_SPAN, encode_pieces


def test_${name}_in_a_toy_model(plugin_host, toy_recipe):
    toy_recipe["model"]["llm"] = {"type": "${name}_tiny"}
    model = assemble(toy_recipe)
    messages = [{"role": "user", "content": IMAGE_SPAN + " what?"}, {"role": "assistant", "content": "red"}]
    enc = encode_pieces(model.llm.template.pieces(messages, model.tokens_per_image))
    out = model(torch.tensor([enc.input_ids]), torch.tensor([enc.labels]), pixels=torch.rand(1, 3, 16, 16))
    assert int(out.num_tokens) == len("red") + 1  # the answer and its end token
    out.loss.backward()
    assert model.bridges[0].proj.weight.grad is not None
''',
    "dataset": '''\
"""The dataset reads its JSON records into samples and names a malformed record."""

import json

import pytest

from mllmkit.assemble import build
from mllmkit.errors import DataError
from mllmkit.template import IMAGE_SPAN


def test_${name}_reads_records(plugin_host, tmp_path, tiny_image):
    annotations = tmp_path / "data.json"
    annotations.write_text(json.dumps([{"image": tiny_image.name, "question": "colour?", "answer": "red"},
                                       {"image": tiny_image.name}]))
    data = build("dataset", "${name}", annotations=str(annotations), images=str(tiny_image.parent))
    assert len(data) == 2
    sample = data[0]
    assert sample.images == [tiny_image]
    assert sample.messages[0]["content"] == IMAGE_SPAN + " colour?" and sample.messages[1]["content"] == "red"
    with pytest.raises(DataError, match="record 1: needs image, question and answer"):
        data[1]
''',
}


def _names(name: str) -> dict[str, str]:
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name) or keyword.iskeyword(name):
        raise UserError(f"new-plugin: NAME must be a lowercase Python identifier (letters, digits, _), "
                        f"found {name!r}")
    return {"name": name, "pkg": f"mllmkit_{name}", "dist": f"mllmkit-{name.replace('_', '-')}",
            "Cls": "".join(part.capitalize() for part in name.split("_"))}


def render(kind: str, name: str) -> dict[str, str]:
    """The skeleton's files: relative path → text."""
    if kind not in KINDS:
        raise UserError(f"new-plugin: KIND must be one of {', '.join(KINDS)}, found {kind!r}")
    values = {**_names(name), "kind": kind, "hook": _HOOKS[kind],
              "extra_deps": ', "transformers>=5.0,<6"' if kind == "llm" else
              (', "numpy", "pillow"' if kind == "vision" else "")}
    pkg = values["pkg"]
    files = {"pyproject.toml": _PYPROJECT, f"{pkg}/__init__.py": _INIT, f"{pkg}/hooks.py": _HOOKS_PY,
             f"{pkg}/component.py": _COMPONENTS[kind], f"tests/test_{name}.py": _TESTS[kind]}
    return {path: string.Template(text).substitute(values) for path, text in files.items()}


def write_plugin(kind: str, name: str, parent: str | pathlib.Path = ".") -> pathlib.Path:
    """Write the skeleton into ``parent/name`` (which must not exist yet); return that folder."""
    files = render(kind, name)
    folder = pathlib.Path(parent) / name
    if folder.exists():
        raise UserError(f"new-plugin: {folder} already exists; choose another NAME or --dir")
    for path, text in files.items():
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    return folder


def _cmd_new_plugin(args: argparse.Namespace) -> int:
    folder = write_plugin(args.kind, args.name, args.dir)
    tiny = "" if args.kind == "dataset" else f" and its preset {args.name}_tiny"
    print(f"wrote {folder}/: {args.kind} component {args.name!r}{tiny}")
    print(f"next: pip install -e {folder} && pytest {folder}")
    return 0


def register_command(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("new-plugin", help="write a plugin skeleton (package, entry point, test)")
    parser.add_argument("kind", choices=KINDS, metavar="KIND", help="vision | bridge | llm | dataset")
    parser.add_argument("name", metavar="NAME", help="component and entry-point name (a Python identifier)")
    parser.add_argument("--dir", default=".", metavar="DIR", help="parent folder of the new plugin (default: .)")
    parser.set_defaults(func=_cmd_new_plugin)
