"""Built-in torch backends: ``single`` (one process) and ``ddp`` (torch DistributedDataParallel).

Both step through the core's :class:`mllmkit.train.engine.Engine` with a :class:`TorchRunner`: a
plain forward/backward per micro-batch (under DDP the gradient sync only on the last one), then
fp16 unscaling, clipping and AdamW. ``ddp`` reads torchrun's environment, uses gloo on CPU and nccl
on CUDA, and wraps the model so that only trainable parameters are synchronised: frozen weights are
never bucketed nor broadcast (every rank builds them identically from the run's seed or the same
files). A collective that waits longer than ``timeout_s`` (a rank died) raises instead of hanging;
torchrun then stops the other ranks. Without torchrun's environment ``ddp`` runs as one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable
from typing import Any, Literal

import attrs
import torch
from torch import nn

from mllmkit.config import config, positive
from mllmkit.data.collate import Batch
from mllmkit.errors import UserError
from mllmkit.registry import ComponentSpec
from mllmkit.train.dist import BackendBase, device_preference, pick_device
from mllmkit.train.engine import Engine, load_named_optimizer_state, named_optimizer_state

__all__ = ["SPECS", "DDPBackend", "DDPConfig", "SingleBackend", "SingleConfig", "TorchRunner"]


@config
class SingleConfig:
    """``single`` has no options: one process, one device (``train.device``)."""


@config
class DDPConfig:
    """Options of ``ddp``."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    timeout_s: int = attrs.field(default=600, validator=positive)
    """A collective waiting longer than this (e.g. a rank died) raises instead of hanging."""
    find_unused_parameters: bool = False
    """Set when some trainable parameters get no gradient in a step."""


class _LossModule(nn.Module):
    """What DDP wraps: the MLLM's loss as a plain tuple (DDP inspects outputs as tensors)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **inputs):
        out = self.model(**inputs)
        return out.loss_sum, out.num_tokens


class TorchRunner:
    """Forward/backward and AdamW on one device, optionally through DDP (``wrap``)."""

    uses_grad_scaler = True

    def __init__(self, model: nn.Module, device: torch.device, world_size: int, optimizer_factory: Callable[..., Any],
                 wrap: Callable[[nn.Module], nn.Module] | None = None) -> None:
        self.model = model
        self.device = device
        self.world_size = world_size
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = optimizer_factory(self.named_trainable)
        module = _LossModule(model)
        self.module = wrap(module) if wrap is not None else module

    def loss_multiplier(self, micro_batches: int) -> float:
        return float(self.world_size)  # DDP averages gradients over ranks

    def forward_backward(self, window, autocast) -> None:
        no_sync = getattr(self.module, "no_sync", None)  # DDP: all-reduce at the last micro-batch only

        def gradient_sync(is_last: bool):
            return contextlib.nullcontext() if no_sync is None or is_last else no_sync()

        window.backward(self.module, self.device, autocast, self.named_trainable, gradient_sync)

    def apply(self, clip: float, scaler) -> float:
        scaler.unscale_(self.optimizer)
        params = [p for _, p in self.named_trainable]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        scaler.step(self.optimizer)
        scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def eval_forward(self, batch: Batch):
        out = self.model(**batch.model_inputs(self.device))
        return out.loss_sum, out.num_tokens

    def gather_state(self, step: int) -> dict[str, Any]:
        return {"model": {n: p.detach().cpu().clone() for n, p in self.named_trainable},
                "optimizer": named_optimizer_state(self.optimizer)}

    def load_state(self, state: dict[str, Any]) -> None:
        params = dict(self.named_trainable)
        with torch.no_grad():
            for name, tensor in state["model"].items():
                params[name].copy_(tensor)
        load_named_optimizer_state(self.optimizer, state["optimizer"])


class SingleBackend(BackendBase):
    """One process on one device."""

    name = "single"

    def setup(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("parallel.type = 'single' runs one process, but this was launched with "
                            f"WORLD_SIZE={os.environ['WORLD_SIZE']}; set parallel.type = 'ddp' "
                            "(--set parallel.type=ddp)")
        self.device = pick_device(self.device_preference)

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> Engine:
        model.to(self.device)
        return Engine(model, self, TorchRunner(model, self.device, 1, optimizer_factory), lr_schedule, train)


class DDPBackend(BackendBase):
    """torch DistributedDataParallel over the trainable parameters."""

    name = "ddp"

    def __init__(self, cfg: DDPConfig, device_preference: str = "auto") -> None:
        super().__init__(device_preference)
        self.cfg = cfg

    def setup(self) -> None:
        import torch.distributed as dist

        self._read_launch()
        self.device = pick_device(self.device_preference, self.local_rank)
        if self.world_size == 1:
            return
        backend = self.cfg.backend if self.cfg.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=self.cfg.timeout_s),
                                **({"device_id": self.device} if self.device.type == "cuda" else {}))
        self._group = True

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> Engine:
        model.to(self.device)
        runner = TorchRunner(model, self.device, self.world_size, optimizer_factory,
                             wrap=self._wrap if self.world_size > 1 else None)
        return Engine(model, self, runner, lr_schedule, train)

    def _wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        buffers = [n for n, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen + buffers)
        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=self.cfg.find_unused_parameters)


SPECS = [
    ComponentSpec("single", SingleConfig, lambda cfg, ctx: SingleBackend(device_preference(ctx)),
                  "one process on one device"),
    ComponentSpec("ddp", DDPConfig, lambda cfg, ctx: DDPBackend(cfg, device_preference(ctx)),
                  "torch DistributedDataParallel (torchrun; gloo on CPU, nccl on CUDA)"),
]
