"""The ``zero`` backend: DeepSpeed ZeRO stage 0–3 data parallel over the MLLM's trainable parts.

What DeepSpeed wraps: a shell module whose registered children are only the MLLM parts that hold
trainable parameters (e.g. the ``linear`` bridge); its forward runs the whole MLLM. The frozen
vision tower, Q-Former and LLM stay plain tensors outside the engine, moved to the device once: they
are never cast, bucketed, broadcast, partitioned (ZeRO-3) or given optimizer state. Under ZeRO-3 only
the trainable parts are partitioned; their forward hooks gather them when the MLLM calls them.

Semantics equal the torch engine's: the client AdamW from the recipe (no decay on 1-D parameters;
with ``offload_optimizer = "cpu"`` DeepSpeedCPUAdam with the same groups and hyper-parameters), the
schedule's learning rate set on every step, autocast to ``train.precision`` around the forward with
fp32 trainable weights, token-weighted loss over the whole step (each micro-batch's summed loss
divided by the step's labelled tokens over all ranks, DeepSpeed's own 1/GA scaling off), clipping
by DeepSpeed at ``train.grad_clip``. ``state_dict`` gathers full fp32 tensors and AdamW moments by
parameter name, so checkpoints move between ``zero`` stages and the other backends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mllmkit.data.collate import Batch
from mllmkit.train.engine import micro_batch_loss
from mllmkit.train.optim import param_groups, set_lr
from mllmkit_parallel_deepspeed.configs import ZeroConfig
from mllmkit_parallel_deepspeed.runtime import DeepSpeedBackendBase, count_window, dp_batch_config

__all__ = ["TrainableShell", "ZeroBackend", "ZeroEngine", "relink_zero_state", "zero_ds_config"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def zero_ds_config(cfg: ZeroConfig, train, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a ``zero`` run (fp32 trainable weights; autocast is ours)."""
    zero: dict[str, Any] = {"stage": cfg.stage, "overlap_comm": cfg.overlap_comm,
                            "contiguous_gradients": cfg.contiguous_gradients,
                            "reduce_bucket_size": cfg.reduce_bucket_size}
    if cfg.stage in (1, 2):
        zero["allgather_bucket_size"] = cfg.allgather_bucket_size
    if cfg.stage == 3:
        zero["sub_group_size"] = cfg.sub_group_size
    out: dict[str, Any] = {**dp_batch_config(train, world), "gradient_clipping": float(train.grad_clip),
                           "zero_optimization": zero, "zero_allow_untested_optimizer": True}
    if cfg.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
        out["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "betas": list(train.betas), "eps": train.eps,
                                                        "weight_decay": train.weight_decay}}
    return _merge(out, cfg.extra)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = _merge(dict(base[key]), value)
        else:
            base[key] = value
    return base


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


