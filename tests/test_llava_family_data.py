"""LLaVA data beyond one image: image lists, video frames (PyAV), text-only samples in the same batch,
the per-sample picture budget, and every bad input skipped and counted with its file and index."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from mllmkit.builtin.datasets import LlavaConfig, _build_llava
from mllmkit.data import Collator, EncodedDataset, EncodedSample, SampleEncoder, Skip, SkipReport
from mllmkit.data.video import frame_indices, read_frames
from mllmkit.errors import UserError
from mllmkit.interfaces import BuildContext
from mllmkit.template import IGNORE_INDEX, IMAGE_SPAN
from mllmkit.testing.toy import ByteTokenizer, ToyTemplate

av = pytest.importorskip("av", reason="video samples need PyAV: pip install 'mllmkit[video]'")

TOKENS_PER_IMAGE = 3
COLOURS = [(20 * i, 255 - 20 * i, 100) for i in range(12)]


def write_video(path, colours=COLOURS, rate: int = 12):
    """An mp4 (MPEG-4 part 2) of one solid colour per frame, 32×32 px at ``rate`` frames a second."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "1"}
        for colour in colours:
            frame = av.VideoFrame.from_image(Image.new("RGB", (32, 32), colour))
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return path


def _dataset(tmp_path, records, **options):
    for name, colour in (("a.png", (250, 0, 0)), ("b.png", (0, 250, 0)), ("c.png", (0, 0, 250))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    annotations = tmp_path / "data.json"
    annotations.write_text(json.dumps(records))
    return _build_llava(LlavaConfig(annotations=annotations, **options), BuildContext(key="data.train[0]"))


def _encoder():
    mean_colour = lambda image: torch.tensor(image.resize((1, 1)).getpixel((0, 0)), dtype=torch.float32)  # noqa: E731
    return SampleEncoder(ToyTemplate(ByteTokenizer()), TOKENS_PER_IMAGE, mean_colour, max_len=2000)


def _turns(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def test_image_lists_video_and_text_only_samples_collate_into_one_batch(tmp_path):
    write_video(tmp_path / "clip.mp4")
    records = [
        {"image": ["a.png", "b.png"], "conversations": _turns("<image> left, <image> right: which is red?", "left")},
        {"video": "clip.mp4", "conversations": _turns("<video>\nWhat changes?", "the colour")},
        {"conversations": _turns("No picture here.", "fine")},
    ]
    dataset = _dataset(tmp_path, records, num_frames=4)
    encoder = _encoder()
    samples = [encoder(dataset[i]) for i in range(3)]
    assert [len(s.pixels) for s in samples] == [2, 4, 0]
    # the image list keeps its order: red first, then green
    assert samples[0].pixels[0][0] > 200 and samples[0].pixels[1][1] > 200
    # frames 0, 3, 7, 11 of 12 (evenly from first to last), decoded in order
    for pixel, index in zip(samples[1].pixels, [0, 3, 7, 11]):
        assert torch.allclose(pixel, torch.tensor(COLOURS[index], dtype=torch.float32), atol=12)
    assert dataset[1].messages[0]["content"] == IMAGE_SPAN * 4 + "\nWhat changes?"

    batch = Collator(ByteTokenizer().special_ids["<pad>"])(samples)
    image_id = ToyTemplate(ByteTokenizer()).image_token_id
    assert batch.pixels.shape == (6, 3)
    assert (batch.input_ids == image_id).sum(dim=1).tolist() == [2 * TOKENS_PER_IMAGE, 4 * TOKENS_PER_IMAGE, 0]
    assert (batch.labels[batch.input_ids == image_id] == IGNORE_INDEX).all()
    # labelled: each answer's bytes and its <end>, nothing else (the toy template's mask)
    labelled = (batch.labels != IGNORE_INDEX).sum(dim=1).tolist()
    assert labelled == [len("left") + 1, len("the colour") + 1, len("fine") + 1]
    assert batch.num_tokens == sum(labelled)
    end = ByteTokenizer().special_ids["<end>"]
    for row, answer in enumerate(["left", "the colour", "fine"]):
        assert batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist() == [*answer.encode(), end]


def test_a_video_without_marker_opens_the_first_question(tmp_path):
    write_video(tmp_path / "clip.mp4")
    dataset = _dataset(tmp_path, [{"video": "clip.mp4", "conversations": _turns("What happens?", "nothing")}],
                       num_frames=2)
    assert dataset[0].messages[0]["content"] == IMAGE_SPAN * 2 + " What happens?"


def test_frame_choice_by_count_and_by_rate(tmp_path):
    assert frame_indices(12, 4) == [0, 3, 7, 11]
    assert frame_indices(3, 8) == [0, 1, 2]  # never more frames than the video has
    assert frame_indices(12, 8, fps=4, video_fps=12) == [0, 3, 6, 9]  # one every 1/4 s of a 12 fps video
    assert frame_indices(12, 2, fps=4, video_fps=12) == [0, 11]  # too many at that rate: evenly thinned
    assert frame_indices(12, 4, fps=4, video_fps=0) == [0, 3, 7, 11]  # rate unknown: evenly
    frames = read_frames(write_video(tmp_path / "v.mp4"), 8, 4.0, "data.json", 0)
    assert len(frames) == 4
    for frame, index in zip(frames, [0, 3, 6, 9]):
        assert all(abs(a - b) <= 12 for a, b in zip(frame.getpixel((16, 16)), COLOURS[index]))


def _no_frames(path):
    """A container whose header declares a video stream, with no frame in it (AVI keeps the stream, mp4 does not)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=12)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        container.start_encoding()
    return path


BAD = [
    ("undecodable", {"video": "junk.mp4", "conversations": _turns("<video> what?", "x")},
     "unreadable_video", r"cannot decode video .*junk\.mp4"),
    ("no frames", {"video": "empty.avi", "conversations": _turns("<video> what?", "x")},
     "unreadable_video", r"video .*empty\.avi has no frames"),
    ("no video stream", {"video": "empty.mp4", "conversations": _turns("<video> what?", "x")},
     "unreadable_video", r"empty\.mp4 has no video stream"),
    ("missing", {"video": "gone.mp4", "conversations": _turns("<video> what?", "x")},
     "missing_video", r"video not found: .*gone\.mp4"),
    ("more images than markers", {"image": ["a.png", "b.png"], "conversations": _turns("<image> which?", "x")},
     "malformed_record", r"1 <ImageHere> marker\(s\) but 2 image\(s\)"),
    ("more markers than images", {"image": ["a.png"], "conversations": _turns("<image> <image> which?", "x")},
     "malformed_record", r"2 <ImageHere> marker\(s\) but 1 image\(s\)"),
    ("over the budget", {"image": ["a.png", "b.png", "c.png"], "conversations": _turns("which?", "x")},
     "over_budget", r"3 images/frames, more than max_images = 2"),
    ("two markers for a video", {"video": "ok.mp4", "conversations": _turns("<video> and <image>?", "x")},
     "malformed_record", r"2 <ImageHere> markers but one video"),
    ("image and video", {"video": "ok.mp4", "image": "a.png", "conversations": _turns("<video>?", "x")},
     "malformed_record", r"a record has 'image' or 'video', not both"),
    ("video outside its folder", {"video": "../ok.mp4", "conversations": _turns("<video>?", "x")},
     "malformed_record", r"'video' must be a file name inside the video folder, found '\.\./ok\.mp4'"),
]


@pytest.mark.parametrize(("record", "cause", "detail"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_skipped_and_counted_with_file_and_index(tmp_path, record, cause, detail):
    (tmp_path / "junk.mp4").write_bytes(b"\x00\x01 not a video " * 64)
    _no_frames(tmp_path / "empty.avi")
    _no_frames(tmp_path / "empty.mp4")
    write_video(tmp_path / "ok.mp4")
    good = {"image": "a.png", "conversations": _turns("<image> colour?", "red")}
    dataset = _dataset(tmp_path, [good, record], max_images=2, num_frames=2)
    encoded = EncodedDataset([dataset], _encoder(), on_error="skip")
    assert isinstance(encoded[(0, 0, 0)], EncodedSample)
    skip = encoded[(0, 1, 0)]
    assert isinstance(skip, Skip)
    assert (skip.cause, skip.source, skip.index) == (cause, str(tmp_path / "data.json"), 1)
    assert re.search(detail, skip.detail), skip.detail
    report = SkipReport()
    report.add([skip])
    assert report.counts() == {cause: 1}
    assert report.lines()[0].startswith(f"{tmp_path / 'data.json'} record 1: ")


def test_more_frames_than_the_budget_is_refused_when_built(tmp_path):
    with pytest.raises(UserError, match=r"data\.train\[0\]\.num_frames: 8 frames per video is over max_images = 4, "
                                        r"so every video would be skipped; lower num_frames or raise max_images"):
        _dataset(tmp_path, [], num_frames=8, max_images=4)
