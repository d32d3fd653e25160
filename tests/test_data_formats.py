"""The built-in dataset formats: good records become the expected conversations, broken ones are
skipped with their cause, file and record index (or stop the run with on_error = "fail")."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mllmkit.assemble import build
from mllmkit.data import Collator, EncodedDataset, SampleEncoder, SampleError, SkipReport, load_micro_batches
from mllmkit.errors import RecipeError
from mllmkit.template import IMAGE_SPAN
from mllmkit.testing.toy import ByteTokenizer, ToyTemplate


def _png(path, colour=(10, 20, 30)):
    from PIL import Image

    Image.new("RGB", (8, 8), colour).save(path)
    return path.name


def _encoder(max_len=200, tokens_per_image=2):
    return SampleEncoder(ToyTemplate(ByteTokenizer()), tokens_per_image,
                         lambda image: torch.tensor(image.getpixel((0, 0)), dtype=torch.float32).view(3, 1, 1),
                         max_len)


@pytest.fixture
def minigpt4_files(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    _png(images / "a.png")
    _png(images / "b.png", (200, 0, 0))
    (images / "broken.png").write_bytes(b"not a png at all")
    records = [
        {"image": "a.png", "instruction": f"{IMAGE_SPAN} What is it?", "output": "A square."},       # 0 good
        {"image": "b.png", "instruction": [f"{IMAGE_SPAN} Colour?", "Sure?"], "output": ["red", "yes"]},  # 1 good
        {"image": "missing.png", "instruction": f"{IMAGE_SPAN} Hi", "output": "x"},                 # 2 missing
        {"image": "broken.png", "instruction": f"{IMAGE_SPAN} Hi", "output": "x"},                  # 3 unreadable
        {"image": "a.png", "instruction": ["q1", "q2"], "output": ["only one"]},                     # 4 malformed
        {"image": "a.png", "output": "no instruction"},                                             # 5 malformed
        "just a string",                                                                            # 6 malformed
        {"image": ["a.png", "b.png"], "instruction": f"{IMAGE_SPAN}{IMAGE_SPAN} Same?", "output": "no"},  # 7 two images
        {"image": "a.png", "instruction": "No marker here", "output": "ok"},                         # 8 marker added
        {"image": ["a.png", "b.png"], "instruction": f"{IMAGE_SPAN} one marker", "output": "x"},     # 9 malformed
    ]
    annotations = tmp_path / "ann.json"
    annotations.write_text(json.dumps(records))
    return annotations, images


def test_minigpt4qwen_good_records(plugin_host, minigpt4_files):
    annotations, images = minigpt4_files
    dataset = build("dataset", "minigpt4qwen_instruction", annotations=str(annotations), images=str(images))
    assert len(dataset) == 10
    first = dataset[1]
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert [m["content"] for m in first.messages] == [f"{IMAGE_SPAN} Colour?", "red", "Sure?", "yes"]
    assert first.images == [images / "b.png"] and first.source == str(annotations) and first.index == 1
    assert dataset[7].images == [images / "a.png", images / "b.png"]
    assert dataset[8].messages[0]["content"] == f"{IMAGE_SPAN} No marker here"


def test_minigpt4qwen_broken_records_are_skipped_and_counted(plugin_host, minigpt4_files):
    annotations, images = minigpt4_files
    dataset = build("dataset", "minigpt4qwen_instruction", annotations=str(annotations), images=str(images))
    view = EncodedDataset([dataset], _encoder(), on_error="skip")
    batch = Collator(pad_token_id=256)([view[(0, i, 0)] for i in range(len(dataset))])
    report = SkipReport()
    report.add(batch.skips)
    assert batch.size == 4  # records 0, 1, 7, 8
    assert batch.pixels.shape == (5, 3, 1, 1)  # 1 + 1 + 2 + 1 images, in order
    assert batch.pixels[:, 0, 0, 0].tolist() == [10, 200, 10, 200, 10]
    assert report.counts() == {"missing_image": 1, "unreadable_image": 1, "malformed_record": 4}
    assert sorted((s.index, s.cause) for s in report.seen.values()) == [
        (2, "missing_image"), (3, "unreadable_image"), (4, "malformed_record"), (5, "malformed_record"),
        (6, "malformed_record"), (9, "malformed_record")]
    assert all(s.source == str(annotations) for s in report.seen.values())
    lines = report.lines()
    assert lines[0].startswith(f"{annotations} record 2: image not found: {images / 'missing.png'}")
    assert f"{annotations} record 9: 1 <ImageHere> marker(s) but 2 image(s) (malformed_record)" in lines


def test_on_error_fail_stops_with_file_and_index(plugin_host, minigpt4_files):
    annotations, images = minigpt4_files
    dataset = build("dataset", "minigpt4qwen_instruction", annotations=str(annotations), images=str(images))
    view = EncodedDataset([dataset], _encoder(), on_error="fail")
    batches = load_micro_batches(view, [[(0, 0, 0)], [(0, 3, 0)], [(0, 1, 0)]], Collator(256), 0, seed=0)
    assert next(batches).size == 1
    with pytest.raises(SampleError) as info:
        next(batches)
    assert str(info.value).startswith(f"{annotations} record 3: cannot read image {images / 'broken.png'}")
    assert info.value.cause == "unreadable_image"


def test_sample_too_long_to_keep_its_image_is_skipped(plugin_host, minigpt4_files):
    annotations, images = minigpt4_files
    dataset = build("dataset", "minigpt4qwen_instruction", annotations=str(annotations), images=str(images))
    view = EncodedDataset([dataset], _encoder(max_len=6, tokens_per_image=4), on_error="skip")
    skip = view[(0, 0, 0)]
    assert skip.cause == "too_long" and skip.index == 0
    assert "max_text_len=6" in skip.detail


def test_llava_conversations(plugin_host, tmp_path):
    _png(tmp_path / "x.png")
    records = [
        {"id": "1", "image": "x.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "A cat."},
            {"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "Black."}]},
        {"id": "2", "conversations": [{"from": "gpt", "value": "dropped"}, {"from": "human", "value": "Hi"},
                                      {"from": "gpt", "value": "Hello"}]},
        {"id": "3", "image": "x.png", "conversations": [{"from": "robot", "value": "?"}]},
        {"id": "4", "image": "x.png", "conversations": [{"from": "human", "value": "<image> only a question"}]},
        {"id": "5", "image": "x.png", "conversations": []},
    ]
    annotations = tmp_path / "llava.json"
    annotations.write_text(json.dumps(records))
    dataset = build("dataset", "llava_conversations", annotations=str(annotations))
    sample = dataset[0]
    assert sample.images == [tmp_path / "x.png"]
    assert sample.messages == [{"role": "user", "content": f"{IMAGE_SPAN}\nWhat is this?"},
                               {"role": "assistant", "content": "A cat."},
                               {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Black."}]
    assert dataset[1].messages == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert dataset[1].images == []
    view = EncodedDataset([dataset], _encoder(), on_error="skip")
    causes = {i: getattr(view[(0, i, 0)], "cause", None) for i in range(5)}
    assert causes == {0: None, 1: None, 2: "malformed_record", 3: "malformed_record", 4: "malformed_record"}
    assert "conversations[0] must be {from: human|gpt, value: str}" in view[(0, 2, 0)].detail


def test_annotation_file_errors(plugin_host, tmp_path):
    from mllmkit.errors import UserError

    with pytest.raises(UserError, match="annotation file not found"):
        build("dataset", "llava_conversations", annotations=str(tmp_path / "nope.json"))
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(UserError, match="expected a JSON list of records, found a dict"):
        build("dataset", "minigpt4qwen_instruction", annotations=str(tmp_path / "obj.json"))


def test_demo_shapes_is_deterministic_and_splits_differ(plugin_host):
    from mllmkit.builtin.demo_shapes import QUESTIONS

    train = build("dataset", "demo_shapes", split="train", size=40, image_size=32)
    again = build("dataset", "demo_shapes", split="train", size=40, image_size=32)
    held_out = build("dataset", "demo_shapes", split="eval", size=40, image_size=32)
    a, b = train[5], again[5]
    assert a.messages == b.messages and a.images[0].tobytes() == b.images[0].tobytes()
    assert a.images[0].size == (32, 32)
    assert all(train[i].images[0].tobytes() != held_out[i].images[0].tobytes() for i in range(40))
    for i in range(40):
        sample, scene = train[i], train.scene(i)
        text, answers = QUESTIONS[scene["question"]]
        assert sample.messages[0]["content"] == f"{IMAGE_SPAN} {text}"
        assert sample.messages[1]["content"] in answers
        # the answer is visible in the picture: the shape's colour is in it, and position matches
        pixels = torch.from_numpy(np.asarray(sample.images[0])).long()
        from mllmkit.builtin.demo_shapes import COLOURS
        coloured = (pixels == torch.tensor(COLOURS[scene["colour"]]).long()).all(-1)
        assert coloured.any()
        if scene["question"] == "position":
            cols = coloured.nonzero()[:, 1].float().mean()
            assert (cols < 16) == (scene["answer"] == "left")
    # chance: 1/4 colour, 1/3 shape, 1/3 count, 1/2 position, questions in equal shares
    assert train.chance_accuracy() == pytest.approx((1 / 4 + 1 / 3 + 1 / 3 + 1 / 2) / 4)


def test_demo_shapes_several_questions_per_image(plugin_host):
    """``questions_per_image``: the sample's own question first (same picture, same answer), then
    other kinds that apply — position only for one shape — each answered from the scene."""
    from mllmkit.builtin.demo_shapes import COUNTS, QUESTIONS

    single = build("dataset", "demo_shapes", split="train", size=40, image_size=32)
    multi = build("dataset", "demo_shapes", split="train", size=40, image_size=32, questions_per_image=4)
    text_to_kind = {text: kind for kind, (text, _) in QUESTIONS.items()}
    for i in range(40):
        one, many, scene = single[i], multi[i], multi.scene(i)
        assert many.images[0].tobytes() == one.images[0].tobytes()
        assert many.messages[:2] == one.messages
        assert [m["role"] for m in many.messages] == ["user", "assistant"] * (len(many.messages) // 2)
        kinds = [text_to_kind[m["content"].removeprefix(f"{IMAGE_SPAN} ")] for m in many.messages[::2]]
        assert sum(IMAGE_SPAN in m["content"] for m in many.messages) == 1
        assert len(set(kinds)) == len(kinds) == (4 if scene["count"] == 1 else 3)
        expected = {"colour": scene["colour"], "shape": scene["kind"], "count": COUNTS[scene["count"] - 1],
                    "position": scene["answer"]}
        assert [m["content"] for m in many.messages[1::2]] == [expected[k] for k in kinds]
    two = build("dataset", "demo_shapes", split="train", size=40, image_size=32, questions_per_image=2)
    assert all(len(two[i].messages) == 4 for i in range(40))
    with pytest.raises(RecipeError, match=r"demo_shapes.questions_per_image: expected a value in \[1, 4\], found 5"):
        build("dataset", "demo_shapes", questions_per_image=5)
