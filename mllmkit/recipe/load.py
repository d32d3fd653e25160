"""Reading recipe files: TOML, ``extends`` (deep merge), and ``--set key.path=value`` overrides.

Relative paths resolve against the folder of the file that wrote them (a base recipe's paths
against the base's folder): string values remember their file through :class:`SourcedStr`.
"""

from __future__ import annotations

import contextlib
import copy
import pathlib
import sys
from collections.abc import Iterable
from typing import Any

from mllmkit.errors import RecipeError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SourcedStr", "read_recipe_data", "apply_overrides", "deep_merge", "key_origin", "parse_override"]


class SourcedStr(str):
    """A string from a recipe file that remembers the file's folder (for relative paths)."""

    base_dir: pathlib.Path

    def __new__(cls, value: str, base_dir: pathlib.Path) -> SourcedStr:
        obj = super().__new__(cls, value)
        obj.base_dir = base_dir
        return obj

    def __deepcopy__(self, memo: dict) -> SourcedStr:
        return self


def _tag(data: Any, base_dir: pathlib.Path) -> Any:
    if isinstance(data, str):
        return SourcedStr(data, base_dir)
    if isinstance(data, dict):
        return {k: _tag(v, base_dir) for k, v in data.items()}
    if isinstance(data, list):
        return [_tag(v, base_dir) for v in data]
    return data


def _read_toml(path: pathlib.Path) -> dict[str, Any]:
    if not path.is_file():
        raise RecipeError("", f"recipe file not found: {path}")
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError("", f"not valid TOML: {exc}", file=str(path)) from None
    except UnicodeDecodeError as exc:
        raise RecipeError("", f"not UTF-8 text (byte {exc.start}); save the recipe as UTF-8", file=str(path)) from None
    except RecursionError:
        raise RecipeError("", "not usable TOML: arrays or tables nested too deeply to read", file=str(path)) from None
    except OSError as exc:
        raise RecipeError("", f"cannot read the recipe: {exc.strerror or exc}", file=str(path)) from None
    return _tag(data, path.parent.resolve())


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Tables merge key by key; everything else (arrays included) is replaced by the override."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def read_recipe_data(path: str | pathlib.Path, _seen: tuple[pathlib.Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe file and the chain of files it ``extends``, merged."""
    path = pathlib.Path(path).resolve()
    if path in _seen:
        chain = " -> ".join(str(p) for p in (*_seen, path))
        raise RecipeError("extends", f"recipes extend each other in a cycle: {chain}", file=str(path))
    data = _read_toml(path)
    extends = data.pop("extends", None)
    if extends is None:
        return data
    bases = [extends] if isinstance(extends, str) else extends
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError("extends", f"expected a path or a list of paths, found {extends!r}", file=str(path))
    merged: dict[str, Any] = {}
    for base in bases:
        base_path = pathlib.Path(base)
        if not base_path.is_absolute():
            base_path = path.parent / base_path
        if not base_path.is_file():
            raise RecipeError("extends", f"base recipe not found: {base_path}", file=str(path))
        merged = deep_merge(merged, read_recipe_data(base_path, (*_seen, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """``model.bridges[1].trainable=true`` → (['model', 'bridges', 1, 'trainable'], True)."""
    if "=" not in text:
        raise RecipeError(text, "an override must look like key.path=value (e.g. train.lr=2e-4)", file="--set")
    key, raw = text.split("=", 1)
    path: list[str | int] = []
    for part in key.strip().replace("[", ".").replace("]", "").split("."):
        if not part:
            raise RecipeError(key, "empty segment in key path", file="--set")
        path.append(int(part) if part.isdigit() else part)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        value = raw  # bare words are strings: --set model.llm.dtype=bf16
    return path, value


def apply_overrides(data: dict[str, Any], overrides: Iterable[str], cwd: pathlib.Path | None = None) -> dict[str, Any]:
    """Apply ``--set`` overrides; their relative paths resolve against the current directory."""
    data = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        value = _tag(value, (cwd or pathlib.Path.cwd()).resolve())
        node: Any = data
        for i, part in enumerate(path[:-1]):
            shown = _show_path(path[: i + 1])
            if isinstance(part, int):
                if not isinstance(node, list) or part >= len(node):
                    raise RecipeError(shown, f"no element {part} here (the list has "
                                      f"{len(node) if isinstance(node, list) else 0})", file="--set")
                node = node[part]
            else:
                if not isinstance(node, dict):
                    raise RecipeError(shown, "cannot set a key inside a value that is not a table", file="--set")
                node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(last, int):
            if not isinstance(node, list) or last >= len(node):
                raise RecipeError(_show_path(path), "no such list element", file="--set")
        elif not isinstance(node, dict):
            raise RecipeError(_show_path(path), "cannot set a key inside a value that is not a table", file="--set")
        node[last] = value
    return data


def _show_path(path: list[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def key_origin(path: pathlib.Path | None, key: str, overrides: Iterable[str] = ()) -> str | None:
    """Where the value at ``key`` (``model.bridges[0].out_dim``) came from: ``--set <override>`` when an
    override wrote it, else the recipe file (or the ``extends`` base) that holds it; None when no one did."""
    parts = _key_parts(key)
    for text in reversed(list(overrides)):
        with contextlib.suppress(RecipeError):
            set_path, _ = parse_override(text)
            if parts[:len(set_path)] == set_path:
                return f"--set {text if len(text) <= 80 else text[:77] + '...'}"
    return None if path is None else _file_holding(pathlib.Path(path).resolve(), parts, ())


def _file_holding(path: pathlib.Path, parts: list[str | int], seen: tuple[pathlib.Path, ...]) -> str | None:
    if path in seen or not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError, RecursionError, OSError):
        return None
    if _holds(data, parts):
        return str(path)
    extends = data.get("extends")
    bases = [extends] if isinstance(extends, str) else extends if isinstance(extends, list) else []
    for base in reversed([b for b in bases if isinstance(b, str)]):  # the last base wins a merge
        found = _file_holding((path.parent / base).resolve(), parts, (*seen, path))
        if found:
            return found
    return None


def _holds(data: Any, parts: list[str | int]) -> bool:
    for part in parts:
        if isinstance(part, int) and isinstance(data, list) and part < len(data):
            data = data[part]
        elif isinstance(part, str) and isinstance(data, dict) and part in data:
            data = data[part]
        else:
            return False
    return bool(parts)


def _key_parts(key: str) -> list[str | int]:
    return [int(p) if p.isdigit() else p for p in key.replace("[", ".").replace("]", "").split(".") if p]
