"""Where a training step happens: :class:`Engine.train_step`, written once for every backend.

The core owns the optimizer step: the learning rate of the step (``lr_schedule(step)`` times each
group's ``lr_scale``), the labelled-token / sample counts of the whole step over all ranks, how each
micro-batch's summed loss becomes its share of the step's loss (:class:`StepWindow`), autocast to
``train.precision``, fp16 loss scaling, clipping at ``train.grad_clip``, the step's metrics, and the
state by parameter name. With ``loss_reduction = "token"`` the update equals one big batch over every
labelled token of the step; ``"sample"`` reproduces the seed (mean per micro-batch, averaged).

A backend supplies only what differs, as a :class:`Runner` (see :mod:`mllmkit.interfaces`):
how forward/backward runs over the step's micro-batches (plain, DDP without sync until the last one,
a DeepSpeed engine, a pipeline schedule), how the step is applied (clip and step), and how full
tensors and optimizer moments are gathered and put back by name. State keyed by MLLM parameter names
means a checkpoint written under one backend loads under any other.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from mllmkit.data.collate import Batch
from mllmkit.interfaces import ParallelBackend, Runner
from mllmkit.train.optim import set_lr
from mllmkit.tune.lora import adapter_inputs_uncast

__all__ = ["Engine", "StepWindow", "load_named_optimizer_state", "named_optimizer_state",
           "restore_group_settings"]


class StepWindow:
    """One optimizer step's micro-batches and the step-wide numbers every backend's step needs.

    ``share(total, tokens)`` turns a micro-batch's summed loss into what to backpropagate — its share
    of the step's loss, times ``multiplier`` (the factor the backend's gradient averaging divides by:
    data-parallel ranks, and accumulation steps where the backend divides by those too), times the
    fp16 loss scale — and records the loss sums on the device (no host sync per micro-batch).
    """

    def __init__(self, micro_batches: Sequence[Batch], reduction: str, counts: Sequence[float],
                 multiplier: float, device: torch.device, loss_scale: float = 1.0) -> None:
        self.micro_batches = micro_batches
        self.reduction = reduction
        self.tokens, self.samples, self.nonempty = counts
        self.multiplier = multiplier
        self.loss_scale = loss_scale
        self.loss_sums = torch.zeros(2, dtype=torch.float64, device=device)
        """Summed token loss and the sum of micro-batch means recorded on this rank."""

    @property
    def denominator(self) -> float:
        return max(self.tokens if self.reduction == "token" else self.nonempty, 1.0)

    def share(self, total: torch.Tensor, tokens: torch.Tensor | int) -> torch.Tensor:
        self.loss_sums[0] += total.detach().double()
        if self.reduction == "sample":
            total = total / (tokens.clamp(min=1) if torch.is_tensor(tokens) else max(tokens, 1))
            self.loss_sums[1] += total.detach().double()
        return total * (self.multiplier * self.loss_scale / self.denominator)

    def loss(self, reduced_sums: torch.Tensor) -> float:
        """The step's true loss from the sums reduced over ranks."""
        return float(reduced_sums[0 if self.reduction == "token" else 1]) / self.denominator

    def backward(self, module: Callable[..., tuple[torch.Tensor, Any]], device: torch.device, autocast,
                 named_trainable: Sequence[tuple[str, torch.Tensor]],
                 gradient_sync: Callable[[bool], AbstractContextManager]) -> None:
        """Forward and backward of every micro-batch through ``module`` (``(total, tokens)`` out), each
        inside ``gradient_sync(is_last)``, so the backend's collectives run once per step. A micro-batch
        whose samples were all skipped still backpropagates a zero through every trainable weight, so
        it takes part in the step's gradient collectives like the others."""
        last = len(self.micro_batches) - 1
        for i, batch in enumerate(self.micro_batches):
            with gradient_sync(i == last):
                if batch.size == 0:
                    share = sum(p.sum() * 0.0 for _, p in named_trainable)
                else:
                    with autocast():
                        total, tokens = module(**batch.model_inputs(device))
                    share = self.share(total, tokens)
                share.backward()


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


def restore_group_settings(optimizer: torch.optim.Optimizer, saved_groups: Sequence[dict[str, Any]]) -> None:
    """Put a checkpoint's AdamW hyper-parameters (betas, eps, weight decay) back on the groups."""
    for mine, theirs in zip(optimizer.param_groups, saved_groups):
        for key in ("betas", "eps", "weight_decay"):
            if key in theirs:
                mine[key] = theirs[key]


class Engine:
    """A model prepared by a backend: one optimizer step per :meth:`train_step`, checkpointable."""

    def __init__(self, model: nn.Module, backend: ParallelBackend, runner: Runner,
                 lr_schedule: Callable[[int], float], train) -> None:
        self.model = model
        self.backend = backend
        self.runner = runner
        self.device = backend.device
        self.settings = train
        self.lr_schedule = lr_schedule
        self.step = 0
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=train.precision == "fp16"
                                           and self.device.type == "cuda" and runner.uses_grad_scaler)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward's autocast to ``train.precision`` (none for fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- one optimizer step --
    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        """Set the step's learning rate, run forward/backward over this rank's micro-batches, clip,
        step, and return the step's true loss over all ranks with the global counts. A step whose
        every sample was skipped (data errors) changes no weight and returns ``skipped: True``."""
        lr = self.lr_schedule(self.step)
        set_lr(self.runner.optimizer, lr)
        local = torch.tensor([sum(b.num_tokens for b in micro_batches), sum(b.size for b in micro_batches),
                              sum(1 for b in micro_batches if b.size)], dtype=torch.float64)
        counts = (self.backend.all_reduce(local) / self.backend.batch_replicas).tolist()
        if counts[1] == 0:  # data errors took every sample of the step on every rank: no update
            self.step += 1
            return {"loss": float("nan"), "lr": lr, "grad_norm": float("nan"), "tokens": 0.0, "samples": 0.0,
                    "skipped": True}
        window = StepWindow(micro_batches, self.settings.loss_reduction, counts,
                            self.runner.loss_multiplier(len(micro_batches)), self.device,
                            loss_scale=self.scaler.get_scale() if self.scaler.is_enabled() else 1.0)
        self.model.train()
        with adapter_inputs_uncast(self.model) if self.autocast_dtype is not None else contextlib.nullcontext():
            self.runner.forward_backward(window, self.autocast)
        grad_norm = self.runner.apply(self.settings.grad_clip, self.scaler)
        self.step += 1
        sums = self.backend.all_reduce(window.loss_sums.cpu())
        return {"loss": window.loss(sums), "lr": lr, "grad_norm": grad_norm, "tokens": window.tokens,
                "samples": window.samples}

    # -- evaluation --
    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """Summed token loss and labelled-token count of one batch (this rank's data)."""
        if batch.size == 0:
            return 0.0, 0
        self.model.eval()
        with self.autocast():
            total, tokens = self.runner.eval_forward(batch)
        return float(total), int(tokens)

    # -- state by parameter name --
    def state_dict(self) -> dict[str, Any]:
        """``model`` (full trainable tensors by MLLM name, on CPU), ``optimizer`` (AdamW state by name),
        ``step``, ``scaler``. A collective under sharding backends: call it on every rank."""
        return {**self.runner.gather_state(self.step), "step": self.step,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take a state written by any backend (names must match this model's trainable parameters)."""
        trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(trainable - set(state["model"]))
        unexpected = sorted(set(state["model"]) - trainable)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this model's trainable parameters: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        self.runner.load_state(state)
        restore_group_settings(self.runner.optimizer, state["optimizer"]["param_groups"])
        self.step = int(state["step"])
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
