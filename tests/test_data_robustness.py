"""No image or record ends a run: every bad picture kind Pillow can meet, bad paths, answers that
place images, records the template rejects and over-long text are skipped and counted with their
file and index (or, with on_error = "fail", stop the run with the same one line from a worker as
from the main process)."""

from __future__ import annotations

import io
import json
import pickle
import struct
import textwrap
import zlib

import pytest

from mllmkit.data import (
    MAX_IMAGE_PIXELS,
    Collator,
    EncodedDataset,
    SampleEncoder,
    SampleError,
    load_micro_batches,
    read_image,
)
from mllmkit.data.images import ImageMissing, ImageUnreadable
from mllmkit.errors import DataError
from mllmkit.interfaces import Sample
from mllmkit.template import IMAGE_SPAN
from mllmkit.testing.toy import TOY_MODEL_TOML, ByteTokenizer, ToyTemplate

LIMIT = f"more pixels than the limit of {MAX_IMAGE_PIXELS} (mllmkit.data.images.MAX_IMAGE_PIXELS)"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(width: int, height: int, middle: bytes | None = None) -> bytes:
    rows = zlib.compress(b"".join(b"\0" + bytes(range(24)) for _ in range(8)))
    data = _chunk(b"IDAT", rows) if middle is None else _chunk(b"IDAT", rows[:10]) + _chunk(middle, rows[10:])
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + data
            + _chunk(b"IEND", b""))


def _bmp(width: int, height: int) -> bytes:
    return struct.pack("<2sIHHI", b"BM", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0,
                                                                     0, 0, 0, 0)


def _tiff(width: int, height: int) -> bytes:
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, width * height)]
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + struct.pack("<I", 0)
    return b"II*\0" + struct.pack("<I", 8) + ifd


def _good_png(colour=(10, 20, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, "PNG")
    return buffer.getvalue()


LONG_NAME = "x" * 300 + ".png"

# file name → (bytes, cause, the message after "{path}" / the whole message)
BAD_IMAGES = {
    "bomb.png": (_png(30000, 30000), "unreadable_image", f"cannot read image {{path}}: its header declares {LIMIT}"),
    "big.png": (_png(9000, 9000), "unreadable_image",
                f"cannot read image {{path}}: its header declares 9000×9000 pixels, more than the limit of "
                f"{MAX_IMAGE_PIXELS} (mllmkit.data.images.MAX_IMAGE_PIXELS)"),
    "chunk.png": (_png(8, 8, middle=b"\x01\x02\x03\x04"), "unreadable_image",
                  "cannot read image {path}: broken PNG file (chunk b'\\x01\\x02\\x03\\x04')"),
    "huge.bmp": (_bmp(20000, 20000), "unreadable_image", f"cannot read image {{path}}: its header declares {LIMIT}"),
    "huge.tif": (_tiff(20000, 20000), "unreadable_image", f"cannot read image {{path}}: its header declares {LIMIT}"),
    "cut.png": (_good_png()[:40], "unreadable_image", "cannot read image {path}: cannot identify image file '{path}'"),
    "empty.png": (b"", "unreadable_image", "cannot read image {path}: cannot identify image file '{path}'"),
    LONG_NAME: (None, "missing_image", None),
    "absent.png": (None, "missing_image", "image not found: {path}"),
}


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name, (data, _, _) in BAD_IMAGES.items():
        if data is not None:
            (folder / name).write_bytes(data)
    (folder / "good.png").write_bytes(_good_png())
    (folder / "red.png").write_bytes(_good_png((200, 0, 0)))
    return folder


@pytest.mark.parametrize("name", list(BAD_IMAGES), ids=[n[:12] for n in BAD_IMAGES])
def test_every_bad_image_is_one_user_error(image_dir, name):
    _, cause, message = BAD_IMAGES[name]
    path = image_dir / name
    with pytest.raises(ImageMissing if cause == "missing_image" else ImageUnreadable) as info:
        read_image(path)
    if name == LONG_NAME:
        assert str(info.value) == (f"image not found: {str(path)[:60]}…{str(path)[-60:]} "
                                   f"({len(str(path))} characters) (File name too long)")
    else:
        assert str(info.value) == message.format(path=path)


def test_sample_error_survives_pickling():
    error = SampleError("unreadable_image", "ann.json", 7, "cannot read image x.png: broken")
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is SampleError and str(again) == str(error)
    assert (again.cause, again.source, again.index, again.detail) == (error.cause, "ann.json", 7, error.detail)


def _encoder(template=None, max_len=200):
    import torch

    return SampleEncoder(template or ToyTemplate(ByteTokenizer()), 2,
                         lambda image: torch.tensor(image.getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1),
                         max_len)


class _StrictTemplate(ToyTemplate):
    """A template that, like ChatML's, refuses a system message after the first one."""

    def pieces(self, messages, tokens_per_image, **kwargs):
        for index, message in enumerate(messages):
            if index > 0 and message["role"] == "system":
                raise DataError(f"message {index}: role must be 'user' or 'assistant' after the first message")
        return super().pieces(messages, tokens_per_image, **kwargs)


def test_template_rejections_and_overlong_text_are_data_errors():
    user, answer = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}
    late_system = Sample(images=[], messages=[user, {"role": "system", "content": "be brief"}, answer],
                         source="llava.json", index=4)
    view = EncodedDataset([[late_system]], _encoder(_StrictTemplate(ByteTokenizer())))
    skip = view[(0, 0, 0)]
    assert (skip.cause, skip.source, skip.index) == ("malformed_record", "llava.json", 4)
    assert skip.error().args[0] == ("llava.json record 4: message 1: role must be 'user' or 'assistant' after the "
                                    "first message (malformed_record)")
    long_question = Sample(images=[], messages=[{"role": "user", "content": "q" * 100_000}, answer],
                           source="a.json", index=2)
    skip = EncodedDataset([[long_question]], _encoder(max_len=64))[(0, 0, 0)]
    assert (skip.cause, skip.detail) == ("too_long", "no answer token is left within max_text_len=64 (the "
                                                     "conversation needs 100007 tokens)")


