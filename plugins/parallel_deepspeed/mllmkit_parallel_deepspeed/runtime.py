"""What both DeepSpeed backends share: process-group start-up, collectives, a clean (hard) exit.

- The accelerator: CUDA when there is one; otherwise ``DS_ACCELERATOR=cpu`` (gloo).
- Launch: torchrun's or the ``deepspeed`` launcher's environment; without one, a one-process group
  on 127.0.0.1. Collectives wait at most ``timeout_s``: when a rank dies the others raise (and the
  launcher stops the job) instead of hanging.
- Exit: DeepSpeed processes sometimes abort at interpreter teardown after the work is done
  (``terminate called without an active exception``). Under a launcher, :meth:`DeepSpeedBackendBase.shutdown`
  destroys the process group and registers an exit handler that ends the process with
  ``os._exit`` and the right code (0, 2 for a user error, 1 otherwise) once Python has printed its
  output.
"""

from __future__ import annotations

import atexit
import datetime
import io
import os
import socket
import sys
from typing import Any

import torch

from mllmkit.builtin.backends import pick_device
from mllmkit.errors import UserError

__all__ = ["DeepSpeedBackendBase", "count_window", "dp_batch_config", "launch_world_size", "prepare_accelerator"]


def prepare_accelerator(preference: str) -> str:
    """``cuda`` or ``cpu`` for this run; sets ``DS_ACCELERATOR=cpu`` before DeepSpeed is imported."""
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("train.device = 'cuda' but no CUDA device is available; set train.device = 'auto'")
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    return "cuda" if use_cuda else "cpu"


def launch_world_size() -> int:
    """Processes in this job as the launcher's environment says (1 without a launcher), readable
    before the process group starts."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "LOCAL_RANK" in os.environ else 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dp_batch_config(train, dp_world: int) -> dict[str, Any]:
    """Batch entries of a DeepSpeed config: the recipe's micro batch and accumulation."""
    return {"train_micro_batch_size_per_gpu": train.micro_batch_size,
            "gradient_accumulation_steps": train.grad_accum,
            "train_batch_size": train.micro_batch_size * train.grad_accum * dp_world,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def count_window(micro_batches) -> torch.Tensor:
    """This rank's labelled tokens, samples and non-empty micro-batches of one optimizer step."""
    return torch.tensor([sum(b.num_tokens for b in micro_batches), sum(b.size for b in micro_batches),
                         sum(1 for b in micro_batches if b.size)], dtype=torch.float64)


class DeepSpeedBackendBase:
    """Process group, device and collectives over all processes of the job."""

    name = "deepspeed"

    def __init__(self, cfg, device_preference: str = "auto") -> None:
        self.cfg = cfg
        self.device_preference = device_preference
        self.device = torch.device("cpu")
        self.global_rank, self.global_world, self.local_rank = 0, 1, 0
        self.rank, self.world_size = 0, 1  # the data-parallel view (what the loop splits data by)
        self._group = False
        self._launched = False

    @property
    def is_main(self) -> bool:
        return self.global_rank == 0

    def setup(self) -> None:
        kind = prepare_accelerator(self.device_preference)
        self._launched = "LOCAL_RANK" in os.environ
        if not self._launched:  # one process without a launcher: a group of one
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        self.global_rank = int(os.environ["RANK"])
        self.global_world = int(os.environ["WORLD_SIZE"])
        self.local_rank = int(os.environ["LOCAL_RANK"])
        if kind == "cuda":
            self.device = pick_device("cuda", self.local_rank)
        import deepspeed

        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=self.cfg.timeout_s))
        self._group = True
        self.rank, self.world_size = self.global_rank, self.global_world

    # -- collectives over every process --
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over all processes (a new tensor on the CPU)."""
        if not self._group or self.global_world == 1:
            return tensor.detach().clone()
        import torch.distributed as dist

        work = tensor.detach().clone().to(self.device if self.device.type == "cuda" else "cpu")
        dist.all_reduce(work)
        return work.cpu()

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self._group or self.global_world == 1:
            return [obj]
        import torch.distributed as dist

        # tensors inside objects travel as torch.save bytes: pickling them directly breaks once
        # DeepSpeed is imported (legacy storages without a dtype on the receiving side)
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        out: list[Any] = [None] * self.global_world
        dist.all_gather_object(out, buffer.getvalue())
        return [torch.load(io.BytesIO(b), weights_only=False) for b in out]  # our own processes' objects

    def barrier(self) -> None:
        if self._group and self.global_world > 1:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        if not self._group:
            return
        error = sys.exc_info()[1]
        import torch.distributed as dist

        if error is not None and self.global_world > 1:
            print(f"mllmkit: rank {self.global_rank} stops: {type(error).__name__}: {error}", file=sys.stderr,
                  flush=True)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        finally:
            self._group = False
        if self._launched:
            code = 0 if error is None else (2 if isinstance(error, UserError) else 1)
            atexit.register(_hard_exit, code)


def _hard_exit(code: int) -> None:
    """Last exit handler: flush and leave before DeepSpeed's threads can abort the teardown."""
    if sys.exc_info()[0] is None and code == 0 and getattr(sys, "last_value", None) is not None:
        code = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed stream must not block the exit
            continue
    os._exit(code)
