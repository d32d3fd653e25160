"""Process groups for every parallel backend: the launcher's environment, the device, collectives.

:class:`BackendBase` is what every backend (``single``, ``ddp``, ``zero``, plugin ones) builds on: the
data-parallel view the loop splits data by (``rank``/``world_size``), the job's global view
(``global_rank``/``global_world``), the device, and collectives over all processes of the job. It
also holds the contract's defaults — one process per job, the model built by
:func:`mllmkit.assemble.assemble` — which a backend overrides by declaring otherwise. Launchers
(torchrun, the ``deepspeed`` launcher) are read through their environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
"""

from __future__ import annotations

import io
import os
import socket
from typing import Any

import torch

from mllmkit.errors import UserError

__all__ = ["BackendBase", "device_preference", "free_port", "launch_world_size", "pick_device"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_world_size() -> int:
    """Processes in this job as the launcher's environment says (1 without a launcher), readable
    before any process group starts."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "LOCAL_RANK" in os.environ else 1


def device_preference(context) -> str:
    """A backend builder's device choice from its :class:`~mllmkit.interfaces.BuildContext`: ``cpu``,
    ``cuda``, or ``auto`` (no device given: the local GPU when there is one)."""
    return context.device.type if context.device is not None else "auto"


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


class BackendBase:
    """A backend's process-group side and the contract's defaults (see
    :class:`mllmkit.interfaces.ParallelBackend`). Without a started group every collective is local."""

    name = "base"
    batch_replicas = 1
    """Processes that see the same batch (a pipeline's stages); the step's counts are divided by it."""

    def __init__(self, device_preference: str = "auto") -> None:
        self.device_preference = device_preference
        self.device = torch.device("cpu")
        self.rank, self.world_size = 0, 1  # the data-parallel view (what the loop splits data by)
        self.global_rank, self.global_world, self.local_rank = 0, 1, 0
        self._group = False

    # -- the contract's defaults --
    def processes_needed(self) -> int:
        """The fewest processes a job of this backend runs (``mllmkit run`` starts them itself)."""
        return 1

    def assemble(self, recipe):
        """Build the recipe's model for this backend's device (a backend may build it otherwise, e.g. on
        the meta device)."""
        from mllmkit.assemble import assemble

        return assemble(recipe, device=self.device)

    def state_shards(self) -> tuple[int, int, int]:
        """How many ways each process's share of the trainable (weights, gradients, optimizer state) is
        split (ZeRO-3/FSDP: all three by the data-parallel ranks); the memory estimate reads it."""
        return 1, 1, 1

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    def _read_launch(self) -> None:
        self.global_world = int(os.environ.get("WORLD_SIZE", "1"))
        self.global_rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.rank, self.world_size = self.global_rank, self.global_world

    # -- collectives over every process of the job --
    def _active(self) -> bool:
        return self._group and self.global_world > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over all processes (a new tensor on the CPU; over nccl it travels via the device)."""
        if not self._active():
            return tensor.detach().clone()
        import torch.distributed as dist

        work = tensor.detach().clone().to(self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(work)
        return work.cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """``obj`` from every process, in rank order. Tensors inside travel as ``torch.save`` bytes
        (pickling them directly breaks once DeepSpeed is imported)."""
        if not self._active():
            return [obj]
        import torch.distributed as dist

        buffer = io.BytesIO()
        torch.save(obj, buffer)
        out: list[Any] = [None] * self.global_world
        dist.all_gather_object(out, buffer.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=False) for b in out]  # our own processes' objects

    def barrier(self) -> None:
        if self._active():
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        if self._group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._group = False
