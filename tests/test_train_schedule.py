"""Learning-rate schedule values (in optimizer steps) and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mllmkit.errors import RecipeError
from mllmkit.train.optim import build_adamw, check_lr_scale, lr_at, param_groups, set_lr


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
        lr, betas, eps, weight_decay, lr_scale = 2e-4, (0.9, 0.98), 1e-6, 0.05, {}

    opt = build_adamw(model.named_parameters(), Train)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-6
    assert [len(g["params"]) for g in opt.param_groups] == [2, 3]


def _parts() -> nn.Module:
    parts = nn.Module()
    for name in ("vision", "bridges", "llm"):
        parts.add_module(name, nn.ModuleList([nn.Linear(2, 2)]) if name == "bridges" else nn.Linear(2, 2))
    parts.bridges.append(nn.Linear(2, 2))
    return parts


def test_lr_scale_multiplies_the_learning_rate_of_a_part():
    """AdamW's first step moves every weight with a gradient by lr·scale (no decay, eps ≈ 0): the
    vision part at 0.5×, bridge 1 at 3× (the longer key wins over ``bridges``), the rest at 1×."""
    model = _parts()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    class Train:
        lr, betas, eps, weight_decay = 1e-2, (0.9, 0.999), 1e-12, 0.0
        lr_scale = {"vision": 0.5, "bridges": 2.0, "bridges.1": 3.0}

    opt = build_adamw(model.named_parameters(), Train)
    assert [(g["lr_scale"], g["weight_decay"] > 0 or None, len(g["params"])) for g in opt.param_groups] == \
        [(0.5, None, 1), (0.5, None, 1), (1.0, None, 1), (1.0, None, 1), (2.0, None, 1), (2.0, None, 1),
         (3.0, None, 1), (3.0, None, 1)]
    set_lr(opt, 1e-2)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    expected = {"vision": 0.5e-2, "bridges.0": 2e-2, "bridges.1": 3e-2, "llm": 1e-2}
    for name, param in model.named_parameters():
        part = next(k for k in ("bridges.0", "bridges.1", "vision", "llm") if name.startswith(k))
        torch.testing.assert_close((before[name] - param.detach()).abs(),
                                   torch.full_like(param, expected[part]), rtol=1e-4, atol=0)


def test_lr_scale_leaves_out_empty_groups():
    linear = nn.Linear(2, 2)
    groups = param_groups([(f"bridges.0.{n}", p) for n, p in linear.named_parameters()], 0.05, {"bridges": 2.0})
    assert [(g["lr_scale"], g["weight_decay"], g["names"]) for g in groups] == \
        [(2.0, 0.05, ["bridges.0.weight"]), (2.0, 0.0, ["bridges.0.bias"])]


def test_lr_scale_key_must_name_a_trainable_part():
    names = [n for n, _ in _parts().named_parameters()]
    check_lr_scale(names, {"vision": 0.1, "bridges.1": 2.0})
    with pytest.raises(RecipeError) as info:
        check_lr_scale(names, {"bridges.2": 2.0})
    assert str(info.value) == ("train.lr_scale.bridges.2: matches no trainable parameter; the trainable parts are "
                               "bridges.0, bridges.1, llm, vision")
