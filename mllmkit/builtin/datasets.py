"""Built-in instruction datasets: the seed's ``minigpt4qwen_instruction`` JSON and LLaVA conversations.

Both read a JSON list of records (``annotations``) whose image paths are relative to ``images``.
Records are parsed when drawn, so a malformed record, a missing or unreadable image raises
:class:`~mllmkit.data.errors.SampleError` with the file and record index (the loader skips or fails
as ``[data] on_error`` says). The core's shared key ``weight`` sets how often a dataset is drawn per
epoch when several are mixed (see :func:`mllmkit.data.sampling.epoch_order`).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import attrs

from mllmkit.config import config, positive
from mllmkit.data.errors import MALFORMED_RECORD, SampleError
from mllmkit.data.video import check_budget, read_frames
from mllmkit.errors import UserError
from mllmkit.interfaces import BuildContext, Sample
from mllmkit.registry import ComponentSpec
from mllmkit.template import IMAGE_MARKER, IMAGE_SPAN

__all__ = [
    "SPECS",
    "InstructionConfig",
    "JsonAnnotations",
    "LlavaConfig",
    "LlavaConversations",
    "MiniGPT4QwenInstructions",
]


@config
class InstructionConfig:
    """Options of ``minigpt4qwen_instruction``."""

    annotations: pathlib.Path
    """JSON list of records with ``image``, ``instruction`` and ``output`` (strings or equal-length lists)."""
    images: pathlib.Path | None = None
    """Folder the records' image paths are relative to (unset: the annotation file's folder)."""
    max_samples: int | None = attrs.field(default=None, validator=positive)
    """Use only the first N records."""


@config
class LlavaConfig:
    """Options of ``llava_conversations``."""

    annotations: pathlib.Path
    """LLaVA JSON: records with ``image`` (optional) and ``conversations`` [{from: human|gpt, value}]."""
    images: pathlib.Path | None = None
    """Folder the records' image paths are relative to (unset: the annotation file's folder)."""
    max_samples: int | None = attrs.field(default=None, validator=positive)
    """Use only the first N records."""
    videos: pathlib.Path | None = None
    """Folder the records' ``video`` paths are relative to (unset: the ``images`` folder)."""
    num_frames: int = attrs.field(default=8, validator=positive)
    """Frames taken from a video, spread evenly from its first frame to its last."""
    fps: float | None = attrs.field(default=None, validator=positive)
    """Take a frame every 1/fps seconds instead (thinned evenly to ``num_frames`` when there are more)."""
    max_images: int = attrs.field(default=16, validator=positive)
    """Most images + video frames in one record; a record over it is skipped and counted (over_budget)."""


class JsonAnnotations:
    """A JSON list of records, each turned into a :class:`Sample` by :meth:`parse` when drawn."""

    def __init__(self, name: str, annotations: pathlib.Path, images: pathlib.Path | None,
                 max_samples: int | None = None) -> None:
        self.name = name
        self.source = str(annotations)
        if not annotations.is_file():
            raise UserError(f"{name}: annotation file not found: {annotations}; check `annotations` in the recipe")
        try:
            records = json.loads(annotations.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{annotations}: not valid JSON ({exc})") from None
        except RecursionError:
            raise UserError(f"{annotations}: not usable JSON (nested too deeply to read)") from None
        except OSError as exc:
            raise UserError(f"{annotations}: cannot read the annotation file ({exc.strerror or exc})") from None
        if not isinstance(records, list):
            raise UserError(f"{annotations}: expected a JSON list of records, found a {type(records).__name__}")
        self.records: list[Any] = records[:max_samples] if max_samples else records
        self.image_root = images if images is not None else annotations.parent

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        if not isinstance(record, dict):
            raise self.malformed(index, f"expected an object, found {type(record).__name__}")
        images, messages = self.parse(record, index)
        markers = sum(m["content"].count(IMAGE_MARKER) for m in messages if m["role"] == "user")
        if markers == 0 and images:
            first = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first] = {"role": "user", "content": IMAGE_SPAN * len(images) + " " + messages[first]["content"]}
        elif markers != len(images):
            raise self.malformed(index, f"{markers} {IMAGE_MARKER} marker(s) but {len(images)} image(s)")
        outside = [p for p in images if pathlib.PurePath(p).is_absolute() or ".." in pathlib.PurePath(p).parts]
        if outside:
            raise self.malformed(index, f"image path {outside[0]!r} leaves the image folder {self.image_root}; "
                                        f"name images relative to it, without '..'")
        paths = [self.image_root / p for p in images]
        return Sample(images=paths, messages=messages, source=self.source, index=index)

    def approx_length(self, index: int) -> int:
        """Characters of text (a cheap length for length-grouped batching, no image read)."""
        record = self.records[index]
        return len(json.dumps(record)) if isinstance(record, dict) else 0

    def malformed(self, index: int, detail: str) -> SampleError:
        return SampleError(MALFORMED_RECORD, self.source, index, detail)

    def parse(self, record: dict, index: int) -> tuple[list[str], list[dict]]:
        raise NotImplementedError

    def _image_list(self, record: dict, index: int) -> list[str]:
        image = record.get("image")
        if image is None:
            return []
        images = [image] if isinstance(image, str) else image
        if not isinstance(images, list) or not all(isinstance(i, str) and i for i in images):
            raise self.malformed(index, f"'image' must be a file name or a list of them, found {image!r}")
        return images


