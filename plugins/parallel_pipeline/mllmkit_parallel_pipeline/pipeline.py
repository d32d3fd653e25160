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

Training: the core's optimizer step (:class:`mllmkit.train.engine.Engine`) with a
:class:`PipelineRunner`: DeepSpeed's 1F1B schedule over ``train.grad_accum`` micro-batches under the
core's autocast, fp32 trainable weights (no DeepSpeed bf16 optimizer, so frozen weights never get an
fp32 master copy, and a stage without trainable parameters just gets an AdamW with empty groups — no
dummy layer). The last stage's loss function backpropagates each micro-batch's share of the step's
loss (``StepWindow.share``; DeepSpeed also divides by the accumulation steps). DeepSpeed's own
clipping is off (it fails on a frozen stage); the client AdamW clips with the gradient norm reduced
over the pipeline (and, at ZeRO-1, the data-parallel) group. ``gather_state`` collects every stage's
trainable tensors and AdamW state by MLLM name.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mllmkit.data.collate import Batch
from mllmkit.errors import RecipeError, UserError
from mllmkit.interfaces import BuildContext
from mllmkit.model import labelled_rows
from mllmkit.registry import ComponentSpec
from mllmkit.train.deepspeed import (
    DeepSpeedBackend,
    batch_config,
    gather_named_state,
    import_deepspeed,
    load_named_state,
    merge_config,
)
from mllmkit.train.dist import device_preference, launch_world_size
from mllmkit.train.engine import Engine
from mllmkit.weights import meta_parameters
from mllmkit_parallel_pipeline.configs import PipelineConfig
from mllmkit_parallel_pipeline.known_shapes import KnownShapeTransfers
from mllmkit_parallel_pipeline.partition import (
    Plan,
    format_plan,
    layer_costs,
    measure_layer_seconds,
    plan_partition,
    read_profile,
    write_profile,
)
from mllmkit_parallel_pipeline.pipe_layers import (
    LabelledLoss,
    materialize_layers,
    pipeline_layers,
    release_layers,
)

__all__ = ["SPECS", "PipelineBackend", "PipelineRunner", "pipeline_ds_config", "plan_for"]


def pipeline_ds_config(cfg: PipelineConfig, train, dp_world: int) -> dict[str, Any]:
    out = {**batch_config(train, dp_world), "gradient_clipping": 0.0,
           "zero_optimization": {"stage": cfg.zero_stage}, "zero_allow_untested_optimizer": True}
    return merge_config(out, cfg.extra)


def plan_for(model: nn.Module, cfg: PipelineConfig, train, measure: Callable[[list], list[float]] | None = None) -> Plan:
    """The partition of ``model`` for this config (cost model, measured profile, or ``stage_map``).
    ``measure(costs)``: per-layer seconds when ``partition = "measured"`` and no profile exists yet."""
    costs = layer_costs(model, seq_len=_plan_seq_len(model, cfg, train), images=cfg.images_per_sample,
                        checkpointing=cfg.activation_checkpointing or model.llm.checkpointing)
    if cfg.partition == "measured" and cfg.stage_map is None:
        if not cfg.profile.exists():
            if measure is None:
                raise UserError(f"parallel.profile: {cfg.profile} does not exist and nothing here can measure it")
            write_profile(cfg.profile, costs, measure(costs), seq_len=_plan_seq_len(model, cfg, train),
                          micro_batch_size=train.micro_batch_size, device=torch.cuda.get_device_name()
                          if torch.cuda.is_available() else "cpu")
        costs = read_profile(cfg.profile, costs)
    return plan_partition(costs, cfg.num_stages, cfg.stage_map)


def _plan_seq_len(model: nn.Module, cfg: PipelineConfig, train) -> int:
    return cfg.plan_seq_len or train.max_text_len + model.tokens_per_image


