"""The ``zero`` backend: DeepSpeed ZeRO stage 0–3 data parallel over the MLLM's trainable parts.

What DeepSpeed wraps: a shell module whose registered children are only the MLLM parts that hold
trainable parameters (e.g. the ``linear`` bridge); its forward runs the whole MLLM. The frozen
vision tower, Q-Former and LLM stay plain tensors outside the engine, moved to the device once: they
are never cast, bucketed, broadcast, partitioned (ZeRO-3) or given optimizer state. Under ZeRO-3 only
the trainable parts are partitioned; their forward hooks gather them when the MLLM calls them.

The step is the core's (:class:`mllmkit.train.engine.Engine`): the client AdamW from the recipe (with
``offload_optimizer = "cpu"`` DeepSpeedCPUAdam with the same groups and hyper-parameters), fp32
trainable weights under the core's autocast, each micro-batch's share of the step's loss backpropagated
with DeepSpeed's own 1/GA scaling off; clipping by DeepSpeed at ``train.grad_clip``. DeepSpeed is
imported at setup only (the ``mllmkit[deepspeed]`` extra).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import attrs
from torch import nn

from mllmkit.config import ConfigValueError, config, positive
from mllmkit.data.collate import Batch
from mllmkit.errors import UserError
from mllmkit.interfaces import BuildContext
from mllmkit.registry import ComponentSpec
from mllmkit.train.deepspeed import (
    DeepSpeedBackend,
    batch_config,
    gather_named_state,
    import_deepspeed,
    load_named_state,
    merge_config,
)
from mllmkit.train.dist import device_preference
from mllmkit.train.engine import Engine
from mllmkit.train.optim import param_groups

__all__ = ["SPECS", "ZeroBackend", "ZeroConfig", "ZeroRunner", "zero_ds_config"]


def _stage(instance: Any, attribute: attrs.Attribute, value: int) -> None:
    if value not in (0, 1, 2, 3):
        raise ConfigValueError(attribute.name, f"expected one of 0, 1, 2, 3, found {value!r}")


@config
class ZeroConfig:
    """Options of ``zero`` (DeepSpeed ZeRO data parallel)."""

    stage: int = attrs.field(default=2, validator=_stage)
    """ZeRO stage: 0 plain DP, 1 shards optimizer state, 2 + gradients, 3 + trainable parameters."""
    offload_optimizer: Literal["none", "cpu"] = "none"
    """Keep optimizer state (and its step) on the CPU (DeepSpeedCPUAdam; stages 1–3)."""
    pin_memory: bool = True
    """Pinned host memory for the offloaded optimizer state."""
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = attrs.field(default=200_000_000, validator=positive)
    allgather_bucket_size: int = attrs.field(default=200_000_000, validator=positive)
    sub_group_size: int = attrs.field(default=1_000_000_000, validator=positive)
    timeout_s: int = attrs.field(default=600, validator=positive)
    """A collective waiting longer than this (a rank died) raises instead of hanging."""
    extra: dict = attrs.Factory(dict)
    """Raw DeepSpeed config entries merged last (expert use; e.g. {"wall_clock_breakdown": true})."""


def zero_ds_config(cfg: ZeroConfig, train, world: int) -> dict[str, Any]:
    """The DeepSpeed config of a ``zero`` run (fp32 trainable weights; autocast is the core's)."""
    zero: dict[str, Any] = {"stage": cfg.stage, "overlap_comm": cfg.overlap_comm,
                            "contiguous_gradients": cfg.contiguous_gradients,
                            "reduce_bucket_size": cfg.reduce_bucket_size}
    if cfg.stage in (1, 2):
        zero["allgather_bucket_size"] = cfg.allgather_bucket_size
    if cfg.stage == 3:
        zero["sub_group_size"] = cfg.sub_group_size
    out: dict[str, Any] = {**batch_config(train, world), "gradient_clipping": float(train.grad_clip),
                           "zero_optimization": zero, "zero_allow_untested_optimizer": True}
    if cfg.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.pin_memory}
        out["optimizer"] = {"type": "AdamW", "params": {"lr": train.lr, "betas": list(train.betas), "eps": train.eps,
                                                        "weight_decay": train.weight_decay}}
    return merge_config(out, cfg.extra)


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