class MiniGPT4QwenInstructions(JsonAnnotations):
    """The seed's format: ``image``, ``instruction`` and ``output`` (strings or equal-length lists)."""

    def parse(self, record: dict, index: int) -> tuple[list[str], list[dict]]:
        if "video" in record:
            raise self.malformed(index, "video records are not supported")
        if "instruction" not in record or "output" not in record:
            missing = [k for k in ("instruction", "output") if k not in record]
            raise self.malformed(index, f"missing key(s) {', '.join(missing)}")
        instruction, output = record["instruction"], record["output"]
        if isinstance(instruction, str) and isinstance(output, str):
            instruction, output = [instruction], [output]
        if not (isinstance(instruction, list) and isinstance(output, list)) or len(instruction) != len(output) \
                or not instruction:
            raise self.malformed(index, "'instruction' and 'output' must both be strings or non-empty lists of "
                                        "equal length")
        if not all(isinstance(t, str) for t in [*instruction, *output]):
            raise self.malformed(index, "every instruction and output must be a string")
        messages: list[dict] = []
        for question, answer in zip(instruction, output):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return self._image_list(record, index), messages


_LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


class LlavaConversations(JsonAnnotations):
    """LLaVA's format: ``conversations`` from human/gpt; ``<image>`` becomes ``<Img><ImageHere></Img>``.

    ``image`` may be a list (one ``<image>`` marker per image, in order). A record with ``video``
    instead has one ``<video>`` (or ``<image>``) marker, or none (the frames then open the first
    question); it stands for the video's frames (:mod:`mllmkit.data.video`), one image span each.
    """

    def __init__(self, *args: Any, videos: pathlib.Path | None = None, num_frames: int = 8,
                 fps: float | None = None, max_images: int = 16, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.video_root = videos if videos is not None else self.image_root
        self.num_frames, self.fps, self.max_images = num_frames, fps, max_images

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        sample = self.video_sample(record, index) if isinstance(record, dict) and "video" in record \
            else super().__getitem__(index)
        check_budget(len(sample.images), self.max_images, self.source, index)
        return sample

    def video_sample(self, record: dict, index: int) -> Sample:
        video = record["video"]
        if "image" in record:
            raise self.malformed(index, "a record has 'image' or 'video', not both")
        if not isinstance(video, str) or not video or pathlib.PurePath(video).is_absolute() \
                or ".." in pathlib.PurePath(video).parts:
            raise self.malformed(index, f"'video' must be a file name inside the video folder, found {video!r}")
        _, messages = self.parse(record, index)
        markers = sum(m["content"].count(IMAGE_MARKER) for m in messages if m["role"] == "user")
        if markers > 1:
            raise self.malformed(index, f"{markers} {IMAGE_MARKER} markers but one video")
        frames = read_frames(self.video_root / video, self.num_frames, self.fps, self.source, index)
        spans = IMAGE_SPAN * len(frames)
        at = next(i for i, m in enumerate(messages) if m["role"] == "user" and (IMAGE_MARKER in m["content"] or not markers))
        content = messages[at]["content"]
        messages[at] = {"role": "user", "content": content.replace(IMAGE_SPAN, spans) if markers else f"{spans} {content}"}
        return Sample(images=frames, messages=messages, source=self.source, index=index)

    def parse(self, record: dict, index: int) -> tuple[list[str], list[dict]]:
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            raise self.malformed(index, "'conversations' must be a non-empty list")
        messages: list[dict] = []
        for turn_index, turn in enumerate(turns):
            if not isinstance(turn, dict) or turn.get("from") not in _LLAVA_ROLES \
                    or not isinstance(turn.get("value"), str):
                raise self.malformed(index, f"conversations[{turn_index}] must be {{from: human|gpt, value: str}}, "
                                            f"found {turn!r}")
            role = _LLAVA_ROLES[turn["from"]]
            if not messages and role == "assistant":
                continue  # like the seed: a conversation starts with the user
            text = turn["value"].replace("<video>", "<image>") if "video" in record else turn["value"]
            messages.append({"role": role, "content": text.replace("<image>", IMAGE_SPAN).strip()})
        if not any(m["role"] == "assistant" for m in messages):
            raise self.malformed(index, "no answer (gpt turn) after a human turn")
        return self._image_list(record, index), messages


def _build_instructions(cfg: InstructionConfig, ctx: BuildContext) -> MiniGPT4QwenInstructions:
    return MiniGPT4QwenInstructions("minigpt4qwen_instruction", cfg.annotations, cfg.images, cfg.max_samples)


def _build_llava(cfg: LlavaConfig, ctx: BuildContext) -> LlavaConversations:
    if cfg.num_frames > cfg.max_images:
        raise UserError(f"{ctx.key}.num_frames: {cfg.num_frames} frames per video is over max_images = "
                        f"{cfg.max_images}, so every video would be skipped; lower num_frames or raise max_images")
    return LlavaConversations("llava_conversations", cfg.annotations, cfg.images, cfg.max_samples,
                              videos=cfg.videos, num_frames=cfg.num_frames, fps=cfg.fps, max_images=cfg.max_images)


SPECS = [
    ComponentSpec("minigpt4qwen_instruction", InstructionConfig, _build_instructions,
                  "MiniGPT4Qwen's JSON (image, instruction, output)"),
    ComponentSpec("llava_conversations", LlavaConfig, _build_llava,
                  "LLaVA's JSON (image, conversations from human/gpt)"),
]
