"""``vqav2`` and ``textvqa``: open answers scored by VQA soft accuracy.

``vqav2`` reads the official pair of files in ``data``: ``v2_OpenEnded_mscoco_val2014_questions.json``
(``{"questions": [{"question_id", "image_id", "question"}]}``) and
``v2_mscoco_val2014_annotations.json`` (``{"annotations": [{"question_id", "answers": [{"answer"}],
"answer_type"}]}``), images ``val2014/COCO_val2014_{image_id:012d}.jpg``. ``textvqa`` reads
``TextVQA_0.5.1_val.json`` (``{"data": [{"question_id", "image_id", "question", "answers": [str]}]}``),
images ``train_images/{image_id}.jpg``. Every answer is scored by
:func:`~mllmkit.eval.answers.vqa_accuracy` (the official normalisation and leave-one-out soft
accuracy); ``accuracy`` is the mean, and VQAv2 also reports it per answer type.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence

from mllmkit.config import config
from mllmkit.eval.answers import vqa_accuracy, vqa_normalize
from mllmkit.eval.task import (
    EvalItem,
    EvalTaskConfig,
    Problem,
    ScoredSample,
    Scores,
    TaskData,
    ask,
    find_file,
    read_json,
)
from mllmkit.interfaces import BuildContext

__all__ = ["TextVqaConfig", "VqaTask", "Vqav2Config"]

SHORT_ANSWER = "\nAnswer the question using a single word or phrase."


@config
class Vqav2Config(EvalTaskConfig):
    """Options of ``vqav2`` (file and folder names are inside ``data``)."""

    questions: str = "v2_OpenEnded_mscoco_val2014_questions.json"
    annotations: str = "v2_mscoco_val2014_annotations.json"
    images: str = "val2014"
    image_name: str = "COCO_val2014_{image_id:012d}.jpg"
    prompt: str = SHORT_ANSWER


@config
class TextVqaConfig(EvalTaskConfig):
    """Options of ``textvqa`` (file and folder names are inside ``data``)."""

    annotations: str = "TextVQA_0.5.1_val.json"
    images: str = "train_images"
    image_name: str = "{image_id}.jpg"
    prompt: str = SHORT_ANSWER


def _records(path: pathlib.Path, key: str, problems: list[Problem]) -> Iterator[tuple[int, dict]]:
    document = read_json(path)
    records = document.get(key) if isinstance(document, dict) else None
    if not isinstance(records, list):
        problems.append(Problem(str(path), -1, f"expected a JSON object with a list under {key!r}"))
        return
    for index, record in enumerate(records):
        if isinstance(record, dict):
            yield index, record
        else:
            problems.append(Problem(str(path), index, f"expected an object, found {type(record).__name__}"))


class VqaTask:
    headline = "accuracy"

    def __init__(self, name: str, cfg: Vqav2Config | TextVqaConfig) -> None:
        self.name, self.cfg, self.max_new_tokens = name, cfg, cfg.max_new_tokens

    def _item(self, path: pathlib.Path, index: int, record: dict, humans, group: str,
              problems: list[Problem]) -> EvalItem | None:
        missing = [k for k in ("question_id", "image_id", "question") if k not in record]
        if missing or not isinstance(humans, list) or not humans:
            problems.append(Problem(str(path), index, f"missing {', '.join(missing) or 'answers'}"))
            return None
        image = self.cfg.data / self.cfg.images / self.cfg.image_name.format(image_id=record["image_id"])
        if not image.is_file():
            problems.append(Problem(str(path), index, f"image not found: {image}"))
            return None
        return ask(str(record["question_id"]), str(record["question"]), [image], [str(h) for h in humans],
                   group=group, prompt=self.cfg.prompt)

    def load(self) -> TaskData:
        problems: list[Problem] = []
        items: list[EvalItem] = []
        annotations = find_file(self.cfg.data, self.cfg.annotations, "annotations", self.name)
        if isinstance(self.cfg, Vqav2Config):
            questions = find_file(self.cfg.data, self.cfg.questions, "questions", self.name)
            answers = {r.get("question_id"): r for _, r in _records(annotations, "annotations", problems)}
            for index, record in _records(questions, "questions", problems):
                note = answers.get(record.get("question_id"), {})
                humans = [a.get("answer") for a in note.get("answers", []) if isinstance(a, dict)]
                item = self._item(questions, index, record, humans, str(note.get("answer_type", "")), problems)
                items += [item] if item else []
        else:
            for index, record in _records(annotations, "data", problems):
                item = self._item(annotations, index, record, record.get("answers"), "", problems)
                items += [item] if item else []
        return TaskData(items, problems)

    def score(self, items: Sequence[EvalItem], predictions: Sequence[str]) -> Scores:
        credit = [vqa_accuracy(p, item.reference) for p, item in zip(predictions, items)]
        metrics: dict[str, float | int] = {"accuracy": sum(credit) / len(credit) if credit else 0.0}
        for group in sorted({item.group for item in items if item.group}):
            rows = [c for c, item in zip(credit, items) if item.group == group]
            metrics[f"answer_type/{group}"] = sum(rows) / len(rows)
        return Scores(metrics, [ScoredSample(vqa_normalize(p), c) for p, c in zip(predictions, credit)])


def build_vqav2(cfg: Vqav2Config, ctx: BuildContext) -> VqaTask:
    return VqaTask("vqav2", cfg)


def build_textvqa(cfg: TextVqaConfig, ctx: BuildContext) -> VqaTask:
    return VqaTask("textvqa", cfg)
