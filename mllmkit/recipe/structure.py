"""Turn plain TOML data into attrs config objects, with errors that name the key path.

Supports the types config classes use: ``str``, ``int``, ``float``, ``bool``, ``pathlib.Path``
(``~`` and ``$VARS`` expanded, relative paths resolved against the recipe's folder), ``Literal``,
optional values, ``list``/``tuple``/``dict`` of those, and nested attrs classes. Unknown keys are
rejected with the allowed ones and a close match.
"""

from __future__ import annotations

import difflib
import os
import pathlib
import types
import typing
from typing import Any, Literal, Union

import attrs

from mllmkit.errors import RecipeError

__all__ = ["structure", "unstructure", "describe_type", "unknown_option"]


def structure(cls: type, data: Any, key: str, base_dir: pathlib.Path | None = None) -> Any:
    """Build ``cls`` (an attrs class) from ``data``; ``key`` is the key path used in errors."""
    return _convert(cls, data, key, base_dir)


def unstructure(obj: Any) -> Any:
    """Plain data (TOML-compatible) from a config object, defaults included."""
    if attrs.has(type(obj)):
        return {f.name: unstructure(getattr(obj, f.name)) for f in attrs.fields(type(obj))
                if getattr(obj, f.name) is not None}
    if isinstance(obj, (list, tuple)):
        return [unstructure(item) for item in obj]
    if isinstance(obj, dict):
        return {k: unstructure(v) for k, v in obj.items()}
    if isinstance(obj, pathlib.Path):
        return str(obj)
    return obj


def describe_type(tp: Any) -> str:
    """Words for a type, as shown after 'expected'."""
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is pathlib.Path:
        return "a path (string)"
    if tp is Any:
        return "any value"
    if origin is Literal:
        return "one of " + ", ".join(_show(v) for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [describe_type(a) for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(parts)
    if origin in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if args and (args[0] is dict or attrs.has(args[0])):
            return "an array of tables"
        return f"a list of {_plural(describe_type(args[0]))}" if args else "a list"
    if origin is dict or tp is dict:
        return "a table"
    if attrs.has(tp):
        return "a table"
    return getattr(tp, "__name__", str(tp))


def _plural(words: str) -> str:
    for article in ("an ", "a "):
        if words.startswith(article):
            return words[len(article):] + "s"
    return words


def _show(value: Any) -> str:
    if isinstance(value, str):
        return f'"{value}"' if len(value) <= 80 else f'"{value[:60]}…" ({len(value)} characters)'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "a list"
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}… ({len(text)} characters)"


def _found(value: Any) -> str:
    return f"{_show(value)} ({_toml_type(value)})" if not isinstance(value, (dict, list)) else _show(value)


def _toml_type(value: Any) -> str:
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "float"), (str, "string")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _mismatch(tp: Any, value: Any, key: str) -> RecipeError:
    return RecipeError(key, f"expected {describe_type(tp)}, found {_found(value)}")


def _convert(tp: Any, value: Any, key: str, base_dir: pathlib.Path | None) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        candidates = [a for a in args if a is not type(None)]
        errors = []
        for candidate in candidates:
            try:
                return _convert(candidate, value, key, base_dir)
            except RecipeError as exc:
                errors.append(exc)
        if len(candidates) == 1:
            raise errors[0]
        raise _mismatch(tp, value, key)
    if origin is Literal:
        allowed = typing.get_args(tp)
        # exact types (1 is not True), but a recipe string is a str subclass (SourcedStr)
        if value in allowed and any(type(value) is type(a) or (isinstance(a, str) and isinstance(value, str))
                                    for a in allowed):
            return value
        raise _mismatch(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _mismatch(tp, value, key)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _mismatch(tp, value, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _mismatch(tp, value, key)
    if tp is str:
        if isinstance(value, str):
            return str(value)
        raise _mismatch(tp, value, key)
    if tp is pathlib.Path:
        if not isinstance(value, (str, pathlib.Path)):
            raise _mismatch(tp, value, key)
        path = pathlib.Path(os.path.expandvars(os.path.expanduser(str(value))))
        origin = getattr(value, "base_dir", base_dir)  # the folder of the file that wrote it
        if not path.is_absolute() and origin is not None:
            home = os.environ.get("MLLMKIT_HOME")
            if home and not (origin / path).exists() and (pathlib.Path(home) / path).exists():
                path = pathlib.Path(home) / path  # shared cache of weights and data
            else:
                path = origin / path
        return path
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _mismatch(tp, value, key)
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [Any]
        items = [_convert(args[0], item, f"{key}[{i}]", base_dir) for i, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _mismatch(tp, value, key)
        _, value_tp = typing.get_args(tp) or (str, Any)
        return {k: _convert(value_tp, v, f"{key}.{k}", base_dir) for k, v in value.items()}
    if attrs.has(tp):
        return _structure_attrs(tp, value, key, base_dir)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise _mismatch(tp, value, key)


def unknown_option(key: str, allowed: list[str], suggestion: str | None = None) -> RecipeError:
    """The error for an option no config class here declares: a close match (or ``suggestion``) and the
    allowed names."""
    name = key.rsplit(".", 1)[-1]
    close = [suggestion] if suggestion else difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    return RecipeError(key, f"unknown option{hint} Allowed options here: {', '.join(allowed) or '(none)'}")


def _structure_attrs(cls: type, value: Any, key: str, base_dir: pathlib.Path | None) -> Any:
    if attrs.has(type(value)) and isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise RecipeError(key, f"expected a table, found {_found(value)}")
    fields = {f.name: f for f in attrs.fields(cls)}
    hints = typing.get_type_hints(cls)
    prefix = f"{key}." if key else ""
    for name in value:
        if name not in fields:
            raise unknown_option(f"{prefix}{name}", list(fields))
    kwargs = {}
    for name, field in fields.items():
        if name in value:
            kwargs[name] = _convert(hints.get(name, Any), value[name], f"{prefix}{name}", base_dir)
        elif field.default is attrs.NOTHING:
            raise RecipeError(f"{prefix}{name}", f"required option is missing (expected {describe_type(hints.get(name, Any))})")
    try:
        return cls(**kwargs)
    except RecipeError:
        raise
    except (ValueError, TypeError) as exc:
        bad = getattr(exc, "recipe_key", None)
        raise RecipeError(f"{prefix}{bad}" if bad else key or cls.__name__, str(exc)) from None
