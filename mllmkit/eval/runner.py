"""Run one evaluation task on a model: load its items, answer them greedily, score the answers.

:func:`run_task` is what ``mllmkit eval``, training's ``eval_every`` and the lmms-eval-free paths
share: the task reads its files (:meth:`EvalTask.load`), ``limit`` keeps the first N units, the
model answers in batches (:func:`~mllmkit.eval.generate.generate_answers`) under a tqdm bar with
ETA, and the task scores them. The result keeps one record per item (prompt, answer, what was
parsed, reference, credit) and every problem: records the task could not read and items that could
not be asked (both with file and index), and answers its extractor could not parse (counted wrong).
"""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import attrs

from mllmkit.data.collate import SampleEncoder
from mllmkit.eval.generate import generate_answers
from mllmkit.eval.task import EvalTask, Problem, limit_items

__all__ = ["TaskResult", "run_task"]


@attrs.frozen
class TaskResult:
    """What one task's run produced."""

    name: str
    metrics: dict[str, float | int]
    records: list[dict[str, Any]]
    problems: list[Problem]
    unparsed: list[str]
    max_new_tokens: int

    def summary(self) -> dict[str, Any]:
        """The JSON-able part of ``results.json`` for this task."""
        return {"metrics": self.metrics, "samples": len(self.records),
                "problems": [attrs.asdict(p) for p in self.problems], "unparsed": self.unparsed,
                "max_new_tokens": self.max_new_tokens}


def _show(image: Any) -> str:
    return str(image) if isinstance(image, (str, pathlib.Path)) else f"<{type(image).__name__} image>"


def run_task(model, task: EvalTask, encoder: SampleEncoder, *, batch_size: int = 8, limit: int | None = None,
             progress: bool = True, data=None) -> TaskResult:
    """Evaluate ``model`` on ``task``; ``data`` is an already loaded :class:`TaskData` (else ``task.load()``)."""
    from tqdm.auto import tqdm

    data = data if data is not None else task.load()
    items = limit_items(data.items, limit)
    bar = tqdm(total=len(items), desc=task.name, unit="q", disable=not progress, file=sys.stderr, dynamic_ncols=True)
    try:
        answers, asked = generate_answers(model, items, encoder, task.max_new_tokens, batch_size, bar.update)
    finally:
        bar.close()
    scores = task.score(items, answers)
    records = [{"id": item.id, "group": item.group, "prompt": item.messages[-1]["content"],
                "images": [_show(i) for i in item.images], "prediction": answer, "parsed": scored.parsed,
                "reference": item.reference, "score": scored.score}
               for item, answer, scored in zip(items, answers, scores.samples)]
    unparsed = [item.id for item, scored in zip(items, scores.samples) if scored.parsed is None]
    return TaskResult(task.name, scores.metrics, records, [*data.problems, *asked], unparsed, task.max_new_tokens)