def _records(images):
    """Good records 0, 1, 14 (and their index list) among every kind of bad one."""
    records = [
        {"image": "good.png", "instruction": "What is it?", "output": "a square"},                     # 0 good
        {"image": "red.png", "instruction": "Colour?", "output": "red"},                               # 1 good
        *({"image": name, "instruction": "Hm?", "output": "x"} for name in BAD_IMAGES),                # 2-10
        {"image": "../images/good.png", "instruction": "Up?", "output": "x"},                         # 11
        {"image": str(images / "good.png"), "instruction": "Absolute?", "output": "x"},                 # 12
        {"image": "good.png", "instruction": "Where?", "output": f"here {IMAGE_SPAN}"},                # 13
        {"instruction": "Text only?", "output": "fine"},                                               # 14 good
        {"instruction": "w" * 100_000, "output": "lost"},                                             # 15
    ]
    return records, [0, 1, 14]


def _expected_skips(annotations, images):
    rows = [(i + 2, cause, (message or "").format(path=images / name))
            for i, (name, (_, cause, message)) in enumerate(BAD_IMAGES.items())]
    long_path = str(images / LONG_NAME)
    rows[list(BAD_IMAGES).index(LONG_NAME)] = (
        2 + list(BAD_IMAGES).index(LONG_NAME), "missing_image",
        f"image not found: {long_path[:60]}…{long_path[-60:]} ({len(long_path)} characters) (File name too long)")
    rows += [
        (11, "malformed_record", f"image path '../images/good.png' leaves the image folder {images}; name images "
                                 f"relative to it, without '..'"),
        (12, "malformed_record", f"image path '{images / 'good.png'}' leaves the image folder {images}; name images "
                                 f"relative to it, without '..'"),
        (13, "malformed_record", "an <ImageHere> marker in a assistant turn; only user turns may place images"),
        (15, "too_long", "no answer token is left within max_text_len=64 (the conversation needs 100008 tokens)"),
    ]
    return [{"cause": c, "source": str(annotations), "index": i, "detail": d} for i, c, d in rows]


def test_bad_records_are_dropped_and_good_ones_kept(core_plugin_host, image_dir, tmp_path):
    from mllmkit.assemble import build

    records, good = _records(image_dir)
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps(records))
    dataset = build("dataset", "minigpt4qwen_instruction", annotations=str(annotations), images=str(image_dir))
    view = EncodedDataset([dataset], _encoder(max_len=64))
    draws = [[(0, i, 0), (0, i + 1, 0)] for i in range(0, len(records), 2)]
    batches = list(load_micro_batches(view, draws, Collator(256), num_workers=0, seed=0))
    assert sum(b.size for b in batches) == len(good)
    skips = sorted(({"cause": s.cause, "source": s.source, "index": s.index, "detail": s.detail}
                    for b in batches for s in b.skips), key=lambda s: s["index"])
    assert skips == _expected_skips(annotations, image_dir)


RECIPE = TOY_MODEL_TOML + """
[[data.train]]
type = "minigpt4qwen_instruction"
annotations = "ann.json"
images = "images"

[data]
on_error = "{on_error}"
num_workers = {workers}

[train]
precision = "fp32"
device = "cpu"
micro_batch_size = {batch}
max_text_len = 64
log_every = 1
tensorboard = false
"""


def _recipe(tmp_path, records, on_error="skip", workers=0, batch=2):
    (tmp_path / "ann.json").write_text(json.dumps(records))
    path = tmp_path / f"{on_error}{workers}.toml"
    path.write_text(textwrap.dedent(RECIPE.format(on_error=on_error, workers=workers, batch=batch)))
    return path


@pytest.mark.slow
def test_a_run_over_every_bad_kind_completes_and_reports_each(core_plugin_host, image_dir, tmp_path, capsys):
    from mllmkit.cli import main

    records, good = _records(image_dir)
    recipe = _recipe(tmp_path, records, batch=len(records))  # one step: no micro-batch is all bad
    assert main(["run", str(recipe), "--output-dir", str(tmp_path / "run")]) == 0
    written = [json.loads(line) for line in (tmp_path / "run/skipped.jsonl").read_text().splitlines()]
    assert written == _expected_skips(tmp_path / "ann.json", image_dir)
    err = capsys.readouterr().err
    assert "skipped 13 record(s): malformed_record 3, missing_image 2, too_long 1, unreadable_image 7\n" in err
    assert (tmp_path / "run/export/trainable.safetensors").is_file()


@pytest.mark.slow
def test_worker_and_main_process_fail_with_the_same_line(core_plugin_host, image_dir, tmp_path, capsys):
    from mllmkit.cli import main

    records = [{"image": "good.png", "instruction": "ok?", "output": "ok"}] * 3
    records.insert(1, {"image": "chunk.png", "instruction": "Hm?", "output": "x"})
    messages = []
    for workers in (0, 2):
        recipe = _recipe(tmp_path, records, on_error="fail", workers=workers)
        assert main(["run", str(recipe), "--output-dir", str(tmp_path / f"run{workers}")]) == 2
        messages += [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    expected = (f"mllmkit: error: {tmp_path / 'ann.json'} record 1: cannot read image {image_dir / 'chunk.png'}: "
                f"broken PNG file (chunk b'\\x01\\x02\\x03\\x04') (unreadable_image)")
    assert messages == [expected, expected]
