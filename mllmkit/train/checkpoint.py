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

import errno
import json
import os
import pathlib
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from mllmkit.checkpoint_formats import EXPORT_WEIGHTS
from mllmkit.errors import UserError
from mllmkit.weights import read_safetensors, safe_torch_load

__all__ = [
    "CHECKPOINT_DIR",
    "CHECKPOINT_FILES",
    "check_run_dir",
    "clean_stale",
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
CHECKPOINT_FILES = (EXPORT_WEIGHTS, "optimizer.pt", "rng.pt", "trainer_state.json")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_STALE = re.compile(r"^\.(?:tmp|old)-.+-(\d+)$")


def write_atomically(target: pathlib.Path, write: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """Call ``write(tmp_folder)``, then rename the folder to ``target`` (replacing an older one).

    If anything fails, the temporary folder is removed and ``target`` is untouched; a failure to
    write (disk full, read-only folder, no permission) becomes a :class:`UserError` saying so."""
    target = pathlib.Path(target)
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    old = target.parent / f".old-{target.name}-{os.getpid()}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        write(tmp)
        for path in tmp.iterdir():  # flush file contents before the rename makes them visible
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        replaced = target.exists()
        if replaced:
            os.replace(target, old)
        os.replace(tmp, target)
    except UserError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as exc:  # noqa: BLE001 - torch.save and safetensors report a full disk as RuntimeError/SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"cannot write {target}: {_write_failure(target.parent, exc)}; nothing was replaced "
                        f"(earlier checkpoints are intact)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced:
        shutil.rmtree(old, ignore_errors=True)
    return target


_HINTS = {errno.ENOSPC: "the disk is full (free space, or point train.output_dir / --output-dir elsewhere)",
          errno.EDQUOT: "over the disk quota (free space, or point train.output_dir / --output-dir elsewhere)",
          errno.EROFS: "a read-only file system (point train.output_dir / --output-dir elsewhere)",
          errno.EACCES: "no permission to write there (point train.output_dir / --output-dir elsewhere)",
          errno.EEXIST: "a file is in the way of a folder (point train.output_dir / --output-dir elsewhere)",
          errno.ENOTDIR: "a file is in the way of a folder (point train.output_dir / --output-dir elsewhere)"}


def _write_failure(folder: pathlib.Path, exc: Exception) -> str:
    """Words for why writing into ``folder`` failed, with the fix."""
    code = exc.errno if isinstance(exc, OSError) else None
    if code is None:  # torch.save says "unexpected pos" and safetensors "I/O error" on a full disk
        try:
            stats = os.statvfs(folder if folder.exists() else folder.parent)
            if stats.f_bavail * stats.f_frsize < 2**20:
                code = errno.ENOSPC
        except OSError:
            pass
    if code in _HINTS:
        return _HINTS[code]
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def check_run_dir(run_dir: pathlib.Path) -> pathlib.Path:
    """Create the run folder if needed and make sure files can be written there, before any work:
    a file in its place, a read-only or full disk are a :class:`UserError` naming the folder."""
    run_dir = pathlib.Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} is a file, not a folder; point train.output_dir or --output-dir "
                        f"elsewhere")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir) as probe:
            probe.write(b"mllmkit")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as exc:
        raise UserError(f"cannot write in the run folder {run_dir}: {_write_failure(run_dir, exc)}") from None
    return run_dir


def clean_stale(folder: pathlib.Path) -> list[pathlib.Path]:
    """Remove the ``.tmp-*`` and ``.old-*`` folders that saves killed midway left in ``folder`` (the
    ones of processes still running are kept). Returns what was removed."""
    removed = []
    if not pathlib.Path(folder).is_dir():
        return removed
    for path in pathlib.Path(folder).iterdir():
        match = _STALE.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    """Complete checkpoints of a run, oldest first: temporary folders and folders missing any of
    :data:`CHECKPOINT_FILES` (a removal that was interrupted) are never listed."""
    folder = pathlib.Path(run_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))
             and all((p / name).is_file() for name in CHECKPOINT_FILES)]
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

    folder = pathlib.Path(run_dir) / CHECKPOINT_DIR
    clean_stale(folder)
    target = write_atomically(folder / f"step_{step:07d}", write)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        doomed = folder / f".old-{old.name}-{os.getpid()}"
        os.replace(old, doomed)  # unlisted at once; a kill during the removal leaves a stale folder, not half a checkpoint
        shutil.rmtree(doomed, ignore_errors=True)
    return target


def load_checkpoint(path: pathlib.Path) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(engine state, trainer state, per-rank RNG states) of a checkpoint folder; anything unreadable
    or not in this layout is a :class:`UserError` naming the file."""
    path = pathlib.Path(path)
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise UserError(f"--resume {path}: not a complete checkpoint folder (no {', '.join(missing)}); pass a "
                        f"<run>/{CHECKPOINT_DIR}/step_N folder or 'auto'")
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
        step = int(trainer_state["step"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError) as exc:
        raise UserError(f"{path / 'trainer_state.json'}: not a trainer state ({type(exc).__name__}: {exc})") from None
    model = read_safetensors(path / EXPORT_WEIGHTS)
    ints = [name for name, tensor in model.items() if not tensor.is_floating_point()]
    if ints:
        raise UserError(f"{path / EXPORT_WEIGHTS}: {ints[0]} holds {str(model[ints[0]].dtype).removeprefix('torch.')} "
                        f"values; trainable weights are floating point numbers")
    opt, rngs = safe_torch_load(path / "optimizer.pt"), safe_torch_load(path / "rng.pt")
    if not isinstance(opt, dict) or not isinstance(opt.get("optimizer"), dict) or not isinstance(rngs, list):
        raise UserError(f"{path}: optimizer.pt or rng.pt is not in the layout mllmkit writes")
    engine_state = {"model": model, "optimizer": opt["optimizer"], "scaler": opt.get("scaler", {}), "step": step}
    return engine_state, trainer_state, rngs


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
