"""Reading real checkpoint files safely and streaming them into (meta-initialised) modules.

Every loader in mllmkit goes through here: ``.pth``/``.bin`` via ``torch.load(weights_only=True,
mmap=True)`` (a pickle that would run code is refused with a clear error), ``.safetensors`` shards
and their ``*.index.json``. :class:`KeyMap` renames upstream keys through a declared table of
regular expressions; :func:`load_into` assigns tensors shard by shard, so a model built on the meta
device never holds a second full copy, and accounts strictly for missing and unexpected keys.

:func:`meta_parameters` builds a model with no memory for the parts that are initialised randomly
(a pipeline stage materialises only its own layers); what a loader assigns inside
:func:`real_parameters` (``load_into`` does) stays real. Files are memory-mapped, so a stage only
reads the pages of the weights it keeps when the dtype on disk is the one asked for.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import pickle
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import torch
from torch import nn

from mllmkit.errors import UserError

__all__ = ["WeightsError", "safe_torch_load", "read_safetensors", "checkpoint_files", "iter_tensors", "KeyMap",
           "load_into", "LoadReport", "meta_parameters", "real_parameters"]

_real_depth = 0  # > 0 inside real_parameters(): meta_parameters() keeps what is registered


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside lands on the meta device (buffers stay real), except
    inside :func:`real_parameters`, where loaders assign the tensors they read from files.

    Component builders place their modules on a device of their own choosing; this catches the
    parameters as they are registered, so the random-init parts take no memory until materialised.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta and not _real_depth:
            param = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


@contextlib.contextmanager
def real_parameters() -> Iterator[None]:
    """Parameters registered inside keep their storage, also under :func:`meta_parameters`: wrap
    every assignment of loaded weights (and casts or ties of them) in a builder."""
    global _real_depth
    _real_depth += 1
    try:
        yield
    finally:
        _real_depth -= 1


class WeightsError(UserError):
    """A checkpoint file is missing, unsafe, or does not match the model."""


def safe_torch_load(path: str | pathlib.Path) -> Any:
    """``torch.load`` that never executes pickled code and memory-maps where it can; a file that is
    not a readable torch checkpoint (random bytes, truncated, unsafe) is a :class:`WeightsError`."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zip" not in str(exc):
                raise
            # the legacy (non-zip) format cannot be memory-mapped
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        unsafe = [line for line in lines if "GLOBAL" in line]
        if unsafe:
            raise WeightsError(
                f"{path}: refused to load: the file contains pickled objects that are not plain tensors and "
                f"containers, and loading them could run code ({unsafe[0]})") from None
        cause = next((line for line in lines if line.startswith("Unsupported") or "error:" not in line.lower()
                      and not line.startswith(("Weights only", "Check the documentation"))), lines[0] if lines else "")
        raise WeightsError(f"{path}: not a readable torch checkpoint ({cause[:300]})") from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, struct.error) as exc:
        raise WeightsError(f"{path}: not a readable torch checkpoint ({_first_line(exc)})") from None


