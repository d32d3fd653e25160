"""`extends` deep merging, `--set` overrides, and path resolution against the writing file's folder."""

from __future__ import annotations

import pathlib

import pytest

from mllmkit import load_recipe
from mllmkit.errors import RecipeError
from mllmkit.recipe.load import deep_merge, parse_override

BASE = """
[model.vision]
type = "toy_vision"
width = 16

[[model.bridges]]
type = "linear"
weights = "weights/proj.pth"

[model.llm]
type = "toy_llm"

[train]
lr = 1e-4
epochs = 3
"""


def test_deep_merge_tables_merge_arrays_replace():
    base = {"a": {"x": 1, "y": {"z": 2}}, "list": [1, 2]}
    over = {"a": {"y": {"w": 3}}, "list": [9]}
    assert deep_merge(base, over) == {"a": {"x": 1, "y": {"z": 2, "w": 3}}, "list": [9]}
    assert base == {"a": {"x": 1, "y": {"z": 2}}, "list": [1, 2]}  # inputs untouched


def test_extends_merges_and_resolves_paths_against_each_file(core_plugin_host, tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "base.toml").write_text(BASE)
    child = tmp_path / "exp" / "child.toml"
    child.parent.mkdir()
    child.write_text('extends = "../base/base.toml"\n[train]\nlr = 3e-4\n[model.vision]\nwidth = 8\n')
    recipe = load_recipe(child)
    assert recipe.train.lr == 3e-4 and recipe.train.epochs == 3
    assert recipe.vision.config.width == 8 and recipe.vision.config.image_size == 16
    # the base wrote the path, so it resolves against the base's folder
    assert recipe.bridges[0].config.weights == tmp_path / "base" / "weights" / "proj.pth"


def test_extends_cycle_is_an_error(core_plugin_host, tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(RecipeError, match="recipes extend each other in a cycle"):
        load_recipe(tmp_path / "a.toml")


def test_missing_base_is_an_error(core_plugin_host, tmp_path):
    (tmp_path / "a.toml").write_text('extends = "nope.toml"\n')
    with pytest.raises(RecipeError) as info:
        load_recipe(tmp_path / "a.toml")
    assert str(info.value) == f"{tmp_path / 'a.toml'}: extends: base recipe not found: {tmp_path / 'nope.toml'}"


@pytest.mark.parametrize("text, path, value", [
    ("train.lr=2e-4", ["train", "lr"], 2e-4),
    ("model.llm.dtype=bf16", ["model", "llm", "dtype"], "bf16"),
    ("model.bridges[0].trainable=false", ["model", "bridges", 0, "trainable"], False),
    ("model.bridges.1.out_dim=64", ["model", "bridges", 1, "out_dim"], 64),
    ("train.betas=[0.9, 0.99]", ["train", "betas"], [0.9, 0.99]),
    ('chat.system="Be brief."', ["chat", "system"], "Be brief."),
])
def test_parse_override(text, path, value):
    assert parse_override(text) == (path, value)


def test_overrides_apply_and_are_validated(core_plugin_host, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(BASE)
    recipe = load_recipe(path, ["train.lr=5e-5", "model.bridges[0].trainable=false", "model.vision.width=12"])
    assert recipe.train.lr == 5e-5
    assert recipe.bridges[0].shared.trainable is False
    assert recipe.vision.config.width == 12
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["train.lr=fast"])
    assert info.value.key == "train.lr"
    with pytest.raises(RecipeError, match=r"model\.bridges\[3\]: no element 3 here \(the list has 1\)"):
        load_recipe(path, ["model.bridges[3].trainable=false"])
    with pytest.raises(RecipeError, match="an override must look like key.path=value"):
        load_recipe(path, ["train.lr"])


def test_override_paths_resolve_against_cwd(core_plugin_host, tmp_path, monkeypatch):
    path = tmp_path / "r.toml"
    path.write_text(BASE)
    monkeypatch.chdir(tmp_path.parent)
    recipe = load_recipe(path, ["model.bridges[0].weights=elsewhere/p.pth"])
    assert recipe.bridges[0].config.weights == tmp_path.parent.resolve() / "elsewhere" / "p.pth"


def test_mllmkit_home_supplies_missing_relative_paths(core_plugin_host, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "weights").mkdir(parents=True)
    (home / "weights" / "proj.pth").write_bytes(b"")
    (tmp_path / "r").mkdir()
    path = tmp_path / "r" / "r.toml"
    path.write_text(BASE)
    monkeypatch.setenv("MLLMKIT_HOME", str(home))
    assert load_recipe(path).bridges[0].config.weights == home / "weights" / "proj.pth"
    monkeypatch.delenv("MLLMKIT_HOME")
    assert load_recipe(path).bridges[0].config.weights == tmp_path / "r" / "weights" / "proj.pth"


def test_recipe_from_dict_resolves_against_base_dir(core_plugin_host, tmp_path, toy_recipe):
    toy_recipe["model"]["bridges"][0]["weights"] = "w.pth"
    recipe = load_recipe(toy_recipe, base_dir=tmp_path)
    assert recipe.bridges[0].config.weights == pathlib.Path(tmp_path) / "w.pth"
    assert recipe.path is None
