"""Evaluation end to end on a toy model trained for a few steps: ``eval_every`` writes held-out and
benchmark metrics at the right steps and keeps the best export; ``mllmkit eval`` on the export gives
the training's held-out exact match, writes a report stamping every setting, the same results.json
twice; a task from a third-party plugin runs through the same command."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
import torch

from mllmkit.cli import main
from mllmkit.eval.task import EvalTaskConfig, ScoredSample, Scores, TaskData, ask
from mllmkit.hookspecs import hookimpl
from mllmkit.registry import ComponentSpec
from mllmkit.testing.benchmarks import picture, write_pope
from mllmkit.train.metrics import read_metrics


class CountsWords:
    """A task of a third-party plugin: one question, credit = 1 when the answer has any word."""

    name, headline, max_new_tokens = "counts_words", "accuracy", 4

    def __init__(self, image):
        self.image = image

    def load(self):
        return TaskData([ask("q1", "Say something.", [self.image], None)])

    def score(self, items, predictions):
        said = [len(p.split()) for p in predictions]
        return Scores({"accuracy": float(said[0] > 0), "words": said[0]}, [ScoredSample(said[0], float(said[0] > 0))])


class TaskPlugin:
    def __init__(self, image):
        self.image = image

    @hookimpl
    def mllmkit_register_eval_tasks(self) -> list[ComponentSpec]:
        return [ComponentSpec("counts_words", EvalTaskConfig, lambda cfg, ctx: CountsWords(self.image),
                              "test task from a plugin")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A toy model trained 4 steps with eval_every = 2, POPE as an [[eval.tasks]] table, best by eval_loss;
    the plugin host (core built-ins, toy parts, a task plugin) stays installed for the module's tests."""
    from mllmkit import load_recipe
    from mllmkit.plugins import build_plugin_host, reset_plugin_host
    from mllmkit.testing.toy import TOY_RECIPE, ToyPlugin
    from mllmkit.train.loop import train

    tmp_path = tmp_path_factory.mktemp("eval")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLLMKIT_PLUGINS", "builtin")
        image = picture(tmp_path / "plugin.png")
        reset_plugin_host(build_plugin_host(extra_plugins=[("mllmkit-testing", ToyPlugin()),
                                                           ("eval-plugin", TaskPlugin(image))]))
        write_pope(tmp_path / "pope")
        recipe = copy.deepcopy(TOY_RECIPE)
        recipe["data"] = {"train": [{"type": "demo_shapes", "size": 16}],
                          "eval": [{"type": "demo_shapes", "split": "eval", "size": 6}], "augment": False}
        recipe["train"] = {"max_steps": 4, "eval_every": 2, "micro_batch_size": 2, "log_every": 1,
                           "precision": "fp32", "lr": 3e-3, "eval_max_new_tokens": 3, "tensorboard": False}
        recipe["eval"] = {"batch_size": 4, "best_metric": "eval_loss", "best_mode": "min",
                          "tasks": [{"type": "pope", "data": str(tmp_path / "pope")}]}
        recipe["chat"] = {"precision": "fp32", "device": "cpu"}
        result = train(load_recipe(recipe), tmp_path / "run")
        yield result, read_metrics(tmp_path / "run" / "metrics.jsonl"), tmp_path
    reset_plugin_host(None)


def test_eval_every_logs_heldout_and_tasks_and_keeps_the_best(trained):
    result, records, tmp_path = trained
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["eval_questions"] == 6 and r["eval_problems"] == 0
        assert set(r) >= {"pope/popular/f1", "pope/popular/accuracy", "pope/f1", "pope/problems"}
        assert r["pope/popular/count"] == 2 and r["pope/problems"] == 3
    best = json.loads((tmp_path / "run" / "best" / "best.json").read_text())
    lowest = min(evals, key=lambda r: r["eval_loss"])
    assert best == {"metric": "eval_loss", "value": lowest["eval_loss"], "step": lowest["step"]}
    assert (tmp_path / "run" / "best" / "export" / "trainable.safetensors").is_file()
    assert result.eval["eval_accuracy"] == evals[-1]["eval_accuracy"]


