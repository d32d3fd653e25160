"""``heldout`` and ``demo_shapes``: exact match on the recipe's own ``[[data.eval]]`` sets.

Each held-out sample whose conversation ends with an assistant answer is asked the conversation
without that answer; the greedy answer is right when it equals the reference after trimming
whitespace and punctuation, ignoring case (:func:`~mllmkit.eval.answers.exact_match_normalize`).
A sample the dataset cannot produce, or one without a final answer, is listed with its source and
index. ``heldout`` takes every ``[[data.eval]]`` set (or those whose ``type`` is in ``datasets``);
``demo_shapes`` is the same over the demo's set, with its chance level. Training's held-out exact
match (``eval_accuracy`` in ``metrics.jsonl``) is this task's score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from mllmkit.config import config, positive
from mllmkit.errors import UserError
from mllmkit.eval.answers import exact_match_normalize
from mllmkit.eval.task import EvalItem, EvalTaskConfig, Problem, ScoredSample, Scores, TaskData
from mllmkit.interfaces import BuildContext

__all__ = ["DemoShapesTaskConfig", "HeldOutConfig", "HeldOutTask", "build_heldout_sets"]


@config
class HeldOutConfig(EvalTaskConfig):
    """Options of ``heldout``."""

    datasets: list[str] = attrs.Factory(list)
    """Types of the recipe's [[data.eval]] sets to use (empty: all of them)."""
    max_new_tokens: int | None = attrs.field(default=None, validator=positive)
    """Default: the recipe's train.eval_max_new_tokens (what training evaluates with)."""


@config
class DemoShapesTaskConfig(HeldOutConfig):
    """Options of ``demo_shapes`` (the demo's held-out set)."""

    datasets: list[str] = attrs.Factory(lambda: ["demo_shapes"])


class HeldOutTask:
    """Exact match over ``sets``: (recipe key, dataset) pairs."""

    headline = "accuracy"

    def __init__(self, name: str, sets: Sequence[tuple[str, Any]], max_new_tokens: int, prompt: str = "") -> None:
        self.name, self.sets, self.max_new_tokens, self.prompt = name, list(sets), max_new_tokens, prompt

    def load(self, rank: int = 0, world: int = 1) -> TaskData:
        """The items (every ``world``-th sample from ``rank`` on, per set) and the unusable samples."""
        items: list[EvalItem] = []
        problems: list[Problem] = []
        for key, dataset in self.sets:
            for index in range(rank, len(dataset), world):
                try:
                    sample = dataset[index]
                except UserError as exc:
                    problems.append(Problem(getattr(dataset, "source", key), index, str(exc)))
                    continue
                messages = list(sample.messages)
                if len(messages) < 2 or messages[-1].get("role") != "assistant":
                    problems.append(Problem(sample.source or key, index, "the conversation does not end with an "
                                                                         "assistant answer"))
                    continue
                prompt = [*messages[:-2], {**messages[-2], "content": messages[-2]["content"] + self.prompt}]
                items.append(EvalItem(id=f"{key}/{index}", messages=tuple(prompt), images=tuple(sample.images),
                                      reference=messages[-1]["content"], group=key))
        return TaskData(items, problems)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[str]) -> Scores:
        said = [exact_match_normalize(p) for p in predictions]
        right = [s == exact_match_normalize(item.reference) for s, item in zip(said, items)]
        metrics: dict[str, float | int] = {"accuracy": sum(right) / len(right) if right else 0.0,
                                           "correct": sum(right), "total": len(right)}
        chance = [(d.chance_accuracy(), len(d)) for _, d in self.sets if hasattr(d, "chance_accuracy")]
        if chance:
            metrics["chance_accuracy"] = sum(a * n for a, n in chance) / sum(n for _, n in chance)
        return Scores(metrics, [ScoredSample(s, float(ok)) for s, ok in zip(said, right)])


def build_heldout_sets(recipe, model, types: Sequence[str] = ()) -> list[tuple[str, Any]]:
    """(key, dataset) for the recipe's ``[[data.eval]]`` sets (only those of ``types`` when given)."""
    chosen = [c for c in recipe.eval_data if not types or c.type in types]
    context = BuildContext(key="data", recipe_dir=recipe.dir, model=model, recipe=recipe)
    return [(c.key, c.spec.build(c.config, attrs.evolve(context, key=c.key))) for c in chosen]


def _build(name: str):
    def build(cfg: HeldOutConfig, ctx: BuildContext) -> HeldOutTask:
        if ctx.recipe is None:
            raise UserError(f"eval task {name!r} evaluates a recipe's [[data.eval]] sets; it needs a recipe")
        sets = build_heldout_sets(ctx.recipe, ctx.model, cfg.datasets)
        if not sets:
            wanted = f" of type {', '.join(cfg.datasets)}" if cfg.datasets else ""
            raise UserError(f"eval task {name!r}: the recipe {ctx.recipe.path} has no [[data.eval]] table{wanted}; "
                            f"add one (e.g. type = \"{cfg.datasets[0] if cfg.datasets else 'demo_shapes'}\")")
        max_new = cfg.max_new_tokens or ctx.recipe.train.eval_max_new_tokens
        return HeldOutTask(name, sets, max_new, cfg.prompt)
    return build


build_heldout = _build("heldout")
build_demo_shapes = _build("demo_shapes")
