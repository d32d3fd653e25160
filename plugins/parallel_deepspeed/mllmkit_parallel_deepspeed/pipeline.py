"""The ``pipeline`` backend: DeepSpeed pipeline parallel, ``num_stages`` stages × data parallel.

The world splits as DeepSpeed's pipe-data topology does: global rank = stage × DP + dp_rank, DP =
world / num_stages (refused at setup when it does not divide). The loop sees the data-parallel view
(``rank``/``world_size`` = dp rank / DP size: every stage of a pipeline reads the same batches);
``is_main`` is global rank 0.

Model: with ``meta_init`` (default) the backend assembles the recipe with every parameter on the
meta device (:func:`mllmkit.weights.meta_parameters`; weights read from files stay real); after partitioning
only this rank's layers are materialised (random-weight parts initialised on the device; parts a
builder loaded from files are kept) and every other stage's tensors are released to meta. Without
it the model is built normally (same seed on every rank) and the other stages are released.

Training: DeepSpeed's 1F1B schedule over ``train.grad_accum`` micro-batches; autocast to
``train.precision`` around it with fp32 trainable weights (no DeepSpeed bf16 optimizer, so frozen
weights never get an fp32 master copy, and a stage without trainable parameters just gets an
AdamW with empty groups — no dummy layer). DeepSpeed's own clipping is off (it fails on a frozen
stage); the client AdamW clips with the gradient norm reduced over the pipeline (and, at ZeRO-1,
the data-parallel) group. The loss is token-weighted over the whole step, as in the torch engine.
``state_dict`` gathers every stage's trainable tensors and AdamW state by MLLM name.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mllmkit.data.collate import Batch
from mllmkit.errors import UserError
from mllmkit.model import labelled_rows
from mllmkit.train.engine import named_optimizer_state
from mllmkit.train.optim import set_lr
from mllmkit.weights import meta_parameters
from mllmkit_parallel_deepspeed.configs import PipelineConfig
from mllmkit_parallel_deepspeed.known_shapes import KnownShapeTransfers
from mllmkit_parallel_deepspeed.partition import Plan, format_plan, layer_costs, plan_partition
from mllmkit_parallel_deepspeed.pipe_layers import (
    LabelledLoss,
    materialize_layers,
    pipeline_layers,
    release_layers,
)
from mllmkit_parallel_deepspeed.runtime import (
    DeepSpeedBackendBase,
    count_window,
    dp_batch_config,
    launch_world_size,
)
from mllmkit_parallel_deepspeed.zero import _merge, relink_zero_state

__all__ = ["PipelineBackend", "PipelineEngine", "pipeline_ds_config", "plan_for"]

_MOMENTS = ("exp_avg", "exp_avg_sq")


def pipeline_ds_config(cfg: PipelineConfig, train, dp_world: int) -> dict[str, Any]:
    out = {**dp_batch_config(train, dp_world), "gradient_clipping": 0.0,
           "zero_optimization": {"stage": cfg.zero_stage}, "zero_allow_untested_optimizer": True}
    return _merge(out, cfg.extra)


def plan_for(model: nn.Module, cfg: PipelineConfig, train) -> Plan:
    """The partition of ``model`` for this config (cost model or ``stage_map``)."""
    costs = layer_costs(model, seq_len=cfg.plan_seq_len or train.max_text_len + model.tokens_per_image,
                        images=cfg.images_per_sample,
                        checkpointing=cfg.activation_checkpointing or train.gradient_checkpointing)
    return plan_partition(costs, cfg.num_stages, cfg.stage_map)


class PipelineBackend(DeepSpeedBackendBase):
    """DeepSpeed pipeline parallel (torchrun or the deepspeed launcher)."""

    name = "pipeline"

    def __init__(self, cfg: PipelineConfig, device_preference: str = "auto", recipe=None) -> None:
        super().__init__(cfg, device_preference)
        self.recipe = recipe
        self.stage, self.num_stages = 0, cfg.num_stages

    def setup(self) -> None:
        world = launch_world_size()
        if world % self.cfg.num_stages:  # before DeepSpeed starts (its first start builds ops for minutes)
            raise UserError(f"parallel.num_stages = {self.cfg.num_stages} does not divide the {world} "
                            f"processes of this launch; launch a multiple of {self.cfg.num_stages} processes "
                            f"(--nproc-per-node), or change num_stages")
        super().setup()
        dp = self.global_world // self.cfg.num_stages
        self.stage, dp_rank = divmod(self.global_rank, dp)  # DeepSpeed's pipe-data topology
        self.rank, self.world_size = dp_rank, dp

    def assemble(self, recipe):
        """Build the recipe's model; with ``meta_init`` every parameter starts on the meta device."""
        from mllmkit.assemble import assemble

        if not self.cfg.meta_init:
            return assemble(recipe)
        with meta_parameters():
            return assemble(recipe)

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> PipelineEngine:
        return PipelineEngine(model, self, optimizer_factory, lr_schedule, train)


