"""Meta-tests of the plugin contract: every hookspec is documented, typed, and exercised by a test."""

from __future__ import annotations

import inspect
import pathlib

import pytest

from mllmkit import hookspecs

SPECS = [name for name, obj in vars(hookspecs).items()
         if name.startswith("mllmkit_") and callable(obj)]
ROOT = pathlib.Path(__file__).parents[1]
SOURCES = "\n".join(p.read_text() for folder in ("tests", "plugins")  # not .venv: installed packages' tests
                    for p in (ROOT / folder).rglob("test*.py"))
GUIDE = ROOT / "docs" / "plugins.md"


def test_hookspecs_are_the_kinds():
    assert sorted(SPECS) == sorted(hookspecs.HOOK_KINDS)


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_has_docstring_and_return_type(name):
    fn = getattr(hookspecs, name)
    assert inspect.getdoc(fn), f"{name} needs a docstring"
    assert inspect.signature(fn).return_annotation != inspect.Signature.empty


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_is_implemented_in_a_test(name):
    this_file = pathlib.Path(__file__).read_text()
    others = SOURCES.replace(this_file, "")
    assert f"def {name}(" in others, f"no test implements {name}"


@pytest.mark.parametrize("name", SPECS)
def test_hookspec_is_in_the_authoring_guide(name):
    if not GUIDE.exists():
        pytest.fail("docs/plugins.md is missing")
    assert name in GUIDE.read_text(), f"docs/plugins.md does not document {name}"
