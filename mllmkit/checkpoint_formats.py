"""Reading trained weights from every checkpoint layout users bring (exports and the seed's releases).

Accepted: this project's export folder or ``trainable.safetensors``; a LAVIS runner
``checkpoint_N.pth`` (``{"model": state_dict, ...}``); the seed's bare ``model.pth`` /
``unfreeze_llm_model.pth``; DeepSpeed ``mp_rank_00_model_states.pt`` (``{"module": ...}``). All via
``weights_only`` loading. Anything else is refused with the expected layouts named.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping

import torch

from mllmkit.weights import WeightsError, safe_torch_load

__all__ = ["read_trainable_weights", "EXPORT_WEIGHTS"]

EXPORT_WEIGHTS = "trainable.safetensors"

_EXPECTED = ("expected one of: an mllmkit export folder (trainable.safetensors), a .safetensors file, "
             "a LAVIS checkpoint_N.pth ({'model': state_dict}), a bare state dict (model.pth), or DeepSpeed "
             "mp_rank_00_model_states.pt ({'module': state_dict})")


def read_trainable_weights(path: str | pathlib.Path) -> dict[str, torch.Tensor]:
    """Tensors by name from any accepted checkpoint layout."""
    path = pathlib.Path(path)
    if path.is_dir():
        for candidate in (path / EXPORT_WEIGHTS, path / "mp_rank_00_model_states.pt", path / "model.pth"):
            if candidate.is_file():
                return read_trainable_weights(candidate)
        raise WeightsError(f"{path}: no checkpoint found in this folder; {_EXPECTED}")
    if not path.is_file():
        raise WeightsError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = safe_torch_load(path)
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: found a {type(obj).__name__}; {_EXPECTED}")
    for wrapper in ("model", "module"):
        if isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise WeightsError(f"{path}: no tensors at the top level (keys: {', '.join(list(obj)[:8])}); {_EXPECTED}")
    return tensors
