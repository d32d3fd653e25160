"""pytest plugin (entry point ``pytest11``) with fixtures for testing mllmkit and its plugins.

- ``plugin_host``: a fresh plugin host (installed plugins + the toy components), installed as the
  process-wide host for the test and removed afterwards.
- ``core_plugin_host``: the same with only the core's built-ins and the toy components (results do
  not depend on which other plugins are installed).
- ``toy_recipe``: a recipe dict assembling ``toy_vision → linear → toy_llm``; copy and edit it.
- ``tiny_image``: a path to a small RGB PNG.
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
