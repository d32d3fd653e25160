"""Reading trained weights from every checkpoint layout users bring: the one home for it.

:func:`read_checkpoint` (tensors by their stored names, and a word for the layout found) is what
``mllmkit chat --checkpoint`` and ``mllmkit convert`` both read through. Layouts, recognised by their
files, never by layer indices:

- ``mllmkit``: an export folder or ``<run>/checkpoints/step_N`` (``trainable.safetensors``, keyed by
  MLLM names); ``safetensors``: a lone ``.safetensors`` file;
- ``deepspeed``: a ZeRO-0/1/2 folder with ``mp_rank_00_model_states.pt`` (``{"module": ...}``), also
  as the parent folder with DeepSpeed's ``latest`` file; ``deepspeed zero-3``: the same with
  partitioned (empty) tensors, consolidated by DeepSpeed's ``zero_to_fp32`` when it is installed;
- ``deepspeed pipeline``: ``layer_XX-model_states.pt`` files, merged;
- ``torch``: a single ``.pth``/``.pt`` file — a LAVIS runner ``checkpoint_N.pth`` (``{"model": ...}``),
  the seed's bare ``model.pth`` / ``unfreeze_llm_model.pth``, or DeepSpeed's states file.

Everything is read with ``weights_only`` loading; a file that is not a readable checkpoint, or a
layout that is none of these, is a :class:`~mllmkit.weights.WeightsError` naming the expected ones.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import torch

from mllmkit.errors import UserError
from mllmkit.weights import WeightsError, read_safetensors, safe_torch_load

__all__ = ["EXPORT_WEIGHTS", "read_checkpoint", "read_trainable_weights"]

EXPORT_WEIGHTS = "trainable.safetensors"

_EXPECTED = ("expected one of: an mllmkit export or checkpoint folder (trainable.safetensors), a .safetensors "
             "file, a LAVIS checkpoint_N.pth ({'model': state_dict}), a bare state dict (model.pth), or a DeepSpeed "
             "folder (mp_rank_00_model_states.pt, or layer_XX-model_states.pt of a pipeline)")


def read_trainable_weights(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Tensors by their stored names from any accepted layout (see :func:`read_checkpoint`)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path: str | pathlib.Path) -> tuple[dict[str, torch.Tensor], str]:
    """Tensors by their stored names and the layout found (``mllmkit``, ``deepspeed``, ``deepspeed zero-3``,
    ``deepspeed pipeline``, ``safetensors`` for a lone file, or ``torch``)."""
    path = pathlib.Path(path)
    if not path.exists():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.is_dir():
        return _read_folder(_deepspeed_tag_folder(path))
    if path.suffix == ".safetensors":
        return read_safetensors(path), "safetensors"
    return _state_dict(path, safe_torch_load(path)), "torch"


def _read_folder(path: pathlib.Path) -> tuple[dict[str, torch.Tensor], str]:
    if (path / EXPORT_WEIGHTS).is_file():
        return read_safetensors(path / EXPORT_WEIGHTS), "mllmkit"
    layers = sorted(path.glob("layer_*-model_states.pt"))
    if layers:
        tensors: dict[str, torch.Tensor] = {}
        for layer in layers:
            tensors.update(_state_dict(layer, safe_torch_load(layer), allow_empty=True))  # parameter-free layers
        return tensors, "deepspeed pipeline"
    states = path / "mp_rank_00_model_states.pt"
    if states.is_file():
        module = safe_torch_load(states)
        if not isinstance(module, Mapping) or not isinstance(module.get("module"), Mapping):
            raise WeightsError(f"{states}: no 'module' state dict inside; {_EXPECTED}")
        tensors = {k: v for k, v in module["module"].items() if isinstance(v, torch.Tensor)}
        if any(v.numel() == 0 for v in tensors.values()) and any(path.glob("*zero_pp_rank_*optim_states.pt")):
            return _zero3_consolidated(path), "deepspeed zero-3"
        return tensors, "deepspeed"
    if (path / "model.pth").is_file():
        return read_checkpoint(path / "model.pth")
    raise WeightsError(f"{path}: no checkpoint found in this folder; {_EXPECTED}")


def _state_dict(path: pathlib.Path, obj: object, allow_empty: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a loaded ``.pth``: a bare state dict, or one wrapped in ``model`` / ``module``
    (``allow_empty``: a pipeline layer file, which holds nothing for a layer without parameters)."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: found a {type(obj).__name__}; {_EXPECTED}")
    for wrapper in ("model", "module"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors and not allow_empty:
        raise WeightsError(f"{path}: no tensors at the top level (keys: {', '.join(map(str, list(obj)[:8]))}); "
                           f"{_EXPECTED}")
    return tensors


def _deepspeed_tag_folder(path: pathlib.Path) -> pathlib.Path:
    latest = path / "latest"
    if latest.is_file() and not any(path.glob("*model_states.pt")):
        tag = latest.read_text().strip()
        if (path / tag).is_dir():
            return path / tag
    return path


def _zero3_consolidated(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise UserError(f"{folder}: a ZeRO-3 DeepSpeed checkpoint (partitioned weights); consolidating it needs "
                        f"the deepspeed package (pip install 'mllmkit[deepspeed]')") from None
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name))