def _sha256_folder(folder):
    lines = "".join(f"{p.relative_to(folder).as_posix()}\t{hashlib.sha256(p.read_bytes()).hexdigest()}\n"
                    for p in sorted(folder.rglob("*")) if p.is_file())
    return hashlib.sha256(lines.encode()).hexdigest()


def test_mllmkit_eval_reports_what_training_measured(trained, capsys):
    result, records, tmp_path = trained
    export = result.export_dir
    out = tmp_path / "report"
    args = ["eval", str(export), "--task", "demo_shapes", "--task", "pope", "--data", str(tmp_path / "pope"),
            "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "| demo_shapes | accuracy |" in printed and "| pope | random/f1 |" in printed
    assert f"report: {out}" in printed
    document = json.loads((out / "results.json").read_text())
    heldout = document["tasks"]["demo_shapes"]
    final = [r for r in records if "eval_accuracy" in r][-1]
    assert heldout["metrics"]["accuracy"] == final["eval_accuracy"]      # the same evaluation code and answers
    assert heldout["metrics"]["total"] == final["eval_questions"] == heldout["samples"] == 6
    pope = document["tasks"]["pope"]
    assert pope["samples"] == 8                                           # 4 + 2 + 2 usable POPE questions
    assert [(p["file"].rsplit("/", 1)[-1], p["index"]) for p in pope["problems"]] == \
        [("coco_pope_random.json", 2), ("coco_pope_random.json", 3), ("coco_pope_random.json", 4)]
    lines = (out / "predictions" / "pope.jsonl").read_text().splitlines()
    assert len(lines) == 8 and set(json.loads(lines[0])) == {"id", "group", "prompt", "images", "prediction",
                                                             "parsed", "reference", "score"}
    settings = document["settings"]
    resolved = json.loads(json.dumps(settings["recipe"]["resolved"]))
    assert settings["recipe"]["sha256"] == hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()
    assert settings["checkpoint"] == {"path": str(export), "sha256": _sha256_folder(export)}
    assert settings["prompt"] == {"template": "mllmkit.testing.toy.ToyTemplate", "system_prompt": None,
                                  "image_tokens": (16 // 8) ** 2 + 1}   # toy_vision: 2×2 patches + class
    assert settings["generation"]["strategy"] == "greedy" and settings["generation"]["batch_size"] == 4
    assert settings["precision"] == "fp32" and settings["device"] == "cpu"
    assert settings["versions"]["torch"] == torch.__version__
    assert settings["task_options"]["pope"]["prompt"] == "\nAnswer the question using a single word or phrase."
    assert json.loads((out / "run.json").read_text())["wall_s"] > 0
    assert "| wall time |" in (out / "results.md").read_text()

    again = tmp_path / "again"
    assert main([*args[:-1], str(again)]) == 0
    assert (again / "results.json").read_bytes() == (out / "results.json").read_bytes()


def test_a_plugin_task_and_bad_input(trained, capsys):
    result, _, tmp_path = trained
    out = tmp_path / "plugin"
    assert main(["eval", str(result.export_dir), "--task", "counts_words", "--out", str(out)]) == 0
    metrics = json.loads((out / "results.json").read_text())["tasks"]["counts_words"]["metrics"]
    answer = json.loads((out / "predictions" / "counts_words.jsonl").read_text())["prediction"]
    assert metrics == {"accuracy": float(len(answer.split()) > 0), "words": len(answer.split())}
    capsys.readouterr()
    assert main(["eval", str(result.export_dir), "--task", "pope", "--data", str(tmp_path / "nowhere")]) == 2
    assert "coco_pope_adversarial.json not found: looked for" in capsys.readouterr().err
    assert main(["eval", str(result.export_dir), "--task", "nope"]) == 2
    assert "unknown eval_task component 'nope'; available:" in capsys.readouterr().err