def measure_pipeline_layers(model: nn.Module, layers: list[nn.Module], cfg: PipelineConfig, train,
                            device: torch.device) -> list[float]:
    """Forward + backward seconds of every pipeline layer of a fully built ``model`` on ``device``, one
    layer moved there at a time, on a synthetic micro-batch of the planned shape under the run's autocast."""
    if cfg.meta_init:
        raise UserError("parallel.partition = 'measured' times every layer on one device, but meta_init = true "
                        "builds only this rank's stage; set parallel.meta_init = false for the measuring run "
                        f"(the profile is kept in {cfg.profile} for later runs), or give a profile")
    rows, length = train.micro_batch_size, _plan_seq_len(model, cfg, train)
    images = int(round(cfg.images_per_sample))
    ids = torch.zeros(rows, length, dtype=torch.long)
    ids[:, :images * model.tokens_per_image] = model.llm.template.image_token_id
    size = model.vision.image_size
    inputs = (ids.to(device), torch.ones(rows, length, dtype=torch.long, device=device),
              torch.randn(rows * images, 3, size, size, device=device))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(train.precision)
    seconds = []
    for layer in layers:
        layer.to(device)
        head = getattr(layer, "head", None)
        loss = (lambda final, out: final.head(out[: out.shape[0], : out.shape[1] // 2]).float().sum()) if head else None
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            seconds += measure_layer_seconds([layer], inputs, device, loss=loss)
            with torch.no_grad():
                inputs = layer(inputs)
        layer.to("cpu")
    return seconds


def refuse_unsupported(recipe) -> None:
    """Raise a :class:`RecipeError` for training options the stages cannot honour, before any weight is read:
    the stages carry (hidden, attention mask) and compute the head at labelled tokens from pixels."""
    if recipe.data.packing:
        raise RecipeError("data.packing", "the pipeline carries (hidden, attention mask) between stages, not the "
                          "packed rows' position ids; set data.packing = false with parallel.type = 'pipeline'")
    if recipe.train.cache_features:
        raise RecipeError("train.cache_features", "the pipeline's first stage encodes the pixels itself; set "
                          "cache_features = false with parallel.type = 'pipeline'")
    if recipe.train.loss_logits != "labelled":
        raise RecipeError("train.loss_logits", "the pipeline's last stage computes the head at labelled tokens only; "
                          "set loss_logits = 'labelled' with parallel.type = 'pipeline'")


class PipelineBackend(DeepSpeedBackend):
    """DeepSpeed pipeline parallel (torchrun or the deepspeed launcher): one process per stage at least."""

    name = "pipeline"

    def __init__(self, cfg: PipelineConfig, device_preference: str = "auto") -> None:
        super().__init__(cfg, device_preference)
        self.stage, self.num_stages = 0, cfg.num_stages
        self.batch_replicas = cfg.num_stages  # every stage reads the same batches

    def processes_needed(self) -> int:
        return self.cfg.num_stages

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

    def state_shards(self) -> tuple[int, int, int]:
        """Each stage holds about 1/num_stages of the trainable weights, gradients and AdamW state
        (stages are cut by work, so this is the average); ZeRO-1 splits the state by the data-parallel ranks too."""
        stages = self.cfg.num_stages
        return stages, stages, stages * (self.world_size if self.cfg.zero_stage >= 1 else 1)

    def assemble(self, recipe):
        """Build the recipe's model; with ``meta_init`` every parameter starts on the meta device."""
        refuse_unsupported(recipe)
        if not self.cfg.meta_init:
            return super().assemble(recipe)
        with meta_parameters():
            return super().assemble(recipe)

    def prepare(self, model: nn.Module, optimizer_factory: Callable[..., Any], lr_schedule: Callable[[int], float],
                train) -> Engine:
        return Engine(model, self, PipelineRunner(model, self, optimizer_factory, train), lr_schedule, train)


class PipelineRunner:
    """The window's forward/backward and step through DeepSpeed's ``PipelineEngine`` (1F1B)."""

    uses_grad_scaler = False

    def __init__(self, model: nn.Module, backend: PipelineBackend, optimizer_factory, train) -> None:
        deepspeed = import_deepspeed("pipeline")
        from deepspeed.pipe import PipelineModule

        cfg: PipelineConfig = backend.cfg
        self.model, self.backend = model, backend
        self.device = backend.device
        layers = pipeline_layers(model, cfg.activation_checkpointing)  # the LLM's own switch acts inside
        if cfg.partition == "measured" and cfg.stage_map is None:
            if backend.is_main and not cfg.profile.exists():
                plan_for(model, cfg, train, measure=lambda costs: measure_pipeline_layers(model, layers, cfg, train,
                                                                                          self.device))
            backend.barrier()  # every rank reads the one profile rank 0 measured
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
        local_ids = {id(p) for layer in local for p in layer.parameters()}
        self.named_trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in local_ids]
        if cfg.zero_stage == 1 and not self.named_trainable:
            raise UserError(f"parallel.zero_stage = 1 needs a trainable parameter on every stage, but stage "
                            f"{backend.stage} has none; use zero_stage = 0 (frozen stages work there)")
        self.loss = LabelledLoss(layers[-1])

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
        config = pipeline_ds_config(cfg, train, backend.world_size)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer_factory(
            self.named_trainable), config=config)
        self.transfers = KnownShapeTransfers(self.engine, model.llm.hf_model.config.hidden_size)
        self._clip_group = self.engine.grid.get_pipe_parallel_group() if cfg.zero_stage == 0 else None
        self._clip = train.grad_clip
        self.grad_norm = float("nan")
        self._wrap_inner_step()

    def _wrap_inner_step(self) -> None:
        """Clip inside the optimizer's step (DeepSpeed steps it at the end of ``train_batch``) with the
        gradient norm over every stage (and, at ZeRO-1, every data-parallel rank)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        original_step = inner.step

        def clipped_step(*args, **kwargs):
            params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
            self.grad_norm = self._global_norm(params)
            if self._clip > 0 and math.isfinite(self.grad_norm) and self.grad_norm > self._clip:
                scale = self._clip / (self.grad_norm + 1e-6)
                for p in params:
                    p.grad.mul_(scale)
            return original_step(*args, **kwargs)

        inner.step = clipped_step

    def _global_norm(self, params: list[torch.Tensor]) -> float:
        import torch.distributed as dist

        local = torch.zeros((), dtype=torch.float64, device=self.device)
        for p in params:
            local += p.grad.detach().double().pow(2).sum()
        if self.backend.global_world > 1:
            dist.all_reduce(local, group=self._clip_group)  # None = every rank (ZeRO-1 partitions)
        return float(local.sqrt())

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

    # -- the runner's contract --
    def loss_multiplier(self, micro_batches: int) -> float:
        return float(micro_batches * self.backend.world_size)  # DeepSpeed divides by GA and averages over DP

    def forward_backward(self, window, autocast) -> None:
        micro_batches = window.micro_batches
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"pipeline: got {len(micro_batches)} micro-batches, DeepSpeed was configured for "
                             f"{self.engine.gradient_accumulation_steps()} (train.grad_accum)")
        if any(b.size == 0 for b in micro_batches):
            raise UserError("pipeline: a micro-batch lost every sample to data errors; the pipeline schedule "
                            "cannot run an empty micro-batch. Fix or drop the bad records (see skipped.jsonl)")
        self.engine.train()
        self.transfers.expect(tuple(b.input_ids.shape) for b in micro_batches)
        self.loss.window = window
        try:
            with autocast():
                self.engine.train_batch(data_iter=iter(self._items(micro_batches)))  # forward, backward, step
        finally:
            self.loss.window = None

    def apply(self, clip: float, scaler) -> float:
        return self.grad_norm  # the step ran inside train_batch, clipped there at train.grad_clip

    def eval_forward(self, batch: Batch):
        self.engine.eval()
        self.transfers.expect([tuple(batch.input_ids.shape)])
        loss = self.engine.eval_batch(iter(self._items([batch])), num_micro_batches=1)
        return float(loss), batch.num_tokens

    def gather_state(self, step: int) -> dict[str, Any]:
        """A collective: every rank gets every stage's state (one copy per stage: data-parallel rank 0's)."""
        mine = gather_named_state(self.optimizer, self.named_trainable, self.backend.cfg.zero_stage, step)
        if self.backend.rank != 0:
            mine = {"model": {}, "optimizer": {"state": {}, "param_groups": []}}
        model, state, groups = {}, {}, []
        for theirs in self.backend.all_gather_object(mine):
            model.update(theirs["model"])
            state.update(theirs["optimizer"]["state"])
            for i, group in enumerate(theirs["optimizer"]["param_groups"]):
                if i == len(groups):
                    groups.append({**group, "names": list(group["names"])})
                else:
                    groups[i]["names"].extend(group["names"])
        return {"model": model, "optimizer": {"state": state, "param_groups": groups}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take this stage's tensors (by name) from a full state of any backend."""
        load_named_state(self.optimizer, self.named_trainable, state, self.backend.cfg.zero_stage, self.device)


def _build(cfg: PipelineConfig, ctx: BuildContext) -> PipelineBackend:
    return PipelineBackend(cfg, device_preference(ctx))


SPECS = [ComponentSpec("pipeline", PipelineConfig, _build,
                       "DeepSpeed pipeline parallel (N stages x data parallel), cost-based or explicit stage map")]
