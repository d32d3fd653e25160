"""pytest plugin (entry point ``pytest11``) with fixtures for testing mllmkit and its plugins.

- ``plugin_host``: a fresh plugin host (installed plugins + the toy components), installed as the
  process-wide host for the test and removed afterwards.
- ``core_plugin_host``: the same with only the core's built-ins and the toy components (results do
  not depend on which other plugins are installed).
- ``toy_recipe``: a recipe dict assembling ``toy_vision → linear → toy_llm``; copy and edit it.
- ``tiny_image``: a path to a small RGB PNG.
- ``tiny_recipe``: a file of :data:`mllmkit.testing.launch.TINY_RECIPE` (EVA → Q-Former → Linear →
  Qwen at toy size, 3 steps, ``single``); ``single_losses``: its losses under ``single`` with
  ``grad_accum`` 2 and 4 (the references of the distributed backends' equivalence tests).
"""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture
def plugin_host():
    from mllmkit.plugins import build_plugin_host, reset_plugin_host
    from mllmkit.testing.toy import ToyPlugin

    host = build_plugin_host(extra_plugins=[("mllmkit-testing", ToyPlugin())])
    reset_plugin_host(host)
    yield host
    reset_plugin_host(None)


@pytest.fixture
def core_plugin_host(monkeypatch):
    from mllmkit.plugins import build_plugin_host, reset_plugin_host
    from mllmkit.testing.toy import ToyPlugin

    monkeypatch.setenv("MLLMKIT_PLUGINS", "builtin")
    host = build_plugin_host(extra_plugins=[("mllmkit-testing", ToyPlugin())])
    reset_plugin_host(host)
    yield host
    reset_plugin_host(None)


@pytest.fixture
def toy_recipe() -> dict:
    from mllmkit.testing.toy import TOY_RECIPE

    return copy.deepcopy(TOY_RECIPE)


@pytest.fixture
def tiny_image(tmp_path):
    from PIL import Image

    path = tmp_path / "tiny.png"
    Image.new("RGB", (20, 20), (200, 30, 30)).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory):
    from mllmkit.testing.launch import TINY_RECIPE

    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(scope="session")
def single_losses(tmp_path_factory, tiny_recipe) -> dict[int, list[float]]:
    from mllmkit.recipe import load_recipe
    from mllmkit.train.loop import train

    out = {}
    for accum in (2, 4):
        run = tmp_path_factory.mktemp(f"single{accum}")
        out[accum] = train(load_recipe(tiny_recipe, [f"train.grad_accum={accum}"]), run).losses
    return out
