"""What every DeepSpeed backend shares (``zero`` in the core, ``pipeline`` in its plugin).

- :func:`import_deepspeed`: DeepSpeed is optional (the ``mllmkit[deepspeed]`` extra); without it a
  clear error names the extra. The accelerator: CUDA when there is one, otherwise
  ``DS_ACCELERATOR=cpu`` (gloo), set before DeepSpeed is imported.
- :class:`DeepSpeedBackend`: process-group start-up through ``deepspeed.init_distributed`` with a
  timeout (a dead rank makes the others raise instead of hang); without a launcher, a group of one on
  127.0.0.1. DeepSpeed processes sometimes abort at interpreter teardown after the work is done
  (``terminate called without an active exception``): under a launcher, :meth:`DeepSpeedBackend.shutdown`
  destroys the group and ends the process with ``os._exit`` and the right code (0, 2 for a user error,
  1 otherwise) once Python has printed its output.
- Config pieces (:func:`batch_config`, :func:`merge_config`) and the optimizer state by parameter name
  (:func:`gather_named_state`, :func:`load_named_state`) at any ZeRO stage, so DeepSpeed checkpoints
  move to and from every other backend.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mllmkit.errors import UserError
from mllmkit.train.dist import BackendBase, free_port, pick_device
from mllmkit.train.engine import named_optimizer_state

__all__ = ["DeepSpeedBackend", "batch_config", "gather_named_state", "import_deepspeed", "load_named_state",
           "merge_config", "relink_zero_state"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def import_deepspeed(backend: str):
    """The ``deepspeed`` module, or a user error naming the extra that installs it."""
    try:
        import deepspeed
    except ImportError as exc:
        raise UserError(f"parallel.type = '{backend}' needs DeepSpeed, which is not installed: "
                        f"pip install 'mllmkit[deepspeed]' ({exc})") from None
    return deepspeed


def batch_config(train, dp_world: int) -> dict[str, Any]:
    """Batch entries of a DeepSpeed config: the recipe's micro batch and accumulation."""
    return {"train_micro_batch_size_per_gpu": train.micro_batch_size,
            "gradient_accumulation_steps": train.grad_accum,
            "train_batch_size": train.micro_batch_size * train.grad_accum * dp_world,
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def merge_config(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` (a recipe's raw DeepSpeed entries) merged into ``base``, tables recursively."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = merge_config(dict(base[key]), value)
        else:
            base[key] = value
    return base


class DeepSpeedBackend(BackendBase):
    """Process group, device and collectives of a DeepSpeed job (torchrun or the deepspeed launcher).

    ``cfg`` needs ``timeout_s``."""

    name = "deepspeed"

    def __init__(self, cfg, device_preference: str = "auto") -> None:
        super().__init__(device_preference)
        self.cfg = cfg
        self._launched = False

    def setup(self) -> None:
        use_cuda = self.device_preference == "cuda" or (self.device_preference == "auto" and torch.cuda.is_available())
        if use_cuda and not torch.cuda.is_available():
            raise UserError("train.device = 'cuda' but no CUDA device is available; set train.device = 'auto'")
        if not use_cuda:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        deepspeed = import_deepspeed(self.name)
        self._launched = "LOCAL_RANK" in os.environ
        if not self._launched:  # one process without a launcher: a group of one
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(free_port()))
        self._read_launch()
        if use_cuda:
            self.device = pick_device("cuda", self.local_rank)
        deepspeed.init_distributed(auto_mpi_discovery=False, verbose=False,
                                   timeout=datetime.timedelta(seconds=self.cfg.timeout_s))
        self._group = True

    def shutdown(self) -> None:
        if not self._group:
            return
        error = sys.exc_info()[1]
        if error is not None and self.global_world > 1:
            print(f"mllmkit: rank {self.global_rank} stops: {type(error).__name__}: {error}", file=sys.stderr,
                  flush=True)
        super().shutdown()
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


# -- optimizer state by parameter name, at any ZeRO stage --
def relink_zero_state(ds_optimizer) -> None:
    """ZeRO-1/2 link each parameter to its slice of the flat AdamW state once, after the first
    step; a group whose state appeared later stays unlinked, and before the first step there is no
    state at all. Create missing state (zeros, step 0) and link again before reading or writing."""
    if not hasattr(ds_optimizer, "_lazy_init_hp_params_optimizer_state"):
        return
    inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
    for group in inner.param_groups:
        for flat in group["params"]:
            if flat not in inner.state:
                inner.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                     "exp_avg_sq": torch.zeros_like(flat)}
    ds_optimizer._hp_optimizer_states_linked = False
    ds_optimizer._lazy_init_hp_params_optimizer_state()


def gather_named_state(optimizer, named: Sequence[tuple[str, nn.Parameter]], zero_stage: int,
                       step: int) -> dict[str, Any]:
    """Full fp32 tensors and AdamW moments of ``named`` by name (a collective at ZeRO ≥ 1: call on every
    rank of the group). Groups keep their ``names`` (lists of the parameters of this process)."""
    if zero_stage == 0:  # DeepSpeed keeps the client optimizer: plain tensors
        return {"model": {n: p.detach().cpu().clone() for n, p in named},
                "optimizer": named_optimizer_state(optimizer)}
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    relink_zero_state(optimizer)
    model, state = {}, {}
    step_tensor = torch.tensor(float(step))
    for name, param in named:
        shape = param.ds_shape if zero_stage == 3 else param.shape
        model[name] = safe_get_full_fp32_param(param).detach().cpu().clone().reshape(shape)
        entry = {k: v.detach().cpu().clone().reshape(shape) for k in _MOMENTS
                 if (v := safe_get_full_optimizer_state(param, k)) is not None}
        if entry:
            state[name] = {"step": step_tensor.clone(), **entry}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return {"model": model, "optimizer": {"state": state, "param_groups": groups}}


def load_named_state(optimizer, named: Sequence[tuple[str, nn.Parameter]], state: dict[str, Any], zero_stage: int,
                     device: torch.device) -> None:
    """Put ``named``'s tensors and AdamW moments back from a full state by name (any backend's)."""
    saved = state["optimizer"]["state"]
    if zero_stage == 0:  # the client optimizer, keyed by the parameters themselves
        with torch.no_grad():
            for name, param in named:
                param.copy_(state["model"][name])
                if name in saved:
                    optimizer.state[param] = {k: (v.to(device) if k != "step" else v.clone())
                                              for k, v in saved[name].items()}
        return
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    relink_zero_state(optimizer)
    for name, param in named:
        value = state["model"][name].to(device).float()
        safe_set_full_fp32_param(param, value)  # the optimizer's fp32 partition ...
        gathered = deepspeed.zero.GatheredParameters([param], modifier_rank=0) if zero_stage == 3 \
            else contextlib.nullcontext()
        with gathered, torch.no_grad():  # ... and the weights the forward uses
            param.data.copy_(value)
        for key in _MOMENTS:
            if name in saved and key in saved[name]:
                safe_set_full_optimizer_state(param, saved[name][key].to(device).float(), key)
    steps = [s["step"] for s in saved.values() if "step" in s]
    if steps:
        inner = getattr(optimizer, "optimizer", optimizer)
        for entry in inner.state.values():
            if "step" in entry:
                entry["step"] = steps[0].clone().to(entry["step"].device) if torch.is_tensor(entry["step"]) \
                    else int(steps[0])
