"""The torch engine shared by the ``single`` and ``ddp`` backends: one optimizer step per call.

``train_step`` runs the window's micro-batches (forward under autocast, backward, gradient sync only
on the last one under DDP), unscales fp16 gradients before clipping, steps AdamW at the schedule's
learning rate and returns the step's true loss. With ``loss_reduction = "token"`` each micro-batch's
summed token loss is divided by the labelled tokens of the whole window on every rank, so the update
equals one big batch; ``"sample"`` reproduces the seed (mean per micro-batch, averaged).

State is saved by parameter name (``model``: trainable tensors of the MLLM, ``optimizer``: AdamW
state keyed by name), so a checkpoint written under one backend loads under another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mllmkit.data.collate import Batch
from mllmkit.interfaces import ParallelBackend
from mllmkit.train.optim import set_lr

__all__ = ["TorchEngine", "load_named_optimizer_state", "named_optimizer_state", "micro_batch_loss"]


def micro_batch_loss(total: torch.Tensor, tokens: torch.Tensor, reduction: str, world: int,
                     global_tokens: float, global_nonempty: float) -> tuple[torch.Tensor, torch.Tensor]:
    """A micro-batch's share of the optimizer step's loss (what to backpropagate) and its sample mean.

    ``token``: summed token loss over every labelled token of the step on all ranks (times ``world``,
    since gradient reduction averages over ranks). ``sample``: the seed's per-micro-batch mean, averaged
    over the non-empty micro-batches of the step. The second value is the detached micro-batch mean
    for logging (0 under ``token``).
    """
    if reduction == "token":
        return total * world / max(global_tokens, 1.0), torch.zeros((), dtype=torch.float64)
    mean = total / tokens.clamp(min=1)
    return mean * world / max(global_nonempty, 1.0), mean.detach().double().cpu()


def named_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with per-parameter state keyed by parameter name."""
    state = optimizer.state_dict()
    names = [n for group in state["param_groups"] for n in group["names"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    by_id = dict(zip(ids, names))
    return {"state": {by_id[i]: s for i, s in state["state"].items()},
            "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in state["param_groups"]]}


def load_named_optimizer_state(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Inverse of :func:`named_optimizer_state`; the groups must hold the same parameter names."""
    current = optimizer.state_dict()
    groups = []
    for mine, theirs in zip(current["param_groups"], saved["param_groups"], strict=True):
        if list(mine["names"]) != list(theirs["names"]):
            missing = sorted(set(mine["names"]) ^ set(theirs["names"]))[:5]
            raise ValueError(f"checkpoint optimizer groups do not match this model's trainable parameters "
                             f"(differences: {', '.join(missing)})")
        groups.append({**theirs, "params": mine["params"]})
    by_name = {n: i for g in current["param_groups"] for n, i in zip(g["names"], g["params"])}
    state = {by_name[name]: s for name, s in saved["state"].items()}
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class _LossModule(nn.Module):
    """What DDP wraps: the MLLM's loss as a plain tuple (DDP inspects outputs as tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        return out.loss_sum, out.num_tokens


class TorchEngine:
    """A model, its AdamW and schedule, stepping on one device (optionally wrapped in DDP)."""

    def __init__(self, model: nn.Module, backend: ParallelBackend, optimizer_factory: Callable[..., Any],
                 lr_schedule: Callable[[int], float], train, wrap: Callable[[nn.Module], nn.Module] | None = None):
        self.model = model
        self.backend = backend
        self.device = backend.device
        self.settings = train
        self.lr_schedule = lr_schedule
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = optimizer_factory(self.named_trainable)
        module = _LossModule(model)
        self.forward_module = wrap(module) if wrap is not None else module
        self.step = 0
        precision = train.precision
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16" and self.device.type == "cuda")

    # -- one optimizer step --
    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        lr = self.lr_schedule(self.step)
        set_lr(self.optimizer, lr)
        world = self.backend.world_size
        counts = torch.tensor([sum(b.num_tokens for b in micro_batches), sum(b.size for b in micro_batches),
                               sum(1 for b in micro_batches if b.size)], dtype=torch.float64)
        global_tokens, global_samples, global_nonempty = self.backend.all_reduce(counts).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64)
        sample_means = torch.zeros((), dtype=torch.float64)
        self.model.train()
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.forward_module, "no_sync") \
                else self.forward_module.no_sync()
            with sync:
                if batch.size == 0:  # every sample skipped: still take part in the gradient sync
                    scaled = sum(p.sum() * 0.0 for _, p in self.named_trainable)
                else:
                    with self._autocast():
                        total, tokens = self.forward_module(**batch.model_inputs(self.device))
                    loss_sum += total.detach().double().cpu()
                    scaled, mean = micro_batch_loss(total, tokens, self.settings.loss_reduction, world,
                                                    global_tokens, global_nonempty)
                    sample_means += mean
                self.scaler.scale(scaled).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for _, p in self.named_trainable]
        clip = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        sums = self.backend.all_reduce(torch.stack([loss_sum, sample_means]))
        if self.settings.loss_reduction == "token":
            loss = float(sums[0]) / max(global_tokens, 1.0)
        else:
            loss = float(sums[1]) / max(global_nonempty, 1.0)
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": global_tokens, "samples": global_samples}

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- evaluation --
    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """Summed token loss and labelled-token count of one batch (this rank only)."""
        if batch.size == 0:
            return 0.0, 0
        self.model.eval()
        with self._autocast():
            out = self.model(**batch.model_inputs(self.device))
        return float(out.loss_sum), int(out.num_tokens)

    # -- state --
    def state_dict(self) -> dict[str, Any]:
        """``model`` (trainable tensors by MLLM name, on CPU), ``optimizer`` (by name), ``step``, ``scaler``."""
        return {"model": {n: p.detach().cpu().clone() for n, p in self.named_trainable},
                "optimizer": named_optimizer_state(self.optimizer), "step": self.step,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = dict(self.named_trainable)
        missing = sorted(set(params) - set(state["model"]))
        unexpected = sorted(set(state["model"]) - set(params))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this model's trainable parameters: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        with torch.no_grad():
            for name, tensor in state["model"].items():
                params[name].copy_(tensor)
        load_named_optimizer_state(self.optimizer, state["optimizer"])
        self.step = int(state["step"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