class ZeroRunner:
    """Forward/backward and the step through a DeepSpeed ZeRO engine."""

    uses_grad_scaler = False

    def __init__(self, model: nn.Module, backend: ZeroBackend, optimizer_factory: Callable[..., Any], train) -> None:
        deepspeed = import_deepspeed("zero")
        self.device, self.stage, self.settings = backend.device, backend.cfg.stage, train
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.named_trainable:
            raise UserError("zero: the model has no trainable parameter; mark a part trainable in the recipe")
        for _, param in self.named_trainable:  # fp32 master weights = the trainable weights themselves
            param.data = param.data.float()
        model.to(self.device)
        self.world_size = backend.world_size
        config = zero_ds_config(backend.cfg, train, backend.world_size)
        self.offload = backend.cfg.offload_optimizer == "cpu"
        if self.offload:  # DeepSpeedCPUAdam, built by DeepSpeed from the same groups
            options = {"model_parameters": param_groups(self.named_trainable, train.weight_decay, train.lr_scale)}
        else:
            options = {"optimizer": optimizer_factory(self.named_trainable)}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=TrainableShell(model), config=config, **options)

    def loss_multiplier(self, micro_batches: int) -> float:
        return float(self.world_size)  # gradients averaged over ranks; 1/GA scaling off

    def forward_backward(self, window, autocast) -> None:
        if len(window.micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"zero: got {len(window.micro_batches)} micro-batches, DeepSpeed was configured for "
                             f"{self.engine.gradient_accumulation_steps()} (train.grad_accum)")
        self.engine.train()
        for batch in window.micro_batches:
            if batch.size == 0:  # every sample skipped: still join the gradient reduction
                share = sum(p.sum() * 0.0 for _, p in self.named_trainable)
            else:
                with autocast():
                    total, tokens = self.engine(**batch.model_inputs(self.device))
                share = window.share(total, tokens)
            self.engine.backward(share.float(), scale_wrt_gas=False)
            self.engine.step()  # DeepSpeed steps at the accumulation boundary only

    def apply(self, clip: float, scaler) -> float:
        norm = self.engine.get_global_grad_norm()  # clipped inside DeepSpeed's step (gradient_clipping)
        return float(norm) if norm is not None else float("nan")

    def eval_forward(self, batch: Batch):
        self.engine.eval()
        return self.engine(**batch.model_inputs(self.device))

    def gather_state(self, step: int) -> dict[str, Any]:
        state = gather_named_state(self.optimizer, self.named_trainable, self.stage, step)
        if self.offload:  # DeepSpeed built the groups: put the names back
            built = param_groups(self.named_trainable, self.settings.weight_decay, self.settings.lr_scale)
            for group, source in zip(state["optimizer"]["param_groups"], built):
                group["names"] = source["names"]
        return state

    def load_state(self, state: dict[str, Any]) -> None:
        load_named_state(self.optimizer, self.named_trainable, state, self.stage, self.device)


class ZeroBackend(DeepSpeedBackend):
    """DeepSpeed ZeRO data parallel (torchrun or the deepspeed launcher)."""

    name = "zero"

    def state_shards(self) -> tuple[int, int, int]:
        world, stage = self.world_size, self.cfg.stage
        return (world if stage >= 3 else 1), (world if stage >= 2 else 1), (world if stage >= 1 else 1)

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> Engine:
        return Engine(model, self, ZeroRunner(model, self, optimizer_factory, train), lr_schedule, train)


def _build(cfg: ZeroConfig, ctx: BuildContext) -> ZeroBackend:
    return ZeroBackend(cfg, device_preference(ctx))


SPECS = [ComponentSpec("zero", ZeroConfig, _build,
                       "DeepSpeed ZeRO stage 0-3 data parallel over the trainable parts (torchrun / deepspeed launcher)")]
