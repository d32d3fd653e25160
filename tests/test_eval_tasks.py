"""Each built-in evaluation task on tiny files in its benchmark's real layout: records read (bad ones
listed with file and index), answers parsed as the benchmark's own evaluation code does, metrics
against hand-computed values."""

from __future__ import annotations

import base64
import csv
import io
import json

import pytest
from PIL import Image

from mllmkit.errors import UserError
from mllmkit.eval.answers import mmbench_option, mme_yes_no, pope_yes_no, vqa_accuracy, vqa_normalize
from mllmkit.eval.task import Problem, limit_items
from mllmkit.eval.tasks.mmbench import MmbenchConfig, MmbenchTask, rotations
from mllmkit.eval.tasks.mme import MmeConfig, MmeTask
from mllmkit.eval.tasks.pope import PopeConfig, PopeTask
from mllmkit.eval.tasks.vqa import TextVqaConfig, VqaTask, Vqav2Config
from mllmkit.testing.benchmarks import picture, write_pope


# -- answer reading --
@pytest.mark.parametrize("text, expected", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is no dog in the image", "no"),
    ("It is not there", "no"), ("Yes. No dog though.", "yes"), ("Nope", "yes"), ("", "yes"),
])
def test_pope_reads_answers_as_its_evaluate_py(text, expected):
    assert pope_yes_no(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"), ("no", "no"), ("Yes, it is.", "yes"), ("No, there isn't.", "no"), ("not sure", "no"),
    ("I think yes", None), ("maybe", None), ("", None),
])
def test_mme_reads_answers_as_its_calculation_py(text, expected):
    assert mme_yes_no(text) == expected


@pytest.mark.parametrize("text, options, expected", [
    ("B", {"A": "cat", "B": "dog"}, "B"),
    ("The answer is (C).", {"A": "x", "B": "y", "C": "z"}, "C"),
    ("a dog", {"A": "cat", "B": "dog"}, "B"),                  # no letter: the option's text
    ("A or B", {"A": "cat", "B": "dog"}, None),               # two letters, no text: unparseable
    ("cats and dogs", {"A": "cat", "B": "dog"}, None),        # both texts: unparseable
    ("Z", {"A": "cat", "B": "dog"}, "Z"),
    ("Cannot determine the answer", {"A": "cat", "B": "dog"}, "Z"),
])
def test_mmbench_option_extraction(text, options, expected):
    assert mmbench_option(text, options) == expected


@pytest.mark.parametrize("text, expected", [
    ("Two dogs.", "2 dogs"), ("the cat", "cat"), ("dont", "don't"), ("It's 3.5", "it's 3.5"),
    ("yes!", "yes"), ("1,000", "1000"), ("red/blue", "red blue"), ("a - b", "b"), ("  Ten\n", "10"),
    ("An apple", "apple"), ("hes", "he's"),
])
def test_vqa_normalisation_cases(text, expected):
    assert vqa_normalize(text) == expected


def test_vqa_soft_accuracy_over_the_leave_one_out_subsets():
    # "two" → "2"; humans differ, so theirs get punctuation only ("two" stays "two"): 5 humans said "2".
    # Leaving out one of the three "2": 2 matches → 2/3; leaving out any other: 3 → 1. (3·2/3 + 7)/10 = 0.9
    humans = ["2", "2", "2", "two", "two", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("two", humans) == pytest.approx(0.9)
    assert vqa_accuracy("Yes.", ["yes"] * 10) == 1.0
    assert vqa_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)
    assert vqa_accuracy("blue", ["red"] * 10) == 0.0


