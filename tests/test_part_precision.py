"""A part's declared precision governs it on every path: a training step under the recipe's bf16
autocast and a chat turn encode the same image identically; fp16 on CPU runs in fp32 with a notice."""

from __future__ import annotations

import copy
import functools
import logging

import pytest
import torch
from torch import nn

from mllmkit.assemble import assemble
from mllmkit.builtin.backends import SingleBackend
from mllmkit.chat import chat_session
from mllmkit.chat.loading import place_model
from mllmkit.data import Collator, SampleEncoder
from mllmkit.interfaces import Sample
from mllmkit.precision import layout_for_autocast
from mllmkit.recipe import load_recipe
from mllmkit.train.optim import build_adamw


def _vision_outputs(module: nn.Module) -> list[torch.Tensor]:
    outputs: list[torch.Tensor] = []
    module.register_forward_hook(lambda mod, args, out: outputs.append(out.detach().clone()))
    return outputs


def _training_step_output(recipe: dict, image) -> torch.Tensor:
    """The vision encoder's output for ``image`` inside one real training step (recipe bf16 autocast)."""
    loaded = load_recipe(recipe)
    torch.manual_seed(loaded.train.seed)  # as the chat model is built
    model = assemble(loaded)
    encoder = SampleEncoder(model.llm.template, model.tokens_per_image, model.vision.image_transform(False), 256)
    sample = encoder(Sample(images=[image], messages=[{"role": "user", "content": "<ImageHere> colour?"},
                                                      {"role": "assistant", "content": "red"}]))
    backend = SingleBackend("cpu")
    backend.setup()
    engine = backend.prepare(model, functools.partial(build_adamw, train=loaded.train), lambda step: 1e-3,
                             loaded.train)
    outputs = _vision_outputs(engine.model.vision)
    engine.train_step([Collator(model.llm.template.pad_token_id)([sample])])
    assert len(outputs) == 1
    return outputs[0]


@pytest.mark.parametrize("precision", [None, "bf16"])
def test_training_step_and_chat_encode_an_image_identically(core_plugin_host, toy_recipe, tiny_image, precision):
    recipe = copy.deepcopy(toy_recipe)
    if precision is not None:
        recipe["model"]["vision"]["precision"] = precision
    recipe["train"] = {"precision": "bf16", "device": "cpu"}
    trained = _training_step_output(recipe, tiny_image)
    session = chat_session(recipe, device="cpu", precision="bf16")
    outputs = _vision_outputs(session.model.vision)
    session.add_image(tiny_image)
    assert trained.dtype == torch.float32
    torch.testing.assert_close(outputs[0], trained, rtol=0, atol=0)


def test_layout_is_lavis_convert_weights_to_fp16():
    part = nn.Sequential(nn.Conv2d(3, 4, 2), nn.LayerNorm(4), nn.Linear(4, 4), nn.Embedding(3, 4))
    part.register_buffer("scale", torch.ones(2, dtype=torch.float16))
    part.register_parameter("token", nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)))
    layout_for_autocast(part, torch.float16)
    dtypes = {name: t.dtype for name, t in [*part.named_parameters(), *part.named_buffers()]}
    assert dtypes == {"0.weight": torch.float16, "0.bias": torch.float16, "2.weight": torch.float16,
                      "2.bias": torch.float16, "1.weight": torch.float32, "1.bias": torch.float32,
                      "3.weight": torch.float32, "token": torch.float32, "scale": torch.float32}


def test_fp16_part_on_cpu_runs_in_fp32_with_a_notice(core_plugin_host, toy_recipe, caplog):
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["vision"]["precision"] = "fp16"
    recipe["model"]["bridges"][0]["precision"] = "fp16"
    with caplog.at_level(logging.WARNING, logger="mllmkit.precision"):
        model = assemble(load_recipe(recipe), device="cpu")
    assert [r.getMessage() for r in caplog.records] == ['model.vision: precision = "fp16" runs in fp32 on CPU',
                                                        'model.bridges[0]: precision = "fp16" runs in fp32 on CPU']
    assert {p.dtype for p in [*model.vision.parameters(), *model.bridges.parameters()]} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training autocast does not reach inside
        assert model.encode_images(torch.rand(2, 3, 16, 16)).dtype == torch.float32


def test_placing_an_fp16_part_on_cpu_casts_it_to_fp32_with_a_notice(core_plugin_host, toy_recipe, caplog):
    model = assemble(load_recipe(toy_recipe), device="cpu")
    layout_for_autocast(model.vision, torch.float16)  # as assembled for a GPU
    model.part_precision["vision"] = "fp16"
    with caplog.at_level(logging.WARNING, logger="mllmkit.precision"):
        place_model(model, "cpu", "bf16")
    assert [r.getMessage() for r in caplog.records] == ['vision: precision = "fp16" runs in fp32 on CPU']
    assert model.part_precision["vision"] == "fp32" and model.vision.patch.weight.dtype == torch.float32
    assert model.llm.hf_model.lm_head.weight.dtype == torch.bfloat16
    assert model.encode_images(torch.rand(1, 3, 16, 16)).shape == (1, 5, 32)


def test_gradient_checkpointing_needs_the_parts_method(core_plugin_host, toy_recipe):
    from mllmkit.errors import RecipeError

    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["vision"]["gradient_checkpointing"] = True
    with pytest.raises(RecipeError) as info:
        assemble(load_recipe(recipe))
    assert str(info.value) == ("<recipe>: model.vision.gradient_checkpointing: toy_vision cannot recompute its "
                               "activations (it has no gradient_checkpointing method); set it to false")
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["llm"]["gradient_checkpointing"] = True
    layers = assemble(load_recipe(recipe)).llm.layers()
    assert all("forward" in vars(layer) for layer in layers)  # HFCausalLM.gradient_checkpointing(True) ran