def read_safetensors(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Every tensor of a ``.safetensors`` file; a truncated, empty or lying-header file is a :class:`WeightsError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


def checkpoint_files(path: str | pathlib.Path) -> list[pathlib.Path]:
    """The weight files of a checkpoint: a file, or a folder with shards (index.json or glob)."""
    path = pathlib.Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise WeightsError(f"checkpoint not found: {path}")
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = path / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (path / f).is_file()]
            if missing:
                raise WeightsError(f"{index}: names shard files that are missing: {', '.join(missing)}")
            return [path / f for f in files]
    for pattern in ("*.safetensors", "pytorch_model*.bin", "*.pth", "*.pt"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise WeightsError(f"{path}: no weight files (*.safetensors, pytorch_model*.bin, *.pth) in this folder")


def _file_tensors(path: pathlib.Path, subkey: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        yield from read_safetensors(path).items()
        return
    obj = safe_torch_load(path)
    if subkey is not None:
        if not isinstance(obj, Mapping) or subkey not in obj:
            found = ", ".join(list(obj)[:8]) if isinstance(obj, Mapping) else type(obj).__name__
            raise WeightsError(f"{path}: expected a dict with key {subkey!r}, found keys: {found}")
        obj = obj[subkey]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a state dict, found {type(obj).__name__}")
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            yield key, value


def iter_tensors(files: Sequence[pathlib.Path], subkey: str | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield the tensors of each file as one list (one shard at a time)."""
    for path in files:
        yield list(_file_tensors(path, subkey))


@attrs.frozen
class KeyMap:
    """A declared table of key renames: ``(pattern, replacement)`` regexes, first match wins.

    Keys matching ``skip`` are expected in upstream files but not used. A key matching no rule is
    unexpected. A replacement may be a function returning several (key, tensor) pairs from one
    (e.g. splitting a fused qkv weight).
    """

    rules: Sequence[tuple[str, Any]]
    skip: Sequence[str] = ()

    def apply(self, key: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        for pattern in self.skip:
            if re.fullmatch(pattern, key):
                return []
        for pattern, replacement in self.rules:
            match = re.fullmatch(pattern, key)
            if match:
                if callable(replacement):
                    return list(replacement(match, tensor))
                return [(match.expand(replacement), tensor)]
        return None


@attrs.define
class LoadReport:
    loaded: list[str] = attrs.Factory(list)
    skipped: list[str] = attrs.Factory(list)


def load_into(module: nn.Module, shards: Iterable[list[tuple[str, torch.Tensor]]], key_map: KeyMap, *,
              source: str, dtype: torch.dtype | None = None, keep_fp32: Sequence[str] = (),
              allow_missing: Sequence[str] = (), strict: bool = True) -> LoadReport:
    """Stream mapped tensors into ``module``; strict accounting of missing and unexpected keys.

    ``dtype`` casts floating tensors except those whose target name matches a ``keep_fp32`` regex.
    ``allow_missing`` lists regexes of module keys that may stay unloaded (they keep their init).
    """
    expected = dict(module.state_dict(keep_vars=True))
    report = LoadReport()
    unexpected: list[str] = []
    seen: set[str] = set()  # targets the checkpoint supplies, even if loading stops at an unexpected key
    for shard in shards:
        batch: dict[str, torch.Tensor] = {}
        for key, tensor in shard:
            mapped = key_map.apply(key, tensor)
            if mapped is None:
                unexpected.append(key)
                continue
            if not mapped:
                report.skipped.append(key)
            for target, value in mapped:
                if target not in expected:
                    unexpected.append(f"{key} (as {target})")
                    continue
                seen.add(target)
                want = expected[target]
                if tuple(value.shape) != tuple(want.shape):
                    raise WeightsError(f"{source}: {key} has shape {list(value.shape)}, the model expects "
                                       f"{list(want.shape)} for {target}")
                if want.is_floating_point() and not value.is_floating_point():
                    raise WeightsError(f"{source}: {key} holds {str(value.dtype).removeprefix('torch.')} values, "
                                       f"the model expects floating point numbers for {target}")
                if value.is_floating_point():
                    keep = any(re.fullmatch(p, target) for p in keep_fp32)
                    value = value.to(torch.float32 if keep else (dtype or want.dtype))
                batch[target] = value.contiguous()
        if strict and unexpected:
            break
        with real_parameters():
            module.load_state_dict(batch, strict=False, assign=True)
        report.loaded.extend(batch)
    missing = [k for k in expected if k not in seen
               and not any(re.fullmatch(p, k) for p in allow_missing) and not _is_buffer(module, k)]
    if strict and (missing or unexpected):
        parts = []
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        raise WeightsError(f"{source}: checkpoint does not match the model: " + "; ".join(parts))
    return report


def _is_buffer(module: nn.Module, key: str) -> bool:
    owner, _, name = key.rpartition(".")
    sub = module.get_submodule(owner) if owner else module
    return name in dict(sub.named_buffers(recurse=False))
