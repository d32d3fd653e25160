"""Learning-rate schedule values (in optimizer steps) and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mllmkit.train.optim import build_adamw, lr_at, param_groups


def test_warmup_then_cosine_to_min_lr():
    kw = {"lr": 1e-3, "total_steps": 110, "warmup_steps": 10, "warmup_lr": 0.0, "min_lr": 1e-5}
    assert lr_at(0, **kw) == 0.0
    assert lr_at(5, **kw) == pytest.approx(5e-4)
    assert lr_at(10, **kw) == pytest.approx(1e-3)
    assert lr_at(60, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)  # half way through the cosine
    assert lr_at(35, **kw) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lr_at(110, **kw) == pytest.approx(1e-5)
    assert lr_at(500, **kw) == pytest.approx(1e-5)


def test_seed_hyper_parameters():
    # MiniGPT4Qwen: lr 1e-4, min_lr 1e-6, warmup 500 steps from warmup_lr 0
    kw = {"lr": 1e-4, "total_steps": 11750, "warmup_steps": 500, "min_lr": 1e-6}
    assert lr_at(250, **kw) == pytest.approx(5e-5)
    assert lr_at(500, **kw) == pytest.approx(1e-4)
    assert lr_at(11750, **kw) == pytest.approx(1e-6)


def test_no_decay_on_biases_norms_and_1d_params():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    model.register_parameter("queries", nn.Parameter(torch.zeros(1, 2, 4)))
    groups = param_groups(model.named_parameters(), weight_decay=0.05)
    assert groups[0]["names"] == ["queries", "0.weight"] and groups[0]["weight_decay"] == 0.05
    assert groups[1]["names"] == ["0.bias", "1.weight", "1.bias"] and groups[1]["weight_decay"] == 0.0

    class Train:
        lr, betas, eps, weight_decay = 2e-4, (0.9, 0.98), 1e-6, 0.05

    opt = build_adamw(model.named_parameters(), Train)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert [len(g["params"]) for g in opt.param_groups] == [2, 3]
