"""Fixtures: tiny LAVIS-format BLIP-2 checkpoints written from the real key manifest, and a plugin host.

``data/blip2_pretrained_flant5xxl.tsv`` is a copy of the key manifest of the real
``blip2_pretrained_flant5xxl.pth`` (``checkpoint["model"]``). A tiny checkpoint keeps its key names
(layers below the tiny depth) and scales every shape through a table of sizes.
"""

from __future__ import annotations

import copy
import csv
import json
import pathlib

import pytest
import torch

from mllmkit.hookspecs import hookimpl

MANIFEST = pathlib.Path(__file__).parent / "data" / "blip2_pretrained_flant5xxl.tsv"

TINY = {"hidden": 64, "heads": 4, "ffn": 128, "layers": 2, "width": 48, "queries": 8}


def manifest_rows() -> list[dict[str, str]]:
    with MANIFEST.open(newline="") as handle:
        return [row for row in csv.DictReader(handle, delimiter="\t") if "*" not in row["key_in_checkpoint_model"]]


def lavis_state(*, layers: int = TINY["layers"], hidden: int = TINY["hidden"], width: int = TINY["width"],
                ffn: int = TINY["ffn"], queries: int = TINY["queries"], text_branch: bool = True,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """A LAVIS ``model`` state dict at tiny size with the manifest's key names.

    ``text_branch`` also writes the keys the real file is known not to carry (word/position
    embeddings, text FFNs, ``cls.*``), which a loader must skip as well.
    """
    sizes = {768: hidden, 1408: width, 3072: ffn, 32: queries, 4096: 16, 30522: 50, 512: 40, 1: 1}
    gen = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for row in manifest_rows():
        key = row["key_in_checkpoint_model"]
        parts = key.split(".")
        if "layer" in parts and int(parts[parts.index("layer") + 1]) >= layers:
            continue
        if row["present"] == "no" and not text_branch:
            continue
        shape = [sizes[d] for d in json.loads(row["shape"])]
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).unsqueeze(0)
        elif "LayerNorm.weight" in key or key == "ln_vision.weight":
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.2 * torch.randn(shape, generator=gen)
    return state


def write_lavis(path: pathlib.Path, state: dict[str, torch.Tensor]) -> pathlib.Path:
    torch.save({"model": state, "epoch": 9}, path)
    return path


class Lavis:
    """The helpers above, handed to tests through the ``lavis`` fixture (conftest is not importable
    under ``--import-mode=importlib``)."""

    TINY = TINY
    manifest_rows = staticmethod(manifest_rows)
    state = staticmethod(lavis_state)
    write = staticmethod(write_lavis)


@pytest.fixture
def lavis() -> type[Lavis]:
    return Lavis


@pytest.fixture
def tiny_lavis(tmp_path) -> tuple[pathlib.Path, dict[str, torch.Tensor]]:
    state = lavis_state()
    return write_lavis(tmp_path / "blip2_tiny.pth", state), state


class _PlaceholderParallel:
    """Registers a ``single`` parallel backend only so that ``load_recipe`` resolves the recipe's
    default ``[parallel]``; these tests never build it (the core had none registered when they were
    written). Used only when no installed plugin provides ``single``."""

    @hookimpl
    def mllmkit_register_parallel_backends(self):
        from mllmkit.config import config
        from mllmkit.registry import ComponentSpec

        @config
        class _Options:
            pass

        def _build(cfg, ctx):
            raise NotImplementedError("placeholder backend for wiring tests")

        return [ComponentSpec("single", _Options, _build, "placeholder for wiring tests")]


@pytest.fixture
def wiring_host():
    """Installed plugins + mllmkit's toy components (+ a placeholder ``single`` backend if none)."""
    from mllmkit.plugins import build_plugin_host, reset_plugin_host
    from mllmkit.testing.toy import ToyPlugin

    extra = [("mllmkit-testing", ToyPlugin())]
    host = build_plugin_host(extra_plugins=extra)
    if "single" not in host.registry.names("parallel"):
        host = build_plugin_host(extra_plugins=extra + [("placeholder-parallel", _PlaceholderParallel())])
    reset_plugin_host(host)
    yield host
    reset_plugin_host(None)


@pytest.fixture
def toy_chain_recipe() -> dict:
    from mllmkit.testing.toy import TOY_RECIPE

    recipe = copy.deepcopy(TOY_RECIPE)
    recipe["model"]["bridges"] = [{"type": "qformer_tiny"}, {"type": "linear"}]
    return recipe
