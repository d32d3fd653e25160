"""The lmms-eval adapter through lmms-eval's own entry point (``python -m lmms_eval``): a local task
(YAML + utils + JSON lines, nothing downloaded) over the demo model; lmms-eval's logged answers are
the answers mllmkit's own evaluation gives to the same questions, and its exact match agrees."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval")

DEMO = pathlib.Path(__file__).parents[1] / "recipes" / "demo.toml"
TASK = """task: mllmkit_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
UTILS = """from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc):
    return doc["question"]
"""


@pytest.fixture
def demo_plugins(monkeypatch):
    from mllmkit.plugins import get_plugin_host, reset_plugin_host

    monkeypatch.delenv("MLLMKIT_PLUGINS", raising=False)
    reset_plugin_host(None)
    if "qwen" not in get_plugin_host().registry.names("llm"):
        pytest.skip("the qwen plugin is not installed")
    yield
    reset_plugin_host(None)


@pytest.mark.slow  # 70 s on 2 shared cores, most of it importing lmms-eval
def test_lmms_eval_runs_the_mllmkit_model_on_a_local_task(demo_plugins, tmp_path):
    from mllmkit.chat.loading import load_chat_model
    from mllmkit.data.collate import SampleEncoder
    from mllmkit.eval.generate import generate_answers
    from mllmkit.eval.task import ask
    from mllmkit.testing.benchmarks import picture

    docs = [("red", (220, 30, 30), "What colour are the shapes?"), ("blue", (30, 60, 230), "What colour is it?"),
            ("one", (200, 200, 40), "How many shapes are there?")]
    with (tmp_path / "docs.jsonl").open("w") as handle:
        for i, (answer, colour, question) in enumerate(docs):
            image = picture(tmp_path / f"{i}.png", colour)
            handle.write(json.dumps({"image": str(image), "question": question, "answer": answer}) + "\n")
    (tmp_path / "task").mkdir()
    (tmp_path / "task" / "local.yaml").write_text(TASK.format(docs=tmp_path / "docs.jsonl"))
    (tmp_path / "task" / "utils.py").write_text(UTILS)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [sys.executable, "-m", "lmms_eval", "--model", "mllmkit",
               "--model_args", f"recipe={DEMO},device=cpu,precision=fp32", "--tasks", "mllmkit_local",
               "--include_path", str(tmp_path / "task"), "--output_path", str(tmp_path / "out"),
               "--log_samples", "--batch_size", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    samples = [json.loads(line) for line in next((tmp_path / "out").rglob("*samples_mllmkit_local.jsonl")).open()]
    results = json.loads(next((tmp_path / "out").rglob("*_results.json")).read_text())["results"]["mllmkit_local"]

    model, recipe = load_chat_model(str(DEMO), device="cpu", precision="fp32")
    encoder = SampleEncoder(model.llm.template, model.tokens_per_image, model.vision.image_transform(False), 2048,
                            system=recipe.data.system)
    items = [ask("x", q, [tmp_path / f"{i}.png"], a) for i, (a, _, q) in enumerate(docs)]
    answers, problems = generate_answers(model, items, encoder, 4, batch_size=1)
    assert not problems
    by_doc = {s["doc_id"]: s["filtered_resps"] for s in samples}
    logged = [by_doc[i] for i in range(len(docs))]
    assert [r if isinstance(r, str) else r[0] for r in logged] == answers
    expected = sum(a == d[0] for a, d in zip(answers, docs)) / len(docs)
    assert results["exact_match,none"] == pytest.approx(expected)
