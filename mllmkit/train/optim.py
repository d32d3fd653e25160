"""The optimizer and learning-rate schedule: AdamW without decay on 1-D parameters; warmup then cosine.

The schedule is a pure function of the optimizer step (not the micro-step), so it needs no state of
its own in a checkpoint: the step number restores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["build_adamw", "lr_at", "make_lr_schedule", "param_groups"]


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int = 0, warmup_lr: float = 0.0,
          min_lr: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from ``warmup_lr`` to ``lr``
    over ``warmup_steps`` steps, then cosine from ``lr`` down to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay_steps, 1.0)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_schedule(train, total_steps: int) -> Callable[[int], float]:
    """The schedule of a recipe's ``[train]`` section."""
    return lambda step: lr_at(step, lr=train.lr, total_steps=total_steps, warmup_steps=train.warmup_steps,
                              warmup_lr=train.warmup_lr, min_lr=train.min_lr)


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; biases, norms and other 1-D parameters do not. Each group also
    lists its parameter ``names`` (so optimizer state can be saved by name)."""
    decay, no_decay = ([], []), ([], [])
    for name, param in named:
        target = decay if param.ndim >= 2 else no_decay
        target[0].append(name)
        target[1].append(param)
    return [{"params": decay[1], "names": decay[0], "weight_decay": weight_decay},
            {"params": no_decay[1], "names": no_decay[0], "weight_decay": 0.0}]


def build_adamw(named: Iterable[tuple[str, nn.Parameter]], train) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the recipe's lr, betas, eps and weight decay."""
    return torch.optim.AdamW(param_groups(named, train.weight_decay), lr=train.lr, betas=tuple(train.betas),
                             eps=train.eps)
