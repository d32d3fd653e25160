"""Evaluation during training: held-out loss and exact match, the recipe's ``[[eval.tasks]]``, the best export.

:class:`TrainingEvaluator` runs at ``train.eval_every`` and at the end. On the recipe's
``[[data.eval]]`` sets it measures the loss per labelled token and the exact match of greedy answers
— the ``heldout`` task's items, answers and scorer (:mod:`mllmkit.eval.tasks.heldout`), so
``mllmkit eval --task heldout`` (or ``demo_shapes``) on the export gives the same number. Each rank
takes every ``world_size``-th sample and the counts are summed; samples a dataset cannot produce are
counted in ``eval_problems``. The ``[[eval.tasks]]`` benchmarks run on rank 0 through
:func:`mllmkit.eval.runner.run_task`, their metrics logged as ``<task>/<metric>`` and shared with the
other ranks. With ``[eval] best_metric`` the export with the best value so far is kept in
``<run>/best/export`` with ``<run>/best/best.json`` (metric, value, step), which also carries the
best value across a resume.
"""

from __future__ import annotations

import json
import pathlib
from collections import Counter
from typing import Any

import torch

from mllmkit.data.collate import Collator, SampleEncoder
from mllmkit.errors import UserError
from mllmkit.eval.generate import generate_answers
from mllmkit.eval.runner import run_task
from mllmkit.eval.tasks.heldout import HeldOutTask
from mllmkit.interfaces import BuildContext

__all__ = ["TrainingEvaluator", "heldout_metrics"]


def heldout_metrics(engine, backend, task: HeldOutTask, encoder: SampleEncoder, batch_size: int) -> dict[str, Any]:
    """Held-out loss per labelled token and exact match of ``task``'s items, summed over ranks."""
    model = engine.model
    data = task.load(backend.rank, backend.world_size)
    collate = Collator(encoder.template.pad_token_id, image_token_id=encoder.template.image_token_id)
    loss_sum = tokens = 0.0
    for start in range(0, len(data.items), batch_size):
        encoded = []
        for item in data.items[start:start + batch_size]:
            conversation = [*item.messages, {"role": "assistant", "content": item.reference}]
            try:
                encoded.append(encoder(_sample(item, conversation)))
            except UserError:
                continue  # a too long conversation still gets its answer scored below
        if encoded:
            s, n = engine.eval_loss(collate(encoded))
            loss_sum, tokens = loss_sum + s, tokens + n
    answers, asked = generate_answers(model, data.items, encoder, task.max_new_tokens, batch_size)
    scores = task.score(data.items, answers)
    correct = sum(s.score for s in scores.samples)
    sums = backend.all_reduce(torch.tensor([loss_sum, tokens, correct, len(data.items),
                                            len(data.problems) + len(asked)], dtype=torch.float64)).tolist()
    examples = [{"answer": a, "reference": i.reference, "correct": bool(s.score)}
                for a, i, s in zip(answers[:4], data.items, scores.samples)]
    result: dict[str, Any] = {"eval_loss": sums[0] / max(sums[1], 1.0), "eval_accuracy": sums[2] / max(sums[3], 1.0),
                              "eval_questions": int(sums[3]), "eval_problems": int(sums[4]), "eval_examples": examples}
    if "chance_accuracy" in scores.metrics:
        result["chance_accuracy"] = scores.metrics["chance_accuracy"]
    return result


def _sample(item, messages):
    from mllmkit.interfaces import Sample

    return Sample(images=item.images, messages=messages, source=item.group, index=int(item.id.rsplit("/", 1)[-1]))


class TrainingEvaluator:
    """What training evaluates, built once per run (see the module docstring)."""

    def __init__(self, recipe, backend, eval_sets, encoder: SampleEncoder, run_dir: pathlib.Path, model) -> None:
        self.recipe, self.backend, self.encoder, self.run_dir = recipe, backend, encoder, pathlib.Path(run_dir)
        settings = recipe.train
        keys = [c.key for c in recipe.eval_data]
        self.heldout = (HeldOutTask("heldout", list(zip(keys, eval_sets)), settings.eval_max_new_tokens)
                        if eval_sets else None)
        counts = Counter(c.type for c in recipe.eval_tasks)
        self.tasks = []
        for index, component in enumerate(recipe.eval_tasks):
            name = component.type if counts[component.type] == 1 else f"{component.type}{index}"
            context = BuildContext(key=component.key, recipe_dir=recipe.dir, model=model, recipe=recipe)
            self.tasks.append((name, component.config, component.spec.build(component.config, context)))
        self.batch_size = recipe.eval.batch_size

    @property
    def enabled(self) -> bool:
        return self.heldout is not None or bool(self.tasks)

    def due(self, step: int, total_steps: int) -> bool:
        every = self.recipe.train.eval_every
        return bool(every) and self.enabled and step % every == 0 and step < total_steps

    def __call__(self, engine) -> dict[str, Any]:
        """One evaluation at the engine's current step: the metrics record (without ``step``)."""
        record: dict[str, Any] = {}
        if self.heldout is not None:
            record.update(heldout_metrics(engine, self.backend, self.heldout, self.encoder, self.batch_size))
        if self.tasks:
            found: dict[str, Any] = {}
            if self.backend.is_main:
                found = self._benchmarks(engine.model)
            record.update(self.backend.all_gather_object(found)[0])
        if self.recipe.eval.best_metric:
            self._keep_best(engine, record)
        return record

    def _benchmarks(self, model) -> dict[str, Any]:
        record: dict[str, Any] = {}
        limit = getattr(model.llm, "max_positions", None) or 4096
        for name, config, task in self.tasks:
            encoder = SampleEncoder(self.encoder.template, self.encoder.tokens_per_image, self.encoder.transform,
                                    limit - task.max_new_tokens, system=self.encoder.system)
            result = run_task(model, task, encoder, batch_size=self.batch_size, limit=config.limit, progress=False)
            record.update({f"{name}/{key}": value for key, value in result.metrics.items()})
            record[f"{name}/problems"] = len(result.problems)
        return record

    def _keep_best(self, engine, record: dict[str, Any]) -> None:
        section = self.recipe.eval
        if section.best_metric not in record:
            raise UserError(f"eval.best_metric = {section.best_metric!r} is not among the evaluation's metrics: "
                            f"{', '.join(k for k in record if isinstance(record[k], (int, float)))}")
        value = float(record[section.best_metric])
        marker = self.run_dir / "best" / "best.json"
        best = json.loads(marker.read_text())["value"] if marker.is_file() else None
        better = best is None or (value > best if section.best_mode == "max" else value < best)
        if not better:
            return
        state = engine.state_dict()  # every rank: a collective for sharded backends
        if self.backend.is_main:
            from mllmkit.train.checkpoint import export

            export(self.run_dir / "best", state["model"], self.recipe.to_dict())
            marker.write_text(json.dumps({"metric": section.best_metric, "value": value, "step": engine.step}) + "\n")
        self.backend.barrier()