# -- POPE --
def test_pope_metrics_per_split(tmp_path):
    write_pope(tmp_path)
    task = PopeTask(PopeConfig(data=tmp_path))
    data = task.load()
    assert [i.id for i in data.items][:4] == ["adversarial/1", "adversarial/2", "adversarial/3", "adversarial/4"]
    assert data.items[0].messages[0]["content"] == (
        "<Img><ImageHere></Img> Is there a thing 1?\nAnswer the question using a single word or phrase.")
    where = str(tmp_path / "coco_pope_random.json")
    assert [(p.file, p.index) for p in data.problems] == [(where, 2), (where, 3), (where, 4)]
    assert data.problems[0].reason == "missing label"
    assert data.problems[2].reason.startswith("image not found")
    said = ["Yes, there is.", "No.", "There is no such thing", "yes",   # adversarial: TP, TN, FN, FP
            "yes", "not at all",                                         # popular: TP, TN
            "Yes", "Yes"]                                                 # random: FP, TP
    scores = task.score(data.items, said)
    m = scores.metrics
    assert (m["adversarial/accuracy"], m["adversarial/precision"], m["adversarial/recall"], m["adversarial/f1"],
            m["adversarial/yes_ratio"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert (m["popular/accuracy"], m["popular/f1"]) == (1.0, 1.0)
    assert (m["random/accuracy"], m["random/precision"], m["random/recall"]) == (0.5, 0.5, 1.0)
    assert m["random/f1"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx((0.5 + 1.0 + 2 / 3) / 3)
    assert m["accuracy"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert [s.parsed for s in scores.samples] == ["yes", "no", "no", "yes", "yes", "no", "yes", "yes"]


def test_pope_missing_file_says_which_and_where(tmp_path):
    with pytest.raises(UserError, match=r"coco_pope_adversarial.json not found: looked for .*coco_pope_adversarial"):
        PopeTask(PopeConfig(data=tmp_path)).load()
    with pytest.raises(UserError, match="no data folder; give --data PATH"):
        PopeTask(PopeConfig()).load()


# -- MME --
def write_mme(root):
    picture(root / "existence" / "a.jpg")
    (root / "existence" / "a.txt").write_text("Is there a cat? Please answer yes or no.\tYes\n"
                                              "Is there a dog? Please answer yes or no.\tNo\n")
    picture(root / "existence" / "b.png")
    (root / "existence" / "b.txt").write_text("Q1\tYes\nQ2\tNo\nbroken line without answer\n")
    picture(root / "artwork" / "images" / "c.jpg")
    (root / "artwork" / "questions_answers_YN").mkdir(parents=True)
    (root / "artwork" / "questions_answers_YN" / "c.txt").write_text("Q1\tYes\nQ2\tNo\n")
    (root / "artwork" / "questions_answers_YN" / "lost.txt").write_text("Q1\tYes\nQ2\tNo\n")
    picture(root / "code_reasoning" / "d.png")
    (root / "code_reasoning" / "d.txt").write_text("Q1\tNo\nQ2\tYes\n")


def test_mme_scores_acc_and_acc_plus(tmp_path):
    write_mme(tmp_path)
    task = MmeTask(MmeConfig(data=tmp_path, categories=["existence", "artwork", "code_reasoning"]))
    data = task.load()
    assert len(data.items) == 8
    assert [(p.file.split("/")[-1], p.index) for p in data.problems] == [("b.txt", 2), ("lost.txt", 0)]
    said = ["Yes", "no, it isn't",     # a: both right → a counts for acc+
            "yes", "maybe",            # b: one right, one unparseable
            "No", "No",                # c: first wrong
            "no", "Yes"]               # d: both right
    scores = task.score(data.items, said)
    m = scores.metrics
    assert (m["existence/acc"], m["existence/acc_plus"], m["existence/score"], m["existence/other"]) == \
        (75.0, 50.0, 125.0, 1)
    assert (m["artwork/acc"], m["artwork/acc_plus"]) == (50.0, 0.0)
    assert m["perception"] == 175.0
    assert m["cognition"] == 200.0
    assert scores.samples[3].parsed is None and scores.samples[3].score == 0.0


def test_mme_missing_category_folder(tmp_path):
    write_mme(tmp_path)
    with pytest.raises(UserError, match=r"category folder not found: .*/count; give the MME release folder"):
        MmeTask(MmeConfig(data=tmp_path)).load()


# -- MMBench --
def b64_picture(colour):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def write_mmbench(path):
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"]
    rows = [
        [1, "What animal is this?", "nan", "cat", "dog", "bird", "", "B", "animals", b64_picture((1, 2, 3))],
        [2, "Which colour?", "Look closely.", "red", "green", "blue", "black", "A", "colours", "1"],
        [3, "Broken", "", "x", "y", "", "", "", "colours", b64_picture((4, 5, 6))],
        [1000001, "copy", "", "dog", "bird", "cat", "", "A", "animals", "1"],
    ]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(header)
        writer.writerows(rows)


def test_mmbench_rotations():
    assert rotations(["cat", "dog", "bird"], 1, True) == [
        (["cat", "dog", "bird"], 1), (["dog", "bird", "cat"], 0), (["bird", "cat", "dog"], 2)]
    assert rotations(["cat", "dog"], 0, False) == [(["cat", "dog"], 0)]


def test_mmbench_circular_evaluation(tmp_path):
    write_mmbench(tmp_path / "MMBench_DEV_EN.tsv")
    task = MmbenchTask(MmbenchConfig(data=tmp_path))
    data = task.load()
    assert [i.id for i in data.items] == ["1/0", "1/1", "1/2", "2/0", "2/1", "2/2", "2/3"]
    assert [i.reference for i in data.items[:3]] == ["B", "A", "C"]
    assert data.items[1].messages[0]["content"] == (
        "<Img><ImageHere></Img> What animal is this?\nA. dog\nB. bird\nC. cat\n"
        "Answer with the option's letter from the given choices directly.")
    assert data.items[3].messages[0]["content"].startswith("<Img><ImageHere></Img> Look closely.\nWhich colour?\nA. red")
    assert data.items[3].images[0].getpixel((0, 0)) == (1, 2, 3)   # row 2 shares row 1's picture
    assert [(p.index, p.reason) for p in data.problems] == [(2, "missing answer")]
    said = ["B", "A.", "The answer is C",              # question 1: right in every rotation
            "A", "B", "I think so", "B"]                # question 2: right, wrong, unparseable, right
    scores = task.score(data.items, said)
    assert scores.metrics == {"accuracy": 0.5, "vanilla_accuracy": 1.0, "questions": 2,
                              "circular_copies_skipped": 1, "category/animals": 1.0, "category/colours": 0.0}
    assert [s.parsed for s in scores.samples][3:] == ["A", "B", None, "B"]
    assert len(limit_items(data.items, 1)) == 3   # --limit keeps whole questions (all their rotations)


# -- VQAv2 / TextVQA --
def test_vqav2_layout_and_soft_accuracy(tmp_path):
    picture(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    questions = {"questions": [{"image_id": 42, "question": "How many?", "question_id": 420},
                               {"image_id": 42, "question": "Is it red?", "question_id": 421},
                               {"image_id": 43, "question": "Lost image?", "question_id": 430}]}
    humans = ["2", "2", "2", "two", "two", "3", "3", "3", "3", "3"]
    annotations = {"annotations": [
        {"question_id": 420, "answer_type": "number", "answers": [{"answer": a, "answer_id": i + 1}
                                                                  for i, a in enumerate(humans)]},
        {"question_id": 421, "answer_type": "yes/no", "answers": [{"answer": "yes", "answer_id": i + 1}
                                                                  for i in range(10)]},
        {"question_id": 430, "answer_type": "other", "answers": [{"answer": "x", "answer_id": 1}]}]}
    (tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(json.dumps(questions))
    (tmp_path / "v2_mscoco_val2014_annotations.json").write_text(json.dumps(annotations))
    task = VqaTask("vqav2", Vqav2Config(data=tmp_path))
    data = task.load()
    assert [i.id for i in data.items] == ["420", "421"]
    assert data.problems == [Problem(str(tmp_path / "v2_OpenEnded_mscoco_val2014_questions.json"), 2,
                                     f"image not found: {tmp_path / 'val2014' / 'COCO_val2014_000000000043.jpg'}")]
    scores = task.score(data.items, ["two", "No"])
    assert scores.metrics == pytest.approx({"accuracy": 0.45, "answer_type/number": 0.9, "answer_type/yes/no": 0.0})


def test_textvqa_layout(tmp_path):
    picture(tmp_path / "train_images" / "abc.jpg")
    document = {"data": [{"question_id": 1, "image_id": "abc", "question": "What brand?",
                          "answers": ["nike"] * 7 + ["Nike"] * 3},
                         {"question_id": 2, "image_id": "abc", "question": "No answers"}]}
    (tmp_path / "TextVQA_0.5.1_val.json").write_text(json.dumps(document))
    task = VqaTask("textvqa", TextVqaConfig(data=tmp_path))
    data = task.load()
    assert len(data.items) == 1 and data.problems[0].index == 1 and data.problems[0].reason == "missing answers"
    # "Nike" → "nike"; humans differ (punctuation only, case kept): 7 "nike" match → every subset ≥ 3 → 1.0
    assert task.score(data.items, ["Nike"]).metrics == {"accuracy": 1.0}
