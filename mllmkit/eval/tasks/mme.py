"""``mme``: the MME benchmark, two yes/no questions per image in 14 categories.

Reads the released layout (``MME_Benchmark_release_version``): one folder per category; either
``images/`` + ``questions_answers_YN/*.txt`` (artwork, celebrity, landmark, posters, scene) or each
image beside its ``.txt``. A txt file holds the image's questions, one ``question<TAB>Yes|No`` a line.
Scored as MME's ``eval_tool/calculation.py`` scores: answers read by
:func:`~mllmkit.eval.answers.mme_yes_no` (anything else is "other": wrong, listed as unparsed); per
category ``acc`` (% of questions right) and ``acc_plus`` (% of images with every question right),
its score the sum of both; ``perception`` and ``cognition`` sum their categories' scores.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import attrs

from mllmkit.config import config
from mllmkit.errors import UserError
from mllmkit.eval.answers import mme_yes_no
from mllmkit.eval.task import EvalItem, EvalTaskConfig, Problem, ScoredSample, Scores, TaskData, ask
from mllmkit.interfaces import BuildContext

__all__ = ["CATEGORIES", "MmeConfig", "MmeTask"]

CATEGORIES = {
    "perception": ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark",
                   "artwork", "OCR"),
    "cognition": ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning"),
}
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg")


@config
class MmeConfig(EvalTaskConfig):
    """Options of ``mme``."""

    categories: list[str] = attrs.Factory(lambda: [c for group in CATEGORIES.values() for c in group])
    prompt: str = "\nAnswer the question using a single word or phrase."
    max_new_tokens: int = 8


def _question_files(folder: pathlib.Path) -> tuple[list[pathlib.Path], pathlib.Path]:
    """The category's question files and the folder its images are in."""
    if (folder / "questions_answers_YN").is_dir():
        return sorted((folder / "questions_answers_YN").glob("*.txt")), folder / "images"
    return sorted(folder.glob("*.txt")), folder


class MmeTask:
    name = "mme"
    headline = "perception"

    def __init__(self, cfg: MmeConfig) -> None:
        self.cfg, self.max_new_tokens = cfg, cfg.max_new_tokens
        known = {c for group in CATEGORIES.values() for c in group}
        unknown = [c for c in cfg.categories if c not in known]
        if unknown:
            raise UserError(f"eval task 'mme': unknown categories {unknown}; MME's are {', '.join(sorted(known))}")

    def load(self) -> TaskData:
        data = self.cfg.data
        if data is None or not data.is_dir():
            raise UserError(f"eval task 'mme': the MME folder (MME_Benchmark_release_version) not found: looked for "
                            f"{data}; give it with --data PATH")
        items: list[EvalItem] = []
        problems: list[Problem] = []
        for category in self.cfg.categories:
            folder = data / category
            if not folder.is_dir():
                raise UserError(f"eval task 'mme': category folder not found: {folder}; give the MME release folder "
                                f"with --data, or list the categories you have (categories = [...])")
            files, image_dir = _question_files(folder)
            for path in files:
                image = next((image_dir / (path.stem + s) for s in IMAGE_SUFFIXES
                              if (image_dir / (path.stem + s)).is_file()), None)
                if image is None:
                    problems.append(Problem(str(path), 0, f"no image {path.stem}.jpg/.png in {image_dir}"))
                    continue
                for index, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
                    if not line.strip():
                        continue
                    parts = line.split("\t")
                    answer = parts[-1].strip().lower() if len(parts) == 2 else ""
                    if answer not in ("yes", "no"):
                        problems.append(Problem(str(path), index, "expected 'question<TAB>Yes|No', found "
                                                                  f"{line[:80]!r}"))
                        continue
                    items.append(ask(f"{category}/{image.name}/{index}", parts[0].strip(), [image], answer,
                                     group=category, prompt=self.cfg.prompt, unit=f"{category}/{image.name}"))
        return TaskData(items, problems)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[str]) -> Scores:
        said = [mme_yes_no(p) for p in predictions]
        right = [s == item.reference for s, item in zip(said, items)]
        metrics: dict[str, float | int] = {}
        for kind, categories in CATEGORIES.items():
            total = 0.0
            for category in categories:
                rows = [i for i, item in enumerate(items) if item.group == category]
                if not rows:
                    continue
                images: dict[str, bool] = {}
                for i in rows:
                    name = items[i].unit
                    images[name] = images.get(name, True) and right[i]
                acc = 100 * sum(right[i] for i in rows) / len(rows)
                acc_plus = 100 * sum(images.values()) / len(images)
                metrics.update({f"{category}/acc": acc, f"{category}/acc_plus": acc_plus,
                                f"{category}/score": acc + acc_plus,
                                f"{category}/other": sum(said[i] is None for i in rows)})
                total += acc + acc_plus
            metrics[kind] = total
        samples = [ScoredSample(s, float(ok)) for s, ok in zip(said, right)]
        return Scores(metrics, samples)


def build(cfg: MmeConfig, ctx: BuildContext) -> MmeTask:
    return MmeTask(cfg)