class TrainableShell(nn.Module):
    """What DeepSpeed wraps: only the MLLM parts holding trainable parameters; forward = the MLLM's loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleDict({name.replace(".", "_"): part for name, part in model.parts()
                                    if any(p.requires_grad for p in part.parameters())})
        object.__setattr__(self, "mllm", model)  # not a child: frozen parts stay outside DeepSpeed

    def forward(self, **inputs):
        out = self.mllm(**inputs)
        return out.loss_sum, out.num_tokens


class ZeroBackend(DeepSpeedBackendBase):
    """DeepSpeed ZeRO data parallel (torchrun or the deepspeed launcher)."""

    name = "zero"

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> ZeroEngine:
        return ZeroEngine(model, self, optimizer_factory, lr_schedule, train)


class ZeroEngine:
    """One optimizer step per :meth:`train_step` through a DeepSpeed ZeRO engine."""

    def __init__(self, model: nn.Module, backend: ZeroBackend, optimizer_factory, lr_schedule, train) -> None:
        import deepspeed

        self.model, self.backend, self.settings, self.lr_schedule = model, backend, train, lr_schedule
        self.device = backend.device
        self.stage = backend.cfg.stage
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_trainable:
            from mllmkit.errors import UserError

            raise UserError("zero: the model has no trainable parameter; mark a part trainable in the recipe")
        for _, param in self.named_trainable:  # fp32 master weights = the trainable weights themselves
            param.data = param.data.float()
        model.to(self.device)
        config = zero_ds_config(backend.cfg, train, backend.world_size)
        shell = TrainableShell(model)
        if backend.cfg.offload_optimizer == "cpu":
            engine, optimizer, _, _ = deepspeed.initialize(
                model=shell, config=config,
                model_parameters=param_groups(self.named_trainable, train.weight_decay, train.lr_scale))
        else:
            engine, optimizer, _, _ = deepspeed.initialize(model=shell, optimizer=optimizer_factory(self.named_trainable),
                                                           config=config)
        self.engine, self.optimizer = engine, optimizer
        self.step = 0
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)


    # -- one optimizer step --
    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"zero: got {len(micro_batches)} micro-batches, DeepSpeed was configured for "
                             f"{self.engine.gradient_accumulation_steps()} (train.grad_accum)")
        lr = self.lr_schedule(self.step)
        set_lr(self.optimizer, lr)
        world = self.backend.world_size
        global_tokens, global_samples, global_nonempty = self.backend.all_reduce(count_window(micro_batches)).tolist()
        loss_sum = torch.zeros((), dtype=torch.float64)
        sample_means = torch.zeros((), dtype=torch.float64)
        self.engine.train()
        self.model.train()
        for batch in micro_batches:
            if batch.size == 0:  # every sample skipped: still join the gradient reduction
                scaled = sum(p.sum() * 0.0 for _, p in self.named_trainable)
            else:
                with self._autocast():
                    total, tokens = self.engine(**batch.model_inputs(self.device))
                loss_sum += total.detach().double().cpu()
                scaled, mean = micro_batch_loss(total, tokens, self.settings.loss_reduction, world,
                                                global_tokens, global_nonempty)
                sample_means += mean
            self.engine.backward(scaled.float(), scale_wrt_gas=False)
            self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.step += 1
        sums = self.backend.all_reduce(torch.stack([loss_sum, sample_means]))
        if self.settings.loss_reduction == "token":
            loss = float(sums[0]) / max(global_tokens, 1.0)
        else:
            loss = float(sums[1]) / max(global_nonempty, 1.0)
        return {"loss": loss, "lr": lr, "grad_norm": float(norm) if norm is not None else float("nan"),
                "tokens": global_tokens, "samples": global_samples}

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        if batch.size == 0:
            return 0.0, 0
        self.engine.eval()
        self.model.eval()
        with self._autocast():
            total, tokens = self.engine(**batch.model_inputs(self.device))
        return float(total), int(tokens)

    # -- state by parameter name --
    def _inner_state(self) -> dict:
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        return inner.state

    def _relink_optimizer_state(self) -> None:
        relink_zero_state(self.optimizer)

    def state_dict(self) -> dict[str, Any]:
        """Full fp32 tensors and AdamW moments by MLLM name (a collective: call on every rank)."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        self._relink_optimizer_state()

        model, state = {}, {}
        step_tensor = torch.tensor(float(self.step))
        for name, param in self.named_trainable:
            if self.stage == 0:
                model[name] = param.detach().cpu().clone()
                moments = self.optimizer.state.get(param, {})
                entry = {k: moments[k].detach().cpu().clone() for k in _MOMENTS if k in moments}
            else:
                model[name] = safe_get_full_fp32_param(param).detach().cpu().clone()
                entry = {}
                for key in _MOMENTS:
                    value = safe_get_full_optimizer_state(param, key)
                    if value is not None:
                        entry[key] = value.detach().cpu().clone().reshape(param.ds_shape if self.stage == 3
                                                                          else param.shape)
            if entry:
                state[name] = {"step": step_tensor.clone(), **entry}
        groups = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.backend.cfg.offload_optimizer == "cpu":  # DeepSpeed built the groups: put the names back
            built = param_groups(self.named_trainable, self.settings.weight_decay, self.settings.lr_scale)
            for group, source in zip(groups, built):
                group["names"] = source["names"]
        return {"model": model, "optimizer": {"state": state, "param_groups": groups}, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        params = dict(self.named_trainable)
        missing = sorted(set(params) - set(state["model"]))
        unexpected = sorted(set(state["model"]) - set(params))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this model's trainable parameters: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        saved_state = state["optimizer"]["state"]
        if self.stage == 0:
            with torch.no_grad():
                for name, tensor in state["model"].items():
                    params[name].copy_(tensor)
            for name, param in params.items():
                if name in saved_state:
                    self.optimizer.state[param] = {k: (v.to(self.device) if k != "step" else v.clone())
                                                   for k, v in saved_state[name].items()}
        else:
            self._relink_optimizer_state()
            import deepspeed

            for name, tensor in state["model"].items():
                value = tensor.to(self.device).float()
                safe_set_full_fp32_param(params[name], value)  # the optimizer's fp32 partition ...
                if self.stage == 3:  # ... and the weights the forward uses
                    with deepspeed.zero.GatheredParameters([params[name]], modifier_rank=0), torch.no_grad():
                        params[name].data.copy_(value)
                else:
                    with torch.no_grad():
                        params[name].data.copy_(value)
            for name, param in params.items():
                for key in _MOMENTS:
                    if name in saved_state and key in saved_state[name]:
                        safe_set_full_optimizer_state(param, saved_state[name][key].to(self.device).float(), key)
            steps = [s["step"] for s in saved_state.values() if "step" in s]
            if steps:
                for inner in self._inner_state().values():
                    if "step" in inner:
                        inner["step"] = steps[0].clone().to(inner["step"].device) \
                            if torch.is_tensor(inner["step"]) else int(steps[0])
        for mine, theirs in zip(self.optimizer.param_groups, state["optimizer"]["param_groups"]):
            for key in ("betas", "eps", "weight_decay"):
                if key in theirs:
                    mine[key] = theirs[key]
        self.step = int(state["step"])
