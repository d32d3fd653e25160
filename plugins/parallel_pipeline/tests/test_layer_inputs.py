"""Decoder layers of a pipeline stage share one mask/rotary build per micro-batch and still compute
what the Hugging Face model computes on its own."""

from __future__ import annotations

import torch
from mllmkit_parallel_pipeline.layer_inputs import LayerInputsCache
from mllmkit_parallel_pipeline.pipe_layers import pipeline_layers

from mllmkit.assemble import assemble
from mllmkit.recipe import load_recipe
from mllmkit.testing.launch import TINY_RECIPE


def _model(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    torch.manual_seed(0)
    return assemble(load_recipe(path)).eval()


def test_stage_layers_build_mask_and_rotary_once_per_micro_batch_and_match_hf(tmp_path, monkeypatch):
    model = _model(tmp_path)
    layers = pipeline_layers(model, checkpointing=False)
    builds = []
    original = LayerInputsCache._build
    monkeypatch.setattr(LayerInputsCache, "_build",
                        lambda self, *args: builds.append(args[2]) or original(self, *args))
    hidden_size = model.llm.hf_model.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    for _ in range(2):  # two micro-batches, each with a padded row
        embeds = torch.randn(2, 7, hidden_size, generator=generator)
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        state = (embeds, mask)
        with torch.no_grad():
            for layer in layers[1:]:
                state = layer(state)
            expected = model.llm.hf_model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        assert torch.allclose(state[:, :5], expected[:, :5], atol=1e-5)  # padded tail: any value
        assert torch.allclose(state[0], expected[0], atol=1e-5)
    assert len(builds) == 2 and builds[0] is not builds[1]


def test_a_mask_tensor_that_died_is_not_mistaken_for_a_new_one(tmp_path):
    model = _model(tmp_path)
    cache = LayerInputsCache(model.llm.hf_model.config, model.llm.rotary, size=2)
    hidden = torch.zeros(1, 4, model.llm.hf_model.config.hidden_size)
    first = cache.get("full_attention", hidden, torch.ones(1, 4, dtype=torch.long))
    padded = torch.tensor([[1, 1, 0, 0]])  # may reuse the freed tensor's id
    second = cache.get("full_attention", hidden, padded)
    assert second is not first
    assert cache.get("full_attention", hidden, padded) is second
