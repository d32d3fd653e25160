"""Video samples and the per-sample picture budget: frames sampled uniformly, decoded with PyAV.

A video in a dataset record becomes a list of frames (PIL images) that the rest of the pipeline
treats as images: each frame gets the vision encoder's transform and its own image span in the text.
:func:`frame_indices` chooses which frames: ``num_frames`` spread evenly over the whole video
(first and last included, as LLaVA-Video's ``linspace``), or with ``fps`` one frame every
``1/fps`` seconds, thinned to ``num_frames`` evenly when there would be more. :func:`read_frames`
decodes them (the optional ``av`` package: ``pip install 'mllmkit[video]'``); a missing file, a
file FFmpeg cannot decode and a video without frames raise :class:`~mllmkit.data.errors.SampleError`
with the record's file and index, so ``[data] on_error`` skips and counts them like bad images.
:func:`check_budget` refuses a sample with more pictures (images plus frames) than its dataset allows.
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from mllmkit.data.errors import SampleError
from mllmkit.errors import UserError

__all__ = ["MISSING_VIDEO", "OVER_BUDGET", "UNREADABLE_VIDEO", "check_budget", "frame_indices", "read_frames"]

MISSING_VIDEO = "missing_video"
UNREADABLE_VIDEO = "unreadable_video"
OVER_BUDGET = "over_budget"


def frame_indices(total: int, num_frames: int, fps: float | None = None, video_fps: float | None = None) -> list[int]:
    """Indices of the frames to keep from a video of ``total`` frames (at most ``num_frames`` of them).

    Without ``fps`` (or when the video's own rate ``video_fps`` is unknown): ``num_frames`` evenly
    spaced from the first frame to the last, rounded down. With ``fps``: every ``video_fps / fps``-th
    frame from the first, then evenly thinned to ``num_frames`` if there are more.
    """
    if total <= 0 or num_frames <= 0:
        return []
    if fps and video_fps:
        step = video_fps / fps
        indices = sorted({int(k * step) for k in range(math.ceil(total / step))})
        if len(indices) <= num_frames:
            return indices
    count = min(num_frames, total)
    if count == 1:
        return [0]
    return [int(i * (total - 1) / (count - 1)) for i in range(count)]


def _av():
    try:
        import av
    except ImportError:
        raise UserError("video samples need PyAV, which is not installed: pip install 'mllmkit[video]'") from None
    return av


def read_frames(path: pathlib.Path, num_frames: int, fps: float | None, source: str, index: int) -> list[Any]:
    """The chosen frames of the video at ``path`` as PIL RGB images, in order."""
    av = _av()
    if not path.is_file():
        raise SampleError(MISSING_VIDEO, source, index, f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SampleError(UNREADABLE_VIDEO, source, index, f"{path} has no video stream")
            stream = container.streams.video[0]
            total = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
            wanted = set(frame_indices(total, num_frames, fps, float(stream.average_rate or 0)))
            frames = _decode(container, stream, wanted) if wanted else []
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise SampleError(UNREADABLE_VIDEO, source, index, f"cannot decode video {path}: {exc}") from None
    if not frames:
        raise SampleError(UNREADABLE_VIDEO, source, index, f"video {path} has no frames")
    return frames


def _decode(container: Any, stream: Any, wanted: set[int]) -> list[Any]:
    """Decode from the start, keeping the frames whose numbers are ``wanted``; stop after the last."""
    container.seek(0)
    frames = []
    for number, frame in enumerate(container.decode(stream)):
        if number in wanted:
            frames.append(frame.to_image().convert("RGB"))
            if len(frames) == len(wanted):
                break
    return frames


def check_budget(count: int, budget: int, source: str, index: int) -> None:
    """Refuse a sample of ``count`` pictures (images + video frames) over ``budget`` (the dataset's ``max_images``)."""
    if count > budget:
        raise SampleError(OVER_BUDGET, source, index, f"{count} images/frames, more than max_images = {budget}")