class PipelineEngine:
    """One optimizer step per :meth:`train_step` through DeepSpeed's ``PipelineEngine``."""

    def __init__(self, model: nn.Module, backend: PipelineBackend, optimizer_factory, lr_schedule, train) -> None:
        import deepspeed
        from deepspeed.pipe import PipelineModule

        cfg: PipelineConfig = backend.cfg
        self.model, self.backend, self.settings, self.lr_schedule = model, backend, train, lr_schedule
        self.device = backend.device
        layers = pipeline_layers(model, cfg.activation_checkpointing or train.gradient_checkpointing)
        self.plan = plan_for(model, cfg, train)
        if backend.is_main:
            print(format_plan(self.plan), file=sys.stderr, flush=True)
        start, stop = self.plan.parts[backend.stage], self.plan.parts[backend.stage + 1]
        local = layers[start:stop]
        release_layers(layers[:start] + layers[stop:], keep=local)
        materialize_layers(local, self.device, seed=train.seed + backend.stage)
        for layer in local:  # trainable weights in fp32 (the optimizer steps them directly)
            for param in layer.parameters():
                if param.requires_grad:
                    param.data = param.data.float()
        self.local_layers = local
        local_ids = {id(p) for layer in local for p in layer.parameters()}
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in local_ids]
        if cfg.zero_stage == 1 and not self.named_trainable:
            raise UserError(f"parallel.zero_stage = 1 needs a trainable parameter on every stage, but stage "
                            f"{backend.stage} has none; use zero_stage = 0 (frozen stages work there)")
        self.loss = LabelledLoss(layers[-1])
        self.loss.reduction = train.loss_reduction

        class _Planned(PipelineModule):
            def _partition_layers(inner, method="uniform"):
                inner.parts = list(self.plan.parts)
                stage = inner._topo.get_coord(inner.global_rank).pipe
                inner._set_bounds(start=inner.parts[stage], stop=inner.parts[stage + 1])

            def train(inner, mode: bool = True):
                super().train(mode)
                model.train(mode)
                return inner

        module = _Planned(layers=layers, num_stages=cfg.num_stages, loss_fn=self.loss, partition_method="uniform",
                          activation_checkpoint_interval=0, dynamic_shape=True)
        optimizer = optimizer_factory(self.named_trainable)
        self.grad_norm = float("nan")
        config = pipeline_ds_config(cfg, train, backend.world_size)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        self.engine, self.optimizer = engine, ds_optimizer
        self.transfers = KnownShapeTransfers(engine, model.llm.hf_model.config.hidden_size)
        inner = getattr(ds_optimizer, "optimizer", ds_optimizer)
        self._clip_group = engine.grid.get_pipe_parallel_group() if cfg.zero_stage == 0 else None
        original_step = inner.step
        clip = train.grad_clip

        def clipped_step(*args, **kwargs):
            params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
            self.grad_norm = self._global_norm(params)
            if clip > 0 and math.isfinite(self.grad_norm) and self.grad_norm > clip:
                scale = clip / (self.grad_norm + 1e-6)
                for p in params:
                    p.grad.mul_(scale)
            return original_step(*args, **kwargs)

        inner.step = clipped_step
        self.step = 0
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)

    def _global_norm(self, params: list[torch.Tensor]) -> float:
        import torch.distributed as dist

        local = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            local += p.grad.detach().double().pow(2).sum()
        if self.backend.global_world > 1:
            dist.all_reduce(local, group=self._clip_group)  # None = every rank (ZeRO-1 partitions)
        return float(local.sqrt())

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _items(self, micro_batches: Sequence[Batch]) -> list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]:
        """DeepSpeed's ``(inputs, labels)`` per micro-batch, prepared on the host and staged on the device.

        The placeholder check and the labelled rows are computed here from the host tensors, and every
        tensor is copied to the GPU from pinned memory without waiting: DeepSpeed's own per-micro-batch
        ``.to(device)`` of a host tensor (and a count or a boolean gather on the GPU) would make the
        host wait for the stage's queue to drain, so it could not launch ahead during transfers.
        """
        items = []
        for b in micro_batches:
            pixels = b.pixels if b.pixels is not None else torch.zeros(0, 3, 1, 1)
            self.model.check_image_tokens(b.input_ids, pixels.shape[0])
            rows, targets = labelled_rows(b.labels)
            items.append(((b.input_ids, b.attention_mask, pixels), (rows, targets)))
        if self.device.type != "cuda":
            return items
        return [tuple(tuple(t.pin_memory().to(self.device, non_blocking=True) for t in part) for part in item)
                for item in items]

    # -- one optimizer step --
    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"pipeline: got {len(micro_batches)} micro-batches, DeepSpeed was configured for "
                             f"{self.engine.gradient_accumulation_steps()} (train.grad_accum)")
        if any(b.size == 0 for b in micro_batches):
            raise UserError("pipeline: a micro-batch lost every sample to data errors; the pipeline schedule "
                            "cannot run an empty micro-batch. Fix or drop the bad records (see skipped.jsonl)")
        lr = self.lr_schedule(self.step)
        set_lr(self.optimizer, lr)
        counts = self.backend.all_reduce(count_window(micro_batches)) / self.backend.num_stages
        global_tokens, global_samples, global_nonempty = counts.tolist()
        ga, dp = len(micro_batches), self.backend.world_size
        denominator = global_tokens if self.settings.loss_reduction == "token" else global_nonempty
        self.loss.scale = ga * dp / max(denominator, 1.0)
        self.engine.train()
        self.model.train()
        self.transfers.expect(tuple(b.input_ids.shape) for b in micro_batches)
        with self._autocast():
            loss = self.engine.train_batch(data_iter=iter(self._items(micro_batches)))
        self.step += 1
        return {"loss": float(loss), "lr": lr, "grad_norm": self.grad_norm, "tokens": global_tokens,
                "samples": global_samples}

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> tuple[float, int]:
        """This pipeline's summed loss (averaged over data-parallel pipelines) and its token count."""
        if batch.size == 0:
            return 0.0, 0
        self.loss.scale = 1.0
        self.engine.eval()
        self.transfers.expect([tuple(batch.input_ids.shape)])
        with self._autocast():
            loss = self.engine.eval_batch(iter(self._items([batch])), num_micro_batches=1)
        return float(loss), batch.num_tokens

    # -- state by parameter name, gathered from every stage --
    def state_dict(self) -> dict[str, Any]:
        """A collective: call on every rank; every rank gets the whole state."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        zero = self.backend.cfg.zero_stage
        mine: dict[str, Any] = {"model": {}, "state": {}, "groups": []}
        if zero == 0:
            named = named_optimizer_state(self.optimizer)
            mine["state"] = {k: {n: v.cpu() for n, v in s.items()} for k, s in named["state"].items()}
            mine["groups"] = named["param_groups"]
            mine["model"] = {n: p.detach().cpu().clone() for n, p in self.named_trainable}
        else:
            relink_zero_state(self.optimizer)
            step = torch.tensor(float(self.step))
            for name, param in self.named_trainable:
                mine["model"][name] = safe_get_full_fp32_param(param).cpu().clone()
                entry = {k: v.cpu().clone() for k in _MOMENTS
                         if (v := safe_get_full_optimizer_state(param, k)) is not None}
                if entry:
                    mine["state"][name] = {"step": step.clone(), **entry}
            mine["groups"] = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        if self.backend.rank != 0:  # one copy per stage
            mine = {"model": {}, "state": {}, "groups": []}
        model, state, groups = {}, {}, []
        for theirs in self.backend.all_gather_object(mine):
            model.update(theirs["model"])
            state.update(theirs["state"])
            for i, group in enumerate(theirs["groups"]):
                if i == len(groups):
                    groups.append({**group, "names": list(group["names"])})
                else:
                    groups[i]["names"].extend(group["names"])
        return {"model": model, "optimizer": {"state": state, "param_groups": groups}, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take this stage's tensors (by name) from a full state of any backend."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        all_trainable = {n for n, p in self.model.named_parameters() if p.requires_grad}
        missing = sorted(all_trainable - set(state["model"]))
        unexpected = sorted(set(state["model"]) - all_trainable)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match this model's trainable parameters: missing "
                             f"{missing[:5]}, unexpected {unexpected[:5]}")
        saved = state["optimizer"]["state"]
        zero = self.backend.cfg.zero_stage
        if zero == 1:
            relink_zero_state(self.optimizer)
        for name, param in self.named_trainable:
            if zero == 0:
                with torch.no_grad():
                    param.copy_(state["model"][name])
                if name in saved:
                    self.optimizer.state[param] = {k: (v.to(self.device) if k != "step" else v.clone())
                                                   for k, v in saved[name].items()}
            else:
                value = state["model"][name].to(self.device).float()
                safe_set_full_fp32_param(param, value)  # the optimizer's fp32 partition and the weights
                with torch.no_grad():
                    param.data.copy_(value)
                for key in _MOMENTS:
                    if name in saved and key in saved[name]:
                        safe_set_full_optimizer_state(param, saved[name][key].to(self.device).float(), key)
        for mine, theirs in zip(self.optimizer.param_groups, state["optimizer"]["param_groups"]):
            for key in ("betas", "eps", "weight_decay"):
                if key in theirs:
                    mine[key] = theirs[key]
        self.step = int(state["step"])
