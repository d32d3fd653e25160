"""The optimizer and learning-rate schedule: AdamW without decay on 1-D parameters; warmup then cosine.

The schedule is a pure function of the optimizer step (not the micro-step), so it needs no state of
its own in a checkpoint: the step number restores it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from mllmkit.errors import RecipeError

__all__ = ["build_adamw", "check_lr_scale", "lr_at", "lr_scale_of", "make_lr_schedule", "param_groups", "set_lr"]


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


def _under(name: str, part: str) -> bool:
    return name == part or name.startswith(part + ".")


def lr_scale_of(name: str, lr_scale: Mapping[str, float]) -> float:
    """The multiplier of the longest key of ``lr_scale`` that is a dotted prefix of ``name`` (else 1)."""
    matches = [key for key in lr_scale if _under(name, key)]
    return lr_scale[max(matches, key=len)] if matches else 1.0


def check_lr_scale(names: Iterable[str], lr_scale: Mapping[str, float]) -> None:
    """Every key of ``train.lr_scale`` must name a part holding trainable parameters."""
    names = list(names)
    for key in lr_scale:
        if not any(_under(name, key) for name in names):
            parts = sorted({".".join(n.split(".")[:2]) if n.startswith("bridges.") else n.split(".")[0]
                            for n in names})
            raise RecipeError(f"train.lr_scale.{key}", f"matches no trainable parameter; the trainable parts "
                                                       f"are {', '.join(parts) or 'none'}")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float,
                 lr_scale: Mapping[str, float] | None = None) -> list[dict]:
    """Matrices decay; biases, norms and other 1-D parameters do not: the two groups (always both),
    or with ``lr_scale`` two per multiplier (ascending, key ``lr_scale``: the engines set
    ``lr × lr_scale``), empty ones left out (DeepSpeed's ZeRO cannot flatten an empty group). Each
    group also lists its parameter ``names`` (so optimizer state can be saved by name)."""
    scales = sorted({1.0, *(lr_scale or {}).values()})
    groups = {(scale, decays): {"params": [], "names": [], "lr_scale": scale,
                                "weight_decay": weight_decay if decays else 0.0}
              for scale in scales for decays in (True, False)}
    for name, param in named:
        group = groups[lr_scale_of(name, lr_scale or {}), param.ndim >= 2]
        group["names"].append(name)
        group["params"].append(param)
    return [group for group in groups.values() if group["params"] or not lr_scale]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's learning rate to ``lr`` times its ``lr_scale``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def build_adamw(named: Iterable[tuple[str, nn.Parameter]], train) -> torch.optim.AdamW:
    """AdamW over the trainable parameters with the recipe's lr, betas, eps, weight decay and lr_scale;
    torch's fused kernel where every parameter allows it (one kernel for all tensors instead of a loop
    of small ops: on CPU the step of the demo model takes a third of the time)."""
    named = list(named)
    return torch.optim.AdamW(param_groups(named, train.weight_decay, train.lr_scale), lr=train.lr,
                             betas=tuple(train.betas), eps=train.eps, fused=_fusable(p for _, p in named) or None)


def _fusable(params: Iterable[torch.Tensor]) -> bool:
    return all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float16, torch.bfloat16)
               for p in params)
