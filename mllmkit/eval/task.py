"""What an evaluation task is: items to ask, and a scorer for the answers.

A task plugin registers a :class:`~mllmkit.registry.ComponentSpec` through the
``mllmkit_register_eval_tasks`` hook; its config class extends :class:`EvalTaskConfig` (the options
every task has: ``data``, ``limit``, ``prompt``, ``max_new_tokens``) and ``build(config, context)``
returns an :class:`EvalTask`. ``load()`` reads the benchmark's own files into :class:`EvalItem`
objects and lists every record it could not use as a :class:`Problem` (file and index, never
silently dropped); ``score(items, predictions)`` turns the greedy answers into metrics and one
:class:`ScoredSample` per item (what was parsed from the answer, and whether it was right). An
answer the task's extractor cannot parse counts as wrong and is marked ``parsed = None``.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from mllmkit.config import positive
from mllmkit.errors import UserError
from mllmkit.template import IMAGE_SPAN

__all__ = [
    "EvalItem", "EvalTask", "EvalTaskConfig", "Problem", "ScoredSample", "Scores", "TaskData",
    "ask", "find_file", "limit_items", "read_json", "read_json_lines",
]


@attrs.frozen
class EvalItem:
    """One question: the conversation to answer (ending with a user turn), its images (paths or PIL
    images, one per image marker, in order), the reference answer, and a ``group`` (split, category)."""

    id: str
    messages: tuple[dict, ...]
    images: tuple[Any, ...]
    reference: Any
    group: str = ""
    unit: str = ""
    """Items with the same unit are scored together (the rotations of one multiple-choice question, the
    questions about one MME image); ``limit`` keeps whole units. Empty: the item is its own unit."""
    extra: dict = attrs.Factory(dict)
    """JSON-able facts the scorer needs (options of a multiple-choice question, its rotation...)."""


def ask(id: str, question: str, images: Sequence[Any], reference: Any, group: str = "", prompt: str = "",
        unit: str = "", **extra: Any) -> EvalItem:
    """A one-turn item: each image as an image span before the question, then ``prompt`` after it."""
    text = IMAGE_SPAN * len(images) + " " + question + prompt if images else question + prompt
    return EvalItem(id=id, messages=({"role": "user", "content": text},), images=tuple(images),
                    reference=reference, group=group, unit=unit, extra=extra)


@attrs.frozen
class Problem:
    """A benchmark record that could not be used: where it is, and why."""

    file: str
    index: int
    reason: str


@attrs.frozen
class TaskData:
    """What :meth:`EvalTask.load` read: the usable items and the records it could not use."""

    items: list[EvalItem]
    problems: list[Problem] = attrs.Factory(list)


@attrs.frozen
class ScoredSample:
    """One answer after scoring: ``parsed`` is what the extractor read (None: unparseable, counted
    wrong) and ``score`` the item's credit in [0, 1] (1/0 for right/wrong; VQA's soft accuracy)."""

    parsed: Any
    score: float


@attrs.frozen
class Scores:
    """A task's metrics (flat names, e.g. ``adversarial/f1``) and one :class:`ScoredSample` per item."""

    metrics: dict[str, float | int]
    samples: list[ScoredSample]


@attrs.frozen(kw_only=True)
class EvalTaskConfig:
    """Options every task has (task config classes extend this, with ``@config``)."""

    data: pathlib.Path | None = None
    """Where the benchmark's files are (``mllmkit eval --data PATH`` sets it)."""
    limit: int | None = attrs.field(default=None, validator=positive)
    """Ask only the first N items (``--limit N``)."""
    prompt: str = ""
    """Text appended to each question (the instruction the benchmark is usually asked with)."""
    max_new_tokens: int = attrs.field(default=16, validator=positive)


@runtime_checkable
class EvalTask(Protocol):
    """A benchmark: its name, the answer length it needs, its items, and its scorer."""

    name: str
    max_new_tokens: int
    headline: str
    """The metric a one-line summary (and ``best_metric`` by default) uses."""

    def load(self) -> TaskData: ...

    def score(self, items: Sequence[EvalItem], predictions: Sequence[str]) -> Scores: ...


def limit_items(items: Sequence[EvalItem], limit: int | None) -> list[EvalItem]:
    """The items of the first ``limit`` units (all items when ``limit`` is None)."""
    if limit is None:
        return list(items)
    kept: set[str] = set()
    out = []
    for item in items:
        unit = item.unit or item.id
        if unit not in kept:
            if len(kept) == limit:
                continue
            kept.add(unit)
        out.append(item)
    return out


def find_file(folder: pathlib.Path | None, name: str, option: str, task: str) -> pathlib.Path:
    """``folder / name``, or a :class:`UserError` naming the file, where it was looked for, and the option."""
    if folder is None:
        raise UserError(f"eval task {task!r}: no data folder; give --data PATH (or data = \"...\" in [[eval.tasks]]) "
                        f"pointing at the folder holding {name}")
    path = folder / name if folder.is_dir() or not folder.exists() else folder
    if not path.is_file():
        raise UserError(f"eval task {task!r}: {name} not found: looked for {path} ({option}); give the folder "
                        f"that holds it with --data PATH")
    return path


def read_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read it as JSON: {exc}") from None


def read_json_lines(path: pathlib.Path, problems: list[Problem]) -> Iterator[tuple[int, dict]]:
    """(line index, record) for each JSON object line; a bad line becomes a :class:`Problem`."""
    for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem(str(path), index, f"not JSON: {exc}"))
            continue
        if not isinstance(record, dict):
            problems.append(Problem(str(path), index, f"expected a JSON object, found {type(record).__name__}"))
            continue
        yield index, record
