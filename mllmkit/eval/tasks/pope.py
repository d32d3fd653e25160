"""``pope``: POPE object-hallucination probes, yes/no questions about COCO val2014 images.

Reads POPE's own files: ``coco_pope_{split}.json`` for each split (adversarial, popular, random),
JSON lines ``{"question_id", "image", "text", "label"}``, from the ``data`` folder; images are looked
up in ``images`` (default: ``<data>/val2014``, else ``<data>`` itself). Answers are read as POPE's
``evaluate.py`` reads them (:func:`~mllmkit.eval.answers.pope_yes_no`) and scored per split with
"yes" as the positive class: accuracy, precision, recall, F1 and the share of "yes" answers; the
means over the splits are ``accuracy`` and ``f1``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

import attrs

from mllmkit.config import config
from mllmkit.errors import UserError
from mllmkit.eval.answers import pope_yes_no
from mllmkit.eval.task import (
    EvalItem,
    EvalTaskConfig,
    Problem,
    ScoredSample,
    Scores,
    TaskData,
    ask,
    find_file,
    read_json_lines,
)
from mllmkit.interfaces import BuildContext

__all__ = ["PopeConfig", "PopeTask", "binary_metrics"]

SPLITS = ("adversarial", "popular", "random")
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@config
class PopeConfig(EvalTaskConfig):
    """Options of ``pope``."""

    splits: list[str] = attrs.Factory(lambda: list(SPLITS))
    file_pattern: str = "coco_pope_{split}.json"
    images: pathlib.Path | None = None
    """Folder of the COCO val2014 images (default: <data>/val2014, else <data>)."""
    prompt: str = SHORT_ANSWER
    max_new_tokens: int = 8


def binary_metrics(truth: Sequence[str], said: Sequence[str]) -> dict[str, float | int]:
    """Accuracy, precision, recall, F1 and yes-ratio with "yes" positive (0 where a ratio has no denominator)."""
    tp = sum(t == "yes" and s == "yes" for t, s in zip(truth, said))
    fp = sum(t == "no" and s == "yes" for t, s in zip(truth, said))
    tn = sum(t == "no" and s == "no" for t, s in zip(truth, said))
    fn = sum(t == "yes" and s != "yes" for t, s in zip(truth, said))
    total = len(truth)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"accuracy": (tp + tn) / total if total else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(s == "yes" for s in said) / total if total else 0.0, "count": total}


class PopeTask:
    name = "pope"
    headline = "f1"

    def __init__(self, cfg: PopeConfig) -> None:
        self.cfg, self.max_new_tokens = cfg, cfg.max_new_tokens

    def _images(self) -> pathlib.Path | None:
        if self.cfg.images is not None:
            return self.cfg.images
        data = self.cfg.data
        if data is None:
            return None
        folder = data if data.is_dir() else data.parent
        return folder / "val2014" if (folder / "val2014").is_dir() else folder

    def load(self) -> TaskData:
        items: list[EvalItem] = []
        problems: list[Problem] = []
        images = self._images()
        if images is not None and not images.is_dir():
            raise UserError(f"eval task 'pope': the images folder {images} does not exist; give images = \"...\" "
                            f"(the COCO val2014 folder) in [[eval.tasks]] or put val2014/ beside the POPE files")
        for split in self.cfg.splits:
            path = find_file(self.cfg.data, self.cfg.file_pattern.format(split=split), "data", self.name)
            for index, record in read_json_lines(path, problems):
                missing = [k for k in ("question_id", "image", "text", "label") if k not in record]
                label = str(record.get("label", "")).strip().lower()
                if missing or label not in ("yes", "no"):
                    why = f"missing {', '.join(missing)}" if missing else f"label must be yes or no, found {label!r}"
                    problems.append(Problem(str(path), index, why))
                    continue
                image = images / str(record["image"]) if images is not None else pathlib.Path(record["image"])
                if not image.is_file():
                    problems.append(Problem(str(path), index, f"image not found: {image}"))
                    continue
                items.append(ask(f"{split}/{record['question_id']}", str(record["text"]), [image], label,
                                 group=split, prompt=self.cfg.prompt))
        return TaskData(items, problems)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[str]) -> Scores:
        said = [pope_yes_no(p) for p in predictions]
        metrics: dict[str, float | int] = {}
        for split in self.cfg.splits:
            rows = [i for i, item in enumerate(items) if item.group == split]
            if rows:
                for key, value in binary_metrics([items[i].reference for i in rows], [said[i] for i in rows]).items():
                    metrics[f"{split}/{key}"] = value
        present = [s for s in self.cfg.splits if f"{s}/count" in metrics]
        for key in ("accuracy", "f1"):
            metrics[key] = sum(metrics[f"{s}/{key}"] for s in present) / len(present) if present else 0.0
        samples = [ScoredSample(s, float(s == item.reference)) for s, item in zip(said, items)]
        return Scores(metrics, samples)


def build(cfg: PopeConfig, ctx: BuildContext) -> PopeTask:
    return PopeTask(cfg)
