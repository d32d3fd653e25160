"""The swap: the MiniGPT4Baichuan recipe checks without weights, and a Baichuan LLM trains the bridge."""

from __future__ import annotations

import pathlib

import pytest
import tomllib
import torch

from mllmkit.cli import main

RECIPES = pathlib.Path(__file__).resolve().parents[3] / "recipes"


def test_recipe_checks_without_weights(capsys):
    assert main(["check", str(RECIPES / "minigpt4baichuan7b.toml")]) == 0
    out = capsys.readouterr().out
    assert "linear (4096d × 32 tokens) → baichuan2 (hidden 4096)" in out


def test_recipe_differs_from_qwen_only_in_the_llm():
    qwen = RECIPES / "minigpt4qwen7b.toml"
    if not qwen.is_file():
        pytest.skip("recipes/minigpt4qwen7b.toml not written yet")
    a = tomllib.loads((RECIPES / "minigpt4baichuan7b.toml").read_text())
    b = tomllib.loads(qwen.read_text())
    assert a["model"]["llm"]["type"] == "baichuan2" and b["model"]["llm"]["type"] == "qwen"
    for data in (a, b):
        del data["model"]["llm"]
        data.get("train", {}).pop("output_dir", None)
    assert a == b


def test_tiny_mllm_with_baichuan_trains_only_the_bridge(plugin_host, toy_recipe):
    from mllmkit import assemble
    from mllmkit.template import IMAGE_SPAN, encode_pieces

    toy_recipe["model"]["llm"] = {"type": "baichuan2_tiny"}
    model = assemble(toy_recipe)
    template = model.llm.template
    messages = [{"role": "user", "content": f"{IMAGE_SPAN} What is it?"}, {"role": "assistant", "content": "A cat."}]
    enc = encode_pieces(template.pieces(messages, model.tokens_per_image))
    assert enc.input_ids.count(template.image_token_id) == model.tokens_per_image
    out = model(torch.tensor([enc.input_ids]), torch.tensor([enc.labels]), pixels=torch.rand(1, 3, 16, 16))
    assert int(out.num_tokens) == len(model.llm.tokenizer.encode("A cat.")) + 1  # answer + eos
    out.loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {"bridges.0.proj.weight", "bridges.0.proj.bias"}
