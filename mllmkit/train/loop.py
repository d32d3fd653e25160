"""The training loop: one function, :func:`train`, from a validated recipe to an exported model.

Read it top to bottom: set up the backend, build the model and data, restore a checkpoint if asked,
then for each optimizer step fetch this rank's micro-batches, let the engine step, log, evaluate
and save. The backend (``single``, ``ddp``, DeepSpeed ones from plugins) does everything parallel:
gradient sync, sharding of optimizer state, reductions of metrics across ranks.
"""

from __future__ import annotations

import functools
import pathlib
import sys
import time
from typing import Any

import attrs
import torch

from mllmkit.data.collate import Collator, EncodedDataset, SampleEncoder
from mllmkit.data.errors import Skip, SkipReport
from mllmkit.data.loader import load_micro_batches, loader_seed
from mllmkit.data.packing import (
    PackingCollator,
    TokenLengths,
    check_packing,
    pack_draws,
    steps_per_packed_epoch,
)
from mllmkit.data.sampling import (
    epoch_micro_batches,
    epoch_order,
    group_by_length,
    rank_step,
    steps_per_epoch,
)
from mllmkit.errors import UserError
from mllmkit.interfaces import BuildContext, ParallelBackend
from mllmkit.recipe import Recipe
from mllmkit.train.checkpoint import (
    export,
    find_resume,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from mllmkit.train.evaluate import TrainingEvaluator
from mllmkit.train.feature_cache import FeatureCache
from mllmkit.train.fused import apply_fused_kernels
from mllmkit.train.metrics import MetricsWriter
from mllmkit.train.optim import build_adamw, check_lr_scale, make_lr_schedule
from mllmkit.tune.lora import write_adapters
from mllmkit.tune.memory import check_fits

__all__ = ["TrainResult", "build_backend", "train"]


@attrs.frozen
class TrainResult:
    """What a run produced (on the main rank; other ranks get the same numbers)."""

    run_dir: pathlib.Path
    steps: int
    losses: list[float]
    """The true loss of every optimizer step this process ran (resumed runs: from the resume step on)."""
    eval: dict[str, Any] | None
    export_dir: pathlib.Path | None
    skipped: dict[str, int]


def build_backend(recipe: Recipe) -> ParallelBackend:
    """The recipe's parallel backend, not yet set up (its declarations can be read before any process starts)."""
    preference = recipe.train.device  # "auto": the backend picks (the local GPU when there is one)
    device = None if preference == "auto" else torch.device(preference)
    return recipe.parallel.spec.build(recipe.parallel.config, BuildContext(key="parallel", recipe_dir=recipe.dir,
                                                                           device=device))


def train(recipe: Recipe, run_dir: str | pathlib.Path, resume: str | None = None) -> TrainResult:
    """Train as the recipe says, writing metrics, checkpoints and the export into ``run_dir``."""
    settings, data = recipe.train, recipe.data
    run_dir = pathlib.Path(run_dir)
    backend = build_backend(recipe)
    backend.setup()
    progress = None
    try:
        if backend.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
        backend.barrier()

        # -- model (same seed on every rank, so frozen weights are identical without a broadcast) --
        check_fits(recipe, backend)  # a full fine-tune that cannot fit stops before any weight is read
        torch.manual_seed(settings.seed)
        model = backend.assemble(recipe)  # the pipeline's: parameters on the meta device first
        check_lr_scale((name for name, p in model.named_parameters() if p.requires_grad), settings.lr_scale)

        # -- data --
        context = BuildContext(key="data", recipe_dir=recipe.dir, model=model)
        datasets = [c.spec.build(c.config, attrs.evolve(context, key=c.key)) for c in recipe.train_data]
        eval_sets = [c.spec.build(c.config, attrs.evolve(context, key=c.key)) for c in recipe.eval_data]
        if not datasets:
            raise UserError("the recipe has no training data; add a [[data.train]] table")
        weights = [c.shared.weight for c in recipe.train_data]
        sizes = [len(d) for d in datasets]
        template = model.llm.template
        encoder = SampleEncoder(template, model.tokens_per_image, model.vision.image_transform(data.augment),
                                settings.max_text_len, system=data.system)
        eval_encoder = SampleEncoder(template, model.tokens_per_image, model.vision.image_transform(False),
                                     settings.max_text_len, system=data.system)
        samples = EncodedDataset(datasets, encoder, data.on_error)
        mb, accum, world = settings.micro_batch_size, settings.grad_accum, backend.world_size
        lengths = TokenLengths(samples) if data.packing else None

        def epoch_plan(epoch: int) -> list[list[tuple[int, int, int]]]:
            """The epoch's micro-batches (lists of draws): a pure function of the seed and the epoch."""
            order = epoch_order(sizes, weights, settings.seed, epoch)
            if lengths is not None:
                return pack_draws(order, [lengths(d, i) for d, i, _ in order], data.max_tokens_per_batch)
            if data.group_by_length:
                order = group_by_length(order, [_length(datasets[d], i) for d, i, _ in order], mb)
            return epoch_micro_batches(order, mb)

        draws_per_epoch = len(epoch_order(sizes, weights, settings.seed, 0))
        if data.packing:
            check_packing(data, settings)
            per_epoch = steps_per_packed_epoch(lambda e: len(epoch_plan(e)) // (accum * world), settings.epochs,
                                               settings.max_steps)
        else:
            per_epoch = steps_per_epoch(draws_per_epoch, mb, accum, world)
        if per_epoch == 0:
            raise UserError(f"the training data has {draws_per_epoch} samples per epoch, fewer than one global batch "
                            f"(micro_batch_size {mb} × grad_accum {accum} × {world} process(es); with data.packing "
                            f"packed rows × grad_accum × processes); lower them")
        total_steps = settings.max_steps or settings.epochs * per_epoch

        # -- engine: the backend wraps the model, builds AdamW and steps it on the schedule --
        engine = backend.prepare(model, functools.partial(build_adamw, train=settings),
                                 make_lr_schedule(settings, total_steps), settings)
        model.loss_logits = settings.loss_logits
        apply_fused_kernels(model, settings.fused_kernels, engine.device)
        features = FeatureCache.create(model, engine.device, settings.feature_cache, run_dir, recipe.to_dict()["model"],
                                       encoder.transform) if settings.cache_features else None
        collate = (PackingCollator if data.packing else Collator)(
            template.pad_token_id, pad_to_multiple=data.pad_to_multiple, image_token_id=template.image_token_id)

        # -- resume --
        skips = SkipReport()
        checkpoint = find_resume(resume, run_dir)
        if checkpoint is not None:
            engine_state, trainer_state, rng_states = load_checkpoint(checkpoint)
            try:
                engine.load_state_dict(engine_state)
            except (ValueError, KeyError, RuntimeError) as exc:  # another recipe's (or a damaged) checkpoint
                raise UserError(f"--resume {checkpoint}: does not fit this recipe's model: "
                                f"{str(exc).splitlines()[0]}") from None
            set_rng_state(rng_states[backend.rank] if len(rng_states) == world else rng_states[0])
            skips.add(Skip(**s) for s in trainer_state.get("skips", []))
            if backend.is_main:
                print(f"resumed from {checkpoint} at step {engine.step}", file=sys.stderr)
        elif resume is not None and backend.is_main:
            print(f"--resume {resume}: no checkpoint in {run_dir}, starting from scratch", file=sys.stderr)
        finished = checkpoint is not None and engine.step >= total_steps  # resumed after its last step

        metrics = MetricsWriter(run_dir, backend.is_main, settings.tensorboard, resume_step=engine.step)
        progress = _progress(backend.is_main and not finished, total_steps, engine.step)
        losses: list[float] = []
        window = {"loss": 0.0, "steps": 0, "samples": 0.0, "tokens": 0.0, "time": time.perf_counter()}
        eval_result = None
        evaluator = TrainingEvaluator(recipe, backend, eval_sets, eval_encoder, run_dir, model)

        def save() -> dict[str, Any]:
            trainer_state = {"step": engine.step, "epoch": engine.step // per_epoch,
                             "step_in_epoch": engine.step % per_epoch, "total_steps": total_steps,
                             "loader_seed": loader_seed(settings.seed, engine.step // per_epoch),
                             "skips": [attrs.asdict(s) for s in skips.seen.values()]}
            state, rngs = engine.state_dict(), backend.all_gather_object(rng_state())
            if backend.is_main:
                save_checkpoint(run_dir, state, trainer_state, rngs, settings.keep_last)
            backend.barrier()
            return state

        # -- the loop: epochs of planned draws, one optimizer step at a time --
        while engine.step < total_steps:
            epoch, first = divmod(engine.step, per_epoch)
            micro = epoch_plan(epoch)
            last = min(per_epoch, first + total_steps - engine.step)
            plan = [rank_step(micro, s, accum, world, backend.rank) for s in range(first, last)]
            batches = load_micro_batches(samples, [m for step in plan for m in step], collate,
                                         data.num_workers, loader_seed(settings.seed, epoch),
                                         pin_memory=engine.device.type == "cuda")
            for _ in plan:
                micro_batches = [next(batches) for _ in range(accum)]
                if features is not None:  # frozen image features computed once, then reused
                    micro_batches = [features.attach(b) for b in micro_batches]
                skips.add(s for b in micro_batches for s in b.skips)
                out = engine.train_step(micro_batches)
                losses.append(out["loss"])
                step = engine.step
                if out.get("skipped"):
                    metrics.write({"step": step, "skipped_step": "every sample of the step was skipped; no update"})
                else:
                    for key in ("samples", "tokens"):
                        window[key] += out[key]
                    window["loss"] += out["loss"]
                    window["steps"] += 1
                if step % settings.log_every == 0 or step == total_steps:
                    elapsed = max(time.perf_counter() - window["time"], 1e-9)
                    record = {"step": step, "epoch": (step - 1) // per_epoch, "loss": window["loss"] / window["steps"] if window["steps"] else float("nan"),
                              "lr": out["lr"], "grad_norm": out["grad_norm"],
                              "samples_per_s": window["samples"] / elapsed, "tokens_per_s": window["tokens"] / elapsed,
                              "samples": window["samples"],
                              "skipped": skips.counts()}
                    metrics.write(record)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{out['lr']:.2e}",
                                         samples_s=f"{record['samples_per_s']:.1f}",
                                         tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
                    window = {"loss": 0.0, "steps": 0, "samples": 0.0, "tokens": 0.0, "time": time.perf_counter()}
                if step < total_steps:  # after the postfix: the bar shows this step's loss and lr, not the last one's
                    progress.update(1)
                else:  # the final state: close() prints it, once
                    progress.n = step
                if evaluator.due(step, total_steps):
                    metrics.write({"step": step, **evaluator(engine)})
                if settings.save_every and step % settings.save_every == 0 and step < total_steps:
                    save()
        progress.close()

        # -- the end: final checkpoint, export, skip report, then evaluation (it cannot cost the export); a run
        #    resumed after its last step rewrites its export only, so a failed final evaluation is not repeated --
        final_state = engine.state_dict() if finished else save()
        for report in backend.all_gather_object(skips):
            skips.merge([report])
        export_dir = None
        if backend.is_main:
            export_dir = export(run_dir, final_state["model"], recipe.to_dict())  # full tensors (ZeRO-3, pipeline)
            write_adapters(export_dir, model, final_state["model"])  # tune = "lora": peft's layout, beside
            skips.write_jsonl(run_dir / "skipped.jsonl")
            if skips.seen:
                print(skips.summary(), file=sys.stderr)
        if finished and backend.is_main:
            print(f"the run had finished at step {engine.step}" + (
                f"; its final evaluation is not repeated (mllmkit eval {export_dir} {_task_options(recipe)} "
                f"evaluates the export)" if evaluator.enabled else ""), file=sys.stderr)
        if evaluator.enabled and not finished:
            record = evaluator(engine)
            metrics.write({"step": engine.step, **record})
            eval_result = record if eval_sets else None  # launch.py prints the held-out keys
        metrics.close()
        backend.barrier()
        return TrainResult(run_dir=run_dir, steps=engine.step, losses=losses, eval=eval_result,
                           export_dir=export_dir, skipped=skips.counts())
    finally:
        if progress is not None:
            progress.close()  # also when the run stops with an error: its message starts on a line of its own
        backend.shutdown()


def _task_options(recipe: Recipe) -> str:
    """The ``--task`` options of ``mllmkit eval`` that evaluate what the recipe's training evaluates."""
    names = (["heldout"] if recipe.eval_data else []) + [c.type for c in recipe.eval_tasks]
    return " ".join(f"--task {name}" for name in dict.fromkeys(names))


def _length(dataset, index: int) -> int:
    """A cheap length for grouping: the dataset's own estimate, else the text length of the sample."""
    if hasattr(dataset, "approx_length"):
        return int(dataset.approx_length(index))
    try:
        return sum(len(m["content"]) for m in dataset[index].messages)
    except UserError:
        return 0


def _progress(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True, file=sys.stderr)
