"""Tiny benchmark files in their real layouts, for tests of evaluation tasks (here and in plugins)."""

from __future__ import annotations

import json
import pathlib

__all__ = ["picture", "write_pope"]


def picture(path: pathlib.Path, colour=(200, 30, 30)) -> pathlib.Path:
    """A tiny RGB picture written to ``path`` (format from its suffix)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def write_pope(folder: pathlib.Path) -> None:
    """POPE's three split files (8 usable questions; the random split adds 3 bad records) and val2014 images."""
    for i in range(4):
        picture(folder / "val2014" / f"COCO_val2014_{i:012d}.jpg")
    records = {
        "adversarial": [(1, 0, "yes"), (2, 1, "no"), (3, 2, "yes"), (4, 3, "no")],
        "popular": [(1, 0, "yes"), (2, 1, "no")],
        "random": [(1, 0, "no"), (2, 1, "yes")],
    }
    for split, rows in records.items():
        lines = [json.dumps({"question_id": q, "image": f"COCO_val2014_{i:012d}.jpg",
                             "text": f"Is there a thing {q}?", "label": label}) for q, i, label in rows]
        if split == "random":
            lines += ['{"question_id": 9, "image": "COCO_val2014_000000000000.jpg", "text": "Is there?"}',
                      "not json",
                      json.dumps({"question_id": 10, "image": "nope.jpg", "text": "?", "label": "yes"})]
        (folder / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
