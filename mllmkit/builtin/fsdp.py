"""The ``fsdp`` backend: PyTorch FSDP2 (``fully_shard``) over the MLLM's trainable parts, for full fine-tuning.

What is sharded: a shell module whose children are only the parts holding trainable parameters (a
fully tuned LLM, a LoRA-adapted one, the projector); each LLM decoder layer is its own FSDP unit
(``fully_shard(layer)``), then the shell is the root unit holding the rest (embeddings, final norm,
head, bridges). Frozen parts (vision tower, Q-Former) stay plain tensors outside sharding, gradients
and optimizer state, moved to the device once. Trainable weights are fp32 masters; with ``train.precision
= "bf16"`` FSDP's :class:`~torch.distributed.fsdp.MixedPrecisionPolicy` gathers them in bf16 and reduces
gradients in fp32. Activation checkpointing is the part's own (``gradient_checkpointing = true`` on the
LLM recomputes each decoder layer in backward, inside its FSDP unit).

The step is the core's (:class:`mllmkit.train.engine.Engine`): gradients reduce-scattered (averaged over
ranks) only on the step's last micro-batch, the global norm clipped over the sharded gradients, AdamW
on the local shards. State goes by MLLM parameter name as full tensors (``DTensor.full_tensor()``, a
collective), so a checkpoint written under ``fsdp`` loads under any backend and back.
"""

from __future__ import annotations

import contextlib
import datetime
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

__all__ = ["SPECS", "FSDPBackend", "FSDPConfig", "FSDPRunner"]


@config
class FSDPConfig:
    """Options of ``fsdp`` (PyTorch FSDP2)."""

    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Process-group backend; auto = nccl on CUDA, gloo on CPU."""
    reshard_after_forward: bool = True
    """Free each unit's gathered weights after its forward (ZeRO-3-like); false keeps them until backward
    (more memory, one all-gather fewer per layer)."""
    timeout_s: int = attrs.field(default=600, validator=positive)
    """A collective waiting longer than this (a rank died) raises instead of hanging."""


class _Shell(nn.Module):
    """The FSDP root: the trainable parts as children; forward = the MLLM's loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name.replace(".", "_"): part for name, part in model.parts()
                                    if any(p.requires_grad for p in part.parameters())})
        object.__setattr__(self, "mllm", model)  # not a child: frozen parts stay outside sharding

    def forward(self, **inputs):
        out = self.mllm(**inputs)
        return out.loss_sum, out.num_tokens


def _full(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().cpu().clone()


class FSDPRunner:
    """Forward/backward through the FSDP2-sharded shell, the step on the local shards."""

    uses_grad_scaler = False

    def __init__(self, model: nn.Module, backend: FSDPBackend, optimizer_factory: Callable[..., Any], train) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        if train.precision == "fp16":
            raise UserError('parallel.type = "fsdp" trains in fp32 or bf16; set train.precision = "bf16"')
        if not any(p.requires_grad for p in model.parameters()):
            raise UserError("fsdp: the model has no trainable parameter; mark a part trainable in the recipe")
        self.device, self.world_size = backend.device, backend.world_size
        for param in model.parameters():
            if param.requires_grad:  # fp32 master weights = the trainable weights themselves
                param.data = param.data.float()
        model.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        dtype = {"bf16": torch.bfloat16}.get(train.precision)
        options = {"mesh": mesh, "reshard_after_forward": backend.cfg.reshard_after_forward,
                   "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)}
        self.shell = _Shell(model)
        if "llm" in self.shell.parts:
            for layer in model.llm.layers():
                fully_shard(layer, **options)
        self.module = fully_shard(self.shell, **options)
        self.model = model
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = optimizer_factory(self.named_trainable)

    def loss_multiplier(self, micro_batches: int) -> float:
        return float(self.world_size)  # the reduce-scatter averages gradients over ranks

    def forward_backward(self, window, autocast) -> None:
        def gradient_sync(is_last: bool):  # reduce-scatter at the last micro-batch only
            self.module.set_requires_gradient_sync(is_last)
            return contextlib.nullcontext()

        window.backward(self.module, self.device, autocast, self.named_trainable, gradient_sync)

    def apply(self, clip: float, scaler) -> float:
        params = [p for _, p in self.named_trainable]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(_full(norm))

    def eval_forward(self, batch: Batch):
        return self.module(**batch.model_inputs(self.device))

    def gather_state(self, step: int) -> dict[str, Any]:
        optimizer = named_optimizer_state(self.optimizer)
        optimizer["state"] = {name: {k: _full(v) if torch.is_tensor(v) else v for k, v in state.items()}
                              for name, state in optimizer["state"].items()}
        return {"model": {n: _full(p) for n, p in self.named_trainable}, "optimizer": optimizer}

    @torch.no_grad()
    def load_state(self, state: dict[str, Any]) -> None:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = dict(self.named_trainable)

        def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
            full = full.to(device=self.device, dtype=param.dtype)
            if isinstance(param, DTensor) and full.shape == param.shape:
                return distribute_tensor(full, param.device_mesh, param.placements)
            return full

        for name, tensor in state["model"].items():
            params[name].copy_(shard_like(params[name], tensor))
        saved = dict(state["optimizer"])
        saved["state"] = {name: {k: shard_like(params[name], v) if torch.is_tensor(v) and v.dim() else v
                                 for k, v in moments.items()} for name, moments in saved["state"].items()}
        load_named_optimizer_state(self.optimizer, saved)


class FSDPBackend(BackendBase):
    """PyTorch FSDP2 data parallel (torchrun); one process without a launcher."""

    name = "fsdp"

    def __init__(self, cfg: FSDPConfig, device_preference: str = "auto") -> None:
        super().__init__(device_preference)
        self.cfg = cfg

    def state_shards(self) -> tuple[int, int, int]:
        return self.world_size, self.world_size, self.world_size

    def setup(self) -> None:
        import os

        import torch.distributed as dist

        self._read_launch()
        self.device = pick_device(self.device_preference, self.local_rank)
        if "LOCAL_RANK" not in os.environ:  # FSDP needs a process group, also of one
            from mllmkit.train.dist import free_port

            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(free_port())})
        backend = self.cfg.backend if self.cfg.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=self.cfg.timeout_s),
                                **({"device_id": self.device} if self.device.type == "cuda" else {}))
        self._group = True

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> Engine:
        return Engine(model, self, FSDPRunner(model, self, optimizer_factory, train), lr_schedule, train)


SPECS = [ComponentSpec("fsdp", FSDPConfig, lambda cfg, ctx: FSDPBackend(cfg, device_preference(ctx)),
                       "PyTorch FSDP2 (fully_shard) over the trainable parts: full fine-tuning (torchrun)")]
