"""Training checkpoints and the final export, written atomically.

A checkpoint is a folder ``<run>/checkpoints/step_NNNNNNN`` holding ``trainable.safetensors``
(trainable parameters only, MLLM names), ``optimizer.pt`` (AdamW state keyed by parameter name,
GradScaler state), ``rng.pt`` (every rank's RNG states) and ``trainer_state.json`` (step, epoch,
position in the epoch, skip counts). It is written to a hidden temporary folder and renamed into
place, so an interrupted save leaves no partial checkpoint and the previous ones intact; older
checkpoints beyond ``keep_last`` are removed only after the new one is in place. The export folder
(``<run>/export``: ``trainable.safetensors`` + ``recipe.toml``) is what ``mllmkit chat`` loads.
"""

from __future__ import annotations

import json
import os
import pathlib
import random
import re
import shutil
from collections.abc import Callable
from typing import Any

import torch

from mllmkit.checkpoint_formats import EXPORT_WEIGHTS
from mllmkit.errors import UserError
from mllmkit.weights import safe_torch_load

__all__ = [
    "CHECKPOINT_DIR",
    "export",
    "find_resume",
    "list_checkpoints",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "write_atomically",
]

CHECKPOINT_DIR = "checkpoints"
_STEP_DIR = re.compile(r"^step_(\d+)$")


def write_atomically(target: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call ``write(tmp_folder)``, then rename the folder to ``target`` (replacing an older one).

    If ``write`` raises, the temporary folder is removed and ``target`` is untouched."""
    target = pathlib.Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        for path in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".old-{target.name}-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def _save_tensors(tensors: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as plain lists and numbers (picklable across
    ranks, and accepted by ``weights_only`` loading)."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


def list_checkpoints(run_dir: pathlib.Path) -> list[pathlib.Path]:
    """Complete checkpoints of a run, oldest first (temporary folders are never listed)."""
    folder = pathlib.Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(run_dir: pathlib.Path, engine_state: dict[str, Any], trainer_state: dict[str, Any],
                    rng_states: list[dict[str, Any]], keep_last: int) -> pathlib.Path:
    """Write one checkpoint atomically and keep only the newest ``keep_last``."""
    step = int(trainer_state["step"])

    def write(tmp: pathlib.Path) -> None:
        _save_tensors(engine_state["model"], tmp / EXPORT_WEIGHTS)
        torch.save({"optimizer": engine_state["optimizer"], "scaler": engine_state.get("scaler", {})},
                   tmp / "optimizer.pt")
        torch.save(rng_states, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))

    target = write_atomically(pathlib.Path(run_dir) / CHECKPOINT_DIR / f"step_{step:07d}", write)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(engine state, trainer state, per-rank RNG states) of a checkpoint folder."""
    from safetensors.torch import load_file

    path = pathlib.Path(path)
    if not (path / "trainer_state.json").is_file():
        raise UserError(f"--resume {path}: not a checkpoint folder (no trainer_state.json); pass a "
                        f"<run>/{CHECKPOINT_DIR}/step_N folder or 'auto'")
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    opt = safe_torch_load(path / "optimizer.pt")
    engine_state = {"model": load_file(str(path / EXPORT_WEIGHTS)), "optimizer": opt["optimizer"],
                    "scaler": opt.get("scaler", {}), "step": trainer_state["step"]}
    return engine_state, trainer_state, safe_torch_load(path / "rng.pt")


def find_resume(resume: str | None, run_dir: pathlib.Path) -> pathlib.Path | None:
    """The checkpoint ``--resume`` names: a path, or ``auto`` = the newest in the run folder (None if none)."""
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = pathlib.Path(resume)
    if not path.exists():
        raise UserError(f"--resume {resume}: no such checkpoint")
    return path


def export(run_dir: pathlib.Path, tensors: dict[str, torch.Tensor], recipe_dict: dict[str, Any]) -> pathlib.Path:
    """Write ``<run>/export`` (trainable weights + the resolved recipe) atomically."""
    import tomli_w

    def write(tmp: pathlib.Path) -> None:
        _save_tensors(tensors, tmp / EXPORT_WEIGHTS)
        (tmp / "recipe.toml").write_text(tomli_w.dumps(recipe_dict))

    return write_atomically(pathlib.Path(run_dir) / "export", write)
