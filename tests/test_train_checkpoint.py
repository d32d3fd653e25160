"""Checkpoints: written atomically (a crash mid-write leaves the previous one intact and no partial
folder), keep-last-N, name-keyed optimizer state that loads into a fresh engine, and the export."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mllmkit.train import checkpoint as ckpt
from mllmkit.train.engine import load_named_optimizer_state, named_optimizer_state
from mllmkit.train.optim import param_groups


def _state(value: float):
    return {"model": {"bridges.0.proj.weight": torch.full((2, 2), value)},
            "optimizer": {"state": {}, "param_groups": []}, "scaler": {}}


def _save(run, step, value, keep_last=5):
    return ckpt.save_checkpoint(run, _state(value), {"step": step}, [ckpt.rng_state()], keep_last)


def test_crash_mid_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, 1, 1.0)
    real_save = torch.save

    def crash(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        raise OSError("disk full")  # after optimizer.pt is on disk, before the rest

    monkeypatch.setattr(torch, "save", crash)
    from mllmkit.errors import UserError

    with pytest.raises(UserError, match="disk full; nothing was replaced"):
        _save(tmp_path, 2, 2.0)
    monkeypatch.undo()
    folder = tmp_path / ckpt.CHECKPOINT_DIR
    assert sorted(p.name for p in folder.iterdir()) == ["step_0000001"]  # no .tmp-* left, no step_2
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]
    engine_state, trainer_state, _ = ckpt.load_checkpoint(folder / "step_0000001")
    assert trainer_state == {"step": 1}
    assert torch.equal(engine_state["model"]["bridges.0.proj.weight"], torch.full((2, 2), 1.0))
    assert ckpt.find_resume("auto", tmp_path) == folder / "step_0000001"


def test_partial_folder_is_never_listed(tmp_path):
    _save(tmp_path, 1, 1.0)
    (tmp_path / ckpt.CHECKPOINT_DIR / ".tmp-step_0000002-123").mkdir()
    (tmp_path / ckpt.CHECKPOINT_DIR / "step_0000003").mkdir()  # no trainer_state.json: incomplete
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000001"]


def test_keep_last(tmp_path):
    for step in range(1, 5):
        _save(tmp_path, step, float(step), keep_last=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_0000003", "step_0000004"]


def test_rng_state_round_trip(tmp_path):
    import random

    import numpy as np

    _save(tmp_path, 1, 0.0)
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    _, _, rngs = ckpt.load_checkpoint(tmp_path / ckpt.CHECKPOINT_DIR / "step_0000001")
    ckpt.set_rng_state(rngs[0])
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


def test_optimizer_state_by_name_loads_into_a_fresh_optimizer():
    torch.manual_seed(0)
    a = nn.Linear(3, 2)
    opt_a = torch.optim.AdamW(param_groups(a.named_parameters(), 0.1), lr=1e-2)
    a(torch.randn(4, 3)).sum().backward()
    opt_a.step()
    saved = copy.deepcopy(named_optimizer_state(opt_a))  # as if read back from disk
    assert set(saved["state"]) == {"weight", "bias"}
    b = nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    opt_b = torch.optim.AdamW(param_groups(b.named_parameters(), 0.1), lr=1e-2)
    load_named_optimizer_state(opt_b, saved)
    for model, opt in ((a, opt_a), (b, opt_b)):
        opt.zero_grad()
        torch.manual_seed(1)
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)


def test_export_folder(tmp_path):
    from mllmkit.checkpoint_formats import read_trainable_weights

    out = ckpt.export(tmp_path, {"bridges.0.proj.weight": torch.ones(2, 2)}, {"train": {"lr": 0.1}})
    assert sorted(p.name for p in out.iterdir()) == ["recipe.toml", "trainable.safetensors"]
    assert torch.equal(read_trainable_weights(out)["bridges.0.proj.weight"], torch.ones(2, 2))
    assert "lr = 0.1" in (out / "recipe.toml").read_text()


def test_resume_errors(tmp_path):
    from mllmkit.errors import UserError

    assert ckpt.find_resume("auto", tmp_path) is None
    with pytest.raises(UserError, match="no such checkpoint"):
        ckpt.find_resume(str(tmp_path / "nope"), tmp_path)
    with pytest.raises(UserError, match="not a complete checkpoint folder"):
        ckpt.load_checkpoint(tmp_path)
