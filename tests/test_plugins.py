"""Plugin discovery: entry points, a real third-party distribution, duplicates, broken plugins,
the MLLMKIT_PLUGINS allowlist and hook tracing."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest

import mllmkit
from mllmkit.config import config
from mllmkit.interfaces import PartDims
from mllmkit.plugins import build_plugin_host
from mllmkit.registry import ComponentSpec, DuplicateComponentError

THIRD_PARTY = pathlib.Path(__file__).parent / "thirdparty_plugin"
CLI = [sys.executable, "-m", "mllmkit.cli"]


@pytest.fixture(scope="module")
def installed_third_party():
    """Install the example distribution into this environment for the module, then remove it."""
    pip = [sys.executable, "-m", "pip", "-q"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", "-e", str(THIRD_PARTY)],
                   check=True, capture_output=True)
    yield
    subprocess.run([*pip, "uninstall", "-y", "mllmkit-example-pool"], check=True, capture_output=True)


def _run(*args, env=None):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=full_env)


def test_third_party_distribution_is_discovered_and_used(installed_third_party, tmp_path):
    listing = _run("plugins")
    assert "example_pool  (mllmkit-example-pool 0.3.0)" in listing.stdout
    assert "bridge    avg_pool" in listing.stdout
    recipe = tmp_path / "pool.toml"
    recipe.write_text(textwrap.dedent("""
        [model.vision]
        type = "eva_tiny"
        [[model.bridges]]
        type = "avg_pool"
        tokens = 4
        [[model.bridges]]
        type = "linear"
        [model.llm]
        type = "qwen"
        preset = "qwen_tiny"
        [[data.train]]
        type = "minigpt4qwen_instruction"
        annotations = "train.json"
        images = "images"
    """))
    result = _run("check", str(recipe))
    if "unknown" in result.stderr and ("eva_tiny" in result.stderr or "qwen" in result.stderr):
        pytest.skip("the in-tree model plugins are not installed")
    assert result.returncode == 0, result.stderr
    assert "avg_pool (64d × 4 tokens)" in result.stdout


def test_allowlist_loads_only_named_plugins(installed_third_party):
    listing = _run("plugins", env={"MLLMKIT_PLUGINS": "example_pool"})
    assert "example_pool  (mllmkit-example-pool 0.3.0)" in listing.stdout
    assert "builtin" not in listing.stdout
    assert "bridge    linear" not in listing.stdout


def test_tracing_prints_hook_calls(installed_third_party):
    result = _run("plugins", env={"MLLMKIT_PLUGINS": "builtin", "MLLMKIT_TRACE_PLUGINS": "1"})
    assert "mllmkit_register_bridges" in result.stderr


def _entry_point(name: str, value: str) -> metadata.EntryPoint:
    return metadata.EntryPoint(name=name, value=value, group="mllmkit")


def test_broken_plugin_is_reported_and_others_load():
    host = build_plugin_host(entry_points=[_entry_point("ghost", "mllmkit_no_such_module.hooks"),
                                           _entry_point("builtin", "mllmkit.builtin.hooks")])
    assert [p.name for p in host.plugins] == ["builtin"]
    assert host.registry.names("bridge") == ["linear", "mlp"]
    assert len(host.broken) == 1 and host.broken[0].name == "ghost"
    assert host.broken[0].error.startswith("ModuleNotFoundError: No module named 'mllmkit_no_such_module'")


class _DuplicateLinear:
    @mllmkit.hookimpl
    def mllmkit_register_bridges(self):
        @config
        class Empty:
            pass
        return [ComponentSpec("linear", Empty, lambda c, x: None, "clash", dims=lambda c, x: PartDims(out_dim=1))]


def test_duplicate_name_names_both_distributions():
    builtin = [ep for ep in metadata.entry_points(group="mllmkit") if ep.name == "builtin"]
    with pytest.raises(DuplicateComponentError) as info:
        build_plugin_host(entry_points=builtin,
                          extra_plugins=[("mllmkit-clash", _DuplicateLinear())])
    assert str(info.value) == ("bridge component 'linear' is registered twice: by 'mllmkit' and by 'mllmkit-clash'. "
                               "Uninstall one of them, or load only one with MLLMKIT_PLUGINS.")


class _RaisingHook:
    @mllmkit.hookimpl
    def mllmkit_register_llms(self):
        raise RuntimeError("cannot find libfoo")


def test_plugin_whose_hook_raises_is_reported():
    host = build_plugin_host(entry_points=[_entry_point("builtin", "mllmkit.builtin.hooks")],
                             extra_plugins=[("mllmkit-raising", _RaisingHook())])
    assert host.registry.names("bridge") == ["linear", "mlp"]
    assert host.broken[0].name == "mllmkit-raising"
    assert host.broken[0].error.startswith("mllmkit_register_llms raised RuntimeError: cannot find libfoo")


def test_model_part_without_dims_is_refused():
    class NoDims:
        @mllmkit.hookimpl
        def mllmkit_register_bridges(self):
            return [ComponentSpec("nodims", object, lambda c, x: None, "no dims")]

    with pytest.raises(ValueError, match="bridge component 'nodims' must declare dims"):
        build_plugin_host(entry_points=[], extra_plugins=[("nodims", NoDims())])


def test_lookup_is_exact(core_plugin_host):
    from mllmkit.errors import UserError

    with pytest.raises(UserError, match=r"unknown bridge component 'line'; available: linear, mlp"):
        core_plugin_host.registry.get("bridge", "line")


def test_plugins_are_not_loaded_at_import():
    code = "import sys, mllmkit; print(any(m.startswith('mllmkit_') for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


class _EveryHook:
    """One plugin implementing every registration hook of the contract."""

    @staticmethod
    def _spec(name, dims=None):
        @config
        class Options:
            size: int = 3
        return ComponentSpec(name, Options, lambda cfg, ctx: (name, cfg.size), f"the {name}", dims=dims)

    @mllmkit.hookimpl
    def mllmkit_register_vision_encoders(self):
        return [self._spec("v", dims=lambda cfg, ctx: PartDims(out_dim=cfg.size, out_tokens=1))]

    @mllmkit.hookimpl
    def mllmkit_register_bridges(self):
        return [self._spec("b", dims=lambda cfg, ctx: PartDims(out_dim=cfg.size))]

    @mllmkit.hookimpl
    def mllmkit_register_llms(self):
        return [self._spec("l", dims=lambda cfg, ctx: PartDims(out_dim=cfg.size))]

    @mllmkit.hookimpl
    def mllmkit_register_datasets(self):
        return [self._spec("d")]

    @mllmkit.hookimpl
    def mllmkit_register_parallel_backends(self):
        return [self._spec("p")]


def test_every_registration_hook_fills_its_kind():
    host = build_plugin_host(entry_points=[], extra_plugins=[("every", _EveryHook())])
    assert {kind: host.registry.names(kind) for kind in ("vision", "bridge", "llm", "dataset", "parallel")} == {
        "vision": ["v"], "bridge": ["b"], "llm": ["l"], "dataset": ["d"], "parallel": ["p"]}
    spec = host.registry.get("dataset", "d")
    assert spec.distribution == "every" and spec.build(spec.config(size=5), None) == ("d", 5)


class _MisspelledHook:
    @mllmkit.hookimpl
    def mllmkit_register_bridge(self):  # the hook is mllmkit_register_bridges
        return []


def test_misspelled_hook_stops_start_up_naming_the_plugin():
    from mllmkit.plugins import UnknownHookError

    with pytest.raises(UnknownHookError) as info:
        build_plugin_host(entry_points=[_entry_point("builtin", "mllmkit.builtin.hooks")],
                          extra_plugins=[("mllmkit-typo", _MisspelledHook())])
    message = str(info.value)
    assert message.startswith("plugin 'mllmkit-typo': unknown hook 'mllmkit_register_bridge' is not a hook of "
                              "mllmkit (misspelled?). The hooks are: ")
    assert "mllmkit_register_bridges" in message
