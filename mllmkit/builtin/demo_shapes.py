"""``demo_shapes``: synthetic pictures of shapes with questions that need the image.

Each picture has one to three shapes of one kind (circle, square, triangle) and one colour (red,
green, blue, yellow) on a dark background; several shapes sit in different quadrants. Every shape is
1/4 to 2/5 of the picture wide, so each covers at least one 14-px patch of a 56-px encoder (smaller
ones were hard to count and to tell apart on that grid). Each sample asks one question: the colour,
the shape, how many shapes there are, or (one shape only) whether it is on the left or the right;
answers are one word. With ``questions_per_image`` > 1 the other questions that apply follow as a
multi-turn conversation about the same picture (more supervision per picture for training).
Everything is drawn with PIL from ``seed``, ``split`` and the sample index, so a dataset is
identical on every machine; the ``train`` and ``eval`` splits draw from separate random streams.
"""

from __future__ import annotations

import random
from typing import Literal

import attrs

from mllmkit.config import between, config, positive
from mllmkit.interfaces import BuildContext, Sample
from mllmkit.registry import ComponentSpec
from mllmkit.template import IMAGE_SPAN

__all__ = ["COLOURS", "QUESTIONS", "SHAPES", "SPECS", "DemoShapes", "DemoShapesConfig"]

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square", "triangle")
COUNTS = ("one", "two", "three")
QUESTIONS = {
    "colour": ("What colour are the shapes?", tuple(COLOURS)),
    "shape": ("What shape are they?", SHAPES),
    "count": ("How many shapes are there?", COUNTS),
    "position": ("Is the shape on the left or the right?", ("left", "right")),
}
"""Question kind → (question text, possible answers)."""


@config
class DemoShapesConfig:
    """Options of ``demo_shapes``."""

    split: Literal["train", "eval"] = "train"
    """Which random stream to draw from; the splits share no pictures."""
    size: int = attrs.field(default=2000, validator=positive)
    """Number of samples."""
    seed: int = 0
    image_size: int = attrs.field(default=64, validator=positive)
    """Side of the drawn picture in pixels (the encoder's transform resizes it)."""
    questions_per_image: int = attrs.field(default=1, validator=between(1, 4))
    """Questions asked about each picture, as a multi-turn conversation: the sample's own question
    first, then others that apply to the picture (position only when there is one shape)."""


class DemoShapes:
    """The synthetic shapes dataset (map-style, deterministic)."""

    def __init__(self, split: str = "train", size: int = 2000, seed: int = 0, image_size: int = 64,
                 questions_per_image: int = 1) -> None:
        self.name, self.split, self.size, self.seed = "demo_shapes", split, size, seed
        self.image_size, self.questions_per_image = image_size, questions_per_image
        self.source = f"demo_shapes:{split}"

    def __len__(self) -> int:
        return self.size

    def scene(self, index: int) -> dict:
        """The sample's content: shape kind, colour, count, boxes, question kind and answer."""
        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = random.Random(f"{self.seed}/{self.split}/{index}")
        kind, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        question = ("colour", "shape", "count", "position")[index % 4]
        count = 1 if question == "position" else rng.randint(1, 3)
        s = self.image_size
        smallest, largest = s // 8, s // 5  # half-sizes: every shape 1/4 to 2/5 of the picture wide
        boxes: list[tuple[int, int, int]] = []  # (cx, cy, half-size)
        if count == 1:
            side = rng.choice(("left", "right"))
            half = rng.randint(smallest, largest)
            cx = rng.randint(half + 1, s // 2 - half // 2 - 2)
            if side == "right":
                cx = s - cx
            boxes.append((cx, rng.randint(half + 1, s - half - 1), half))
        else:
            cells = rng.sample([(0, 0), (0, 1), (1, 0), (1, 1)], count)
            for row, col in cells:
                half = rng.randint(smallest, largest)
                cx = col * s // 2 + rng.randint(half + 1, s // 2 - half - 1)
                cy = row * s // 2 + rng.randint(half + 1, s // 2 - half - 1)
                boxes.append((cx, cy, half))
            side = None
        answer = {"colour": colour, "shape": kind, "count": COUNTS[count - 1], "position": side}[question]
        return {"kind": kind, "colour": colour, "count": count, "boxes": boxes, "question": question,
                "answer": answer}

    def draw(self, scene: dict):
        from PIL import Image, ImageDraw

        image = Image.new("RGB", (self.image_size, self.image_size), (30, 30, 30))
        pen = ImageDraw.Draw(image)
        fill = COLOURS[scene["colour"]]
        for cx, cy, h in scene["boxes"]:
            if scene["kind"] == "circle":
                pen.ellipse((cx - h, cy - h, cx + h, cy + h), fill=fill)
            elif scene["kind"] == "square":
                pen.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
            else:
                pen.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
        return image

    def questions(self, index: int, scene: dict) -> list[str]:
        """The question kinds asked about the picture: its own, then up to ``questions_per_image - 1``
        other kinds that apply, in an order drawn from the sample's seed."""
        others = [k for k in QUESTIONS if k != scene["question"] and (k != "position" or scene["count"] == 1)]
        random.Random(f"{self.seed}/{self.split}/{index}/questions").shuffle(others)
        return [scene["question"], *others][:self.questions_per_image]

    def __getitem__(self, index: int) -> Sample:
        scene = self.scene(index)
        messages = []
        for turn, kind in enumerate(self.questions(index, scene)):
            answer = {"colour": scene["colour"], "shape": scene["kind"], "count": COUNTS[scene["count"] - 1],
                      "position": scene["answer"] if kind == "position" else None}[kind]
            question = QUESTIONS[kind][0]
            messages += [{"role": "user", "content": f"{IMAGE_SPAN} {question}" if turn == 0 else question},
                         {"role": "assistant", "content": answer}]
        return Sample(images=[self.draw(scene)], messages=messages, source=self.source, index=index)

    def approx_length(self, index: int) -> int:
        return len(QUESTIONS[("colour", "shape", "count", "position")[index % 4]][0])

    def chance_accuracy(self) -> float:
        """Exact-match accuracy of guessing uniformly among each question's possible answers."""
        kinds = [("colour", "shape", "count", "position")[i % 4] for i in range(self.size)]
        return sum(1 / len(QUESTIONS[k][1]) for k in kinds) / len(kinds)


def _build(cfg: DemoShapesConfig, ctx: BuildContext) -> DemoShapes:
    return DemoShapes(cfg.split, cfg.size, cfg.seed, cfg.image_size, cfg.questions_per_image)


SPECS = [ComponentSpec("demo_shapes", DemoShapesConfig, _build,
                       "synthetic shapes (colour, shape, count, position questions) for the CPU demo")]
