"""Pipeline recipe options, its DeepSpeed config, and the DeepSpeed recipes under `mllmkit check`."""

from __future__ import annotations

import pathlib

import pytest

from mllmkit.cli import main
from mllmkit.errors import RecipeError
from mllmkit.recipe import load_recipe
from mllmkit.testing.launch import TINY_RECIPE

RECIPES = pathlib.Path(__file__).resolve().parents[3] / "recipes"


@pytest.fixture
def tiny(tmp_path) -> pathlib.Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


def test_pipeline_config_turns_deepspeed_clipping_off(tiny):
    from mllmkit_parallel_pipeline.pipeline import pipeline_ds_config

    recipe = load_recipe(tiny, ["parallel.type=pipeline", "parallel.zero_stage=1"])
    config = pipeline_ds_config(recipe.parallel.config, recipe.train, dp_world=2)
    assert config["gradient_clipping"] == 0.0 and config["zero_optimization"] == {"stage": 1}
    assert config["train_batch_size"] == 8


def test_stage_map_length_is_checked_at_check_time(tiny):
    with pytest.raises(RecipeError) as err:
        load_recipe(tiny, ["parallel.type=pipeline", "parallel.num_stages=3", "parallel.stage_map=[1, 1]"])
    assert str(err.value).endswith("parallel.stage_map: has 2 entries but num_stages = 3; give one decoder-layer "
                                   "count per stage")


def test_pipeline_with_zero_2_is_refused(tiny):
    with pytest.raises(RecipeError) as err:
        load_recipe(tiny, ["parallel.type=pipeline", "parallel.zero_stage=2"])
    assert str(err.value).endswith("parallel.zero_stage: expected one of 0, 1, found 2 (DeepSpeed refuses ZeRO-2/3 "
                                   "with a pipeline)")


@pytest.mark.parametrize("name,parallel", [("minigpt4qwen14b_pp.toml", "pipeline"),
                                           ("minigpt4qwen7b_zero2.toml", "zero")])
def test_deepspeed_recipes_check_without_weights(name, parallel, capsys):
    assert main(["check", str(RECIPES / name)]) == 0
    out = capsys.readouterr().out
    assert f"  parallel: {parallel}" in out


def test_14b_recipe_values():
    recipe = load_recipe(RECIPES / "minigpt4qwen14b_pp.toml")
    train, parallel = recipe.train, recipe.parallel.config
    assert (train.micro_batch_size, train.grad_accum, train.lr, tuple(train.betas), train.eps) == (1, 128, 1e-4,
                                                                                                   (0.9, 0.99), 1e-7)
    assert (parallel.num_stages, parallel.zero_stage, train.epochs, train.warmup_steps) == (2, 0, 20, 50)


@pytest.mark.parametrize("override,message", [
    ("data.packing=true", "data.packing: the pipeline carries (hidden, attention mask) between stages, not the "
                          "packed rows' position ids; set data.packing = false with parallel.type = 'pipeline'"),
    ("train.cache_features=true", "train.cache_features: the pipeline's first stage encodes the pixels itself; "
                                  "set cache_features = false with parallel.type = 'pipeline'"),
    ("train.loss_logits=all", "train.loss_logits: the pipeline's last stage computes the head at labelled tokens "
                              "only; set loss_logits = 'labelled' with parallel.type = 'pipeline'"),
])
def test_options_the_stages_cannot_honour_are_refused_before_the_model_is_built(tiny, override, message):
    from mllmkit_parallel_pipeline.pipeline import PipelineBackend

    extra = ["data.max_tokens_per_batch=512", "train.micro_batch_size=1"] if override == "data.packing=true" else []
    recipe = load_recipe(tiny, ["parallel.type=pipeline", override, *extra])
    with pytest.raises(RecipeError) as err:
        PipelineBackend(recipe.parallel.config).assemble(recipe)
    assert str(err.value).endswith(message)
