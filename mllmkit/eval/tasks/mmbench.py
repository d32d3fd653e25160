"""``mmbench``: MMBench-style multiple choice from its TSV, with circular evaluation.

Reads the released TSV (``MMBench_DEV_EN.tsv`` and alike): columns ``index``, ``question``,
``hint``, ``A``..``D`` (empty for absent options), ``answer``, ``category`` and ``image`` (base64;
a row whose image is another row's ``index`` shares that row's picture, as VLMEvalKit writes them),
or ``image_path`` (relative to the TSV's folder). Each question with N options is asked N times,
the options rotated by 0..N-1 places (circular evaluation); it counts as right only if every
rotation is. Answers are read by :func:`~mllmkit.eval.answers.mmbench_option` (VLMEvalKit's
``can_infer``; an answer it cannot read is wrong and listed as unparsed). Metrics: ``accuracy``
(circular), ``vanilla_accuracy`` (the unrotated pass only) and circular accuracy per category.
Rows with ``index`` >= 1,000,000 are a TSV's own circular copies: left out (rotations are made
here) and counted in ``circular_copies_skipped``.
"""

from __future__ import annotations

import base64
import csv
import io
import pathlib
import string
from collections.abc import Sequence

from mllmkit.config import config
from mllmkit.errors import UserError
from mllmkit.eval.answers import mmbench_option
from mllmkit.eval.task import EvalItem, EvalTaskConfig, Problem, ScoredSample, Scores, TaskData, ask
from mllmkit.interfaces import BuildContext

__all__ = ["MmbenchConfig", "MmbenchTask", "rotations"]

LETTERS = string.ascii_uppercase
COPY_OFFSET = 1_000_000


@config
class MmbenchConfig(EvalTaskConfig):
    """Options of ``mmbench``."""

    file: str = "MMBench_DEV_EN.tsv"
    """The TSV inside ``data`` (or give the TSV itself as ``data``)."""
    circular: bool = True
    prompt: str = "\nAnswer with the option's letter from the given choices directly."
    max_new_tokens: int = 8


def rotations(options: Sequence[str], answer: int, circular: bool) -> list[tuple[list[str], int]]:
    """(option texts, index of the right one) for each pass: rotated left by 0..N-1 places."""
    n = len(options)
    shifts = range(n) if circular else range(1)
    return [([options[(i + k) % n] for i in range(n)], (answer - k) % n) for k in shifts]


def _image(row: dict, rows_by_index: dict[str, dict], folder: pathlib.Path):
    from PIL import Image

    if row.get("image_path"):
        return folder / row["image_path"]
    data = row.get("image") or ""
    if data.isdigit() and data in rows_by_index:  # the picture is stored on another row
        data = rows_by_index[data].get("image") or ""
    return Image.open(io.BytesIO(base64.b64decode(data, validate=True))).convert("RGB")


class MmbenchTask:
    name = "mmbench"
    headline = "accuracy"

    def __init__(self, cfg: MmbenchConfig) -> None:
        self.cfg, self.max_new_tokens = cfg, cfg.max_new_tokens
        self.copies_skipped = 0

    def _path(self) -> pathlib.Path:
        data = self.cfg.data
        path = data / self.cfg.file if data is not None and data.is_dir() else data
        if path is None or not path.is_file():
            raise UserError(f"eval task 'mmbench': {self.cfg.file} not found: looked for {path}; give the TSV or "
                            f"its folder with --data PATH")
        return path

    def load(self) -> TaskData:
        path = self._path()
        csv.field_size_limit(1 << 30)  # base64 images are long fields
        with path.open(encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        by_index = {row.get("index", ""): row for row in rows}
        items: list[EvalItem] = []
        problems: list[Problem] = []
        self.copies_skipped = 0
        for number, row in enumerate(rows):
            missing = [k for k in ("index", "question", "answer", "A", "B") if not (row.get(k) or "").strip()]
            if missing:
                problems.append(Problem(str(path), number, f"missing {', '.join(missing)}"))
                continue
            if not row["index"].strip().isdigit():
                problems.append(Problem(str(path), number, f"index must be an integer, found {row['index']!r}"))
                continue
            if int(row["index"]) >= COPY_OFFSET:
                self.copies_skipped += 1
                continue
            letters = [c for c in LETTERS if c in row and (row[c] or "").strip() and (row[c] or "").lower() != "nan"]
            answer = row["answer"].strip()
            if answer not in letters:
                problems.append(Problem(str(path), number, f"answer {answer!r} is not one of the options {letters}"))
                continue
            try:
                image = _image(row, by_index, path.parent)
            except Exception as exc:  # noqa: BLE001 - any undecodable picture is this record's problem
                problems.append(Problem(str(path), number, f"cannot read the image: {type(exc).__name__}: {exc}"))
                continue
            hint = (row.get("hint") or "").strip()
            hint = "" if hint.lower() == "nan" else hint
            texts = [row[c].strip() for c in letters]
            for k, (shown, right) in enumerate(rotations(texts, letters.index(answer), self.cfg.circular)):
                listing = "\n".join(f"{LETTERS[i]}. {text}" for i, text in enumerate(shown))
                question = (hint + "\n" if hint else "") + row["question"].strip() + "\n" + listing
                items.append(ask(f"{row['index']}/{k}", question, [image], LETTERS[right],
                                 group=(row.get("category") or "").strip(), prompt=self.cfg.prompt,
                                 unit=row["index"], rotation=k,
                                 options={LETTERS[i]: text for i, text in enumerate(shown)}))
        return TaskData(items, problems)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[str]) -> Scores:
        said = [mmbench_option(p, item.extra["options"]) for p, item in zip(predictions, items)]
        right = [s == item.reference for s, item in zip(said, items)]
        questions: dict[str, bool] = {}
        category: dict[str, str] = {}
        vanilla = []
        for ok, item in zip(right, items):
            key = item.unit
            questions[key] = questions.get(key, True) and ok
            category[key] = item.group
            if item.extra["rotation"] == 0:
                vanilla.append(ok)
        metrics: dict[str, float | int] = {
            "accuracy": sum(questions.values()) / len(questions) if questions else 0.0,
            "vanilla_accuracy": sum(vanilla) / len(vanilla) if vanilla else 0.0,
            "questions": len(questions), "circular_copies_skipped": self.copies_skipped,
        }
        for name in sorted(set(category.values())):
            keys = [k for k in questions if category[k] == name]
            metrics[f"category/{name}"] = sum(questions[k] for k in keys) / len(keys)
        return Scores(metrics, [ScoredSample(s, float(ok)) for s, ok in zip(said, right)])


def build(cfg: MmbenchConfig, ctx: BuildContext) -> MmbenchTask:
    return MmbenchTask(cfg)
