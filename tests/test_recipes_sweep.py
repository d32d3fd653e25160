"""Every recipe under recipes/ (recursively) passes `mllmkit check`, and opens with its launch command."""

from __future__ import annotations

import pathlib

import pytest

from mllmkit import check_wiring, load_recipe
from mllmkit.plugins import reset_plugin_host

RECIPES = sorted((pathlib.Path(__file__).parents[1] / "recipes").rglob("*.toml"))


def test_there_are_recipes():
    assert any(p.name == "demo.toml" for p in RECIPES)


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(p.parents[1])) for p in RECIPES])
def test_recipe_checks(path, monkeypatch):
    monkeypatch.delenv("MLLMKIT_PLUGINS", raising=False)
    reset_plugin_host(None)  # the installed plugins, as a user has them
    check_wiring(load_recipe(path))
    first = path.read_text().lstrip().splitlines()[0]
    assert first.startswith("#") and "mllmkit run" in first, f"{path} must open with its launch command"
