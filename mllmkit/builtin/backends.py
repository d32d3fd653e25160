"""Built-in parallel backends: ``single`` (one process) and ``ddp`` (torch DistributedDataParallel).

``ddp`` reads torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), uses gloo on CPU and nccl on CUDA, and wraps the model so that only trainable
parameters are synchronised: frozen weights are never bucketed nor broadcast (every rank builds them
identically from the run's seed or the same files). A collective that waits longer than
``timeout_s`` (a rank died) raises instead of hanging; torchrun then stops the other ranks.
Without torchrun's environment ``ddp`` runs as one process.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from typing import Any, Literal

import attrs
import torch
from torch import nn

from mllmkit.config import config, positive
from mllmkit.errors import UserError
from mllmkit.interfaces import BuildContext
from mllmkit.registry import ComponentSpec
from mllmkit.train.engine import TorchEngine

__all__ = ["SPECS", "DDPBackend", "DDPConfig", "SingleBackend", "SingleConfig", "pick_device"]


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """``auto``: the local CUDA device when there is one, else the CPU."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise UserError("train.device = 'cuda' but no CUDA device is available; set train.device = 'auto'")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"this process is number {local_rank} on its node but only {torch.cuda.device_count()} "
                            f"GPU(s) are visible; launch at most one process per GPU (--nproc-per-node)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


class _Base:
    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, device_preference: str = "auto") -> None:
        self.device_preference = device_preference
        self.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks (a new tensor on the CPU)."""
        return tensor.clone()

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass

    def shutdown(self) -> None:
        pass


class SingleBackend(_Base):
    """One process on one device."""

    name = "single"

    def setup(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError("parallel.type = 'single' runs one process, but this was launched with "
                            f"WORLD_SIZE={os.environ['WORLD_SIZE']}; set parallel.type = 'ddp' "
                            "(--set parallel.type=ddp)")
        self.device = pick_device(self.device_preference)

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> TorchEngine:
        model.to(self.device)
        return TorchEngine(model, self, optimizer_factory, lr_schedule, train)


class DDPBackend(_Base):
    """torch DistributedDataParallel over the trainable parameters."""

    name = "ddp"

    def __init__(self, cfg: DDPConfig, device_preference: str = "auto") -> None:
        super().__init__(device_preference)
        self.cfg = cfg
        self._group = False

    def setup(self) -> None:
        import torch.distributed as dist

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = pick_device(self.device_preference, self.local_rank)
        if self.world_size == 1:
            return
        backend = self.cfg.backend if self.cfg.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=self.cfg.timeout_s),
                                **({"device_id": self.device} if self.device.type == "cuda" else {}))
        self._group = True

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> TorchEngine:
        model.to(self.device)
        return TorchEngine(model, self, optimizer_factory, lr_schedule, train,
                           wrap=self._wrap if self.world_size > 1 else None)

    def _wrap(self, module: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        buffers = [n for n, _ in module.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen + buffers)
        return DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=self.cfg.find_unused_parameters)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if not self._group:
            return tensor.clone()
        import torch.distributed as dist

        # the CPU tensor travels over gloo, or via the device over nccl
        work = tensor.detach().clone().to(self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(work)
        return work.cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._group:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        if self._group:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._group = False


def _device(ctx: BuildContext) -> str:
    return ctx.recipe.train.device if ctx.recipe is not None else "auto"


SPECS = [
    ComponentSpec("single", SingleConfig, lambda cfg, ctx: SingleBackend(_device(ctx)),
                  "one process on one device"),
    ComponentSpec("ddp", DDPConfig, lambda cfg, ctx: DDPBackend(cfg, _device(ctx)),
                  "torch DistributedDataParallel (torchrun; gloo on CPU, nccl on CUDA)"),
]
