"""``mllmkit new-plugin``: the skeleton of each kind works as written; a generated bridge installs
into the running venv, is discovered through its entry point, and its own test passes."""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
import tomllib

from mllmkit.cli import main
from mllmkit.scaffold import KINDS, render

PYTHON = sys.executable


def test_render_pyproject_and_layout():
    files = render("bridge", "my_pool")
    assert sorted(files) == ["mllmkit_my_pool/__init__.py", "mllmkit_my_pool/component.py", "mllmkit_my_pool/hooks.py",
                             "pyproject.toml", "tests/test_my_pool.py"]
    project = tomllib.loads(files["pyproject.toml"])
    assert project["project"]["name"] == "mllmkit-my-pool"
    assert project["project"]["entry-points"]["mllmkit"] == {"my_pool": "mllmkit_my_pool.hooks"}
    assert "def mllmkit_register_bridges() -> list[ComponentSpec]:" in files["mllmkit_my_pool/hooks.py"]
    assert "class MyPoolConfig:" in files["mllmkit_my_pool/component.py"]


def test_bad_name_kind_and_existing_folder(tmp_path, capsys):
    assert main(["new-plugin", "bridge", "My-Pool", "--dir", str(tmp_path)]) == 2
    assert "NAME must be a lowercase Python identifier (letters, digits, _), found 'My-Pool'" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    assert main(["new-plugin", "vision", "taken", "--dir", str(tmp_path)]) == 2
    assert f"{tmp_path / 'taken'} already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["new-plugin", "tokenizer", "x"])


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_skeleton_passes_its_own_test(kind, tmp_path, tiny_image, monkeypatch):
    """Register the generated hooks module directly and run the generated test function."""
    from mllmkit.plugins import build_plugin_host, reset_plugin_host
    from mllmkit.testing.toy import TOY_RECIPE, ToyPlugin

    name = f"inproc_{kind}"
    assert main(["new-plugin", kind, name, "--dir", str(tmp_path)]) == 0
    folder = tmp_path / name
    monkeypatch.syspath_prepend(str(folder))
    try:
        hooks = importlib.import_module(f"mllmkit_{name}.hooks")
        spec = importlib.util.spec_from_file_location(f"test_{name}", folder / "tests" / f"test_{name}.py")
        tests = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(tests)
        host = build_plugin_host(extra_plugins=[("mllmkit-testing", ToyPlugin()), (name, hooks)])
        reset_plugin_host(host)
        test = getattr(tests, f"test_{name}_in_a_toy_model", None) or getattr(tests, f"test_{name}_reads_records")
        fixtures = {"plugin_host": host, "toy_recipe": copy.deepcopy(TOY_RECIPE), "tiny_image": tiny_image,
                    "tmp_path": tmp_path}
        test(**{p: fixtures[p] for p in inspect.signature(test).parameters})
    finally:
        reset_plugin_host(None)
        for module in [m for m in sys.modules if m.startswith(f"mllmkit_{name}")]:
            del sys.modules[module]


@pytest.mark.slow
def test_generated_bridge_installs_and_its_test_passes(tmp_path):
    name = f"scaffold_probe_{os.getpid()}"
    assert main(["new-plugin", "bridge", name, "--dir", str(tmp_path)]) == 0
    folder = tmp_path / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    install = subprocess.run([PYTHON, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e",
                              str(folder)], capture_output=True, text=True, env=env, check=False)
    assert install.returncode == 0, install.stderr
    try:
        result = subprocess.run([PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(folder / "tests")],
                                capture_output=True, text=True, env=env, cwd=folder, check=False)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
        assert "1 passed" in result.stdout  # the plugin_host fixture found the bridge through its entry point
    finally:
        subprocess.run([PYTHON, "-m", "pip", "uninstall", "-y", "-q", f"mllmkit-{name.replace('_', '-')}"],
                       capture_output=True, env=env, check=False)
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution(f"mllmkit-{name.replace('_', '-')}")
