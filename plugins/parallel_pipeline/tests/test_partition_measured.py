"""Stage cuts from measured per-layer times: the cut a synthetic profile calls for, the profile file,
and a real measurement of the tiny model's pipeline layers on the CPU written and read back."""

from __future__ import annotations

import json

import attrs
import pytest
import torch
from mllmkit_parallel_pipeline.partition import (
    LayerCost,
    format_plan,
    measure_layer_seconds,
    plan_partition,
    read_profile,
    write_profile,
)
from mllmkit_parallel_pipeline.pipe_layers import pipeline_layers
from mllmkit_parallel_pipeline.pipeline import plan_for

from mllmkit.assemble import assemble
from mllmkit.errors import UserError
from mllmkit.recipe import load_recipe
from mllmkit.testing.launch import TINY_RECIPE


def _costs() -> list[LayerCost]:
    # FLOPs say the vision-heavy embed layer is cheap; measured, it costs as much as 4 decoder layers
    return [LayerCost("embed", 10, 20, 1.0), *(LayerCost(f"decoder {i}", 5, 10, 2.0) for i in range(8)),
            LayerCost("final", 7, 14, 1.0)]


def test_measured_times_move_the_cut_the_flop_model_would_make(tmp_path):
    costs = _costs()
    by_flops = plan_partition(costs, 2)
    assert by_flops.parts == [0, 5, 10] and by_flops.source == "cost model"  # 1+2*4 = 9 vs 2*4+1 = 9
    seconds = [4.0, *[1.0] * 8, 0.5]  # embed 4 s, decoders 1 s, final 0.5 s: total 12.5
    write_profile(tmp_path / "profile.json", costs, seconds, device="synthetic")
    measured = read_profile(tmp_path / "profile.json", costs)
    plan = plan_partition(measured, 2)
    # best split of [4, 1×8, 0.5]: stage 0 = embed + 2 decoders (6 s), stage 1 = 6 decoders + final (6.5 s)
    assert plan.parts == [0, 3, 10] and plan.source == "measured times"
    assert plan.stage_seconds() == pytest.approx([6.0, 6.5])
    assert "measured 6000.0 ms" in format_plan(plan)
    assert json.loads((tmp_path / "profile.json").read_text())["device"] == "synthetic"


def test_a_profile_of_another_model_is_refused_with_the_fix(tmp_path):
    costs = _costs()
    write_profile(tmp_path / "profile.json", costs[:5], [1.0] * 5)
    with pytest.raises(UserError, match="times 5 layers of another model \\(this one has 10\\); delete it"):
        read_profile(tmp_path / "profile.json", costs)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(UserError, match="cannot read the layer-time profile"):
        read_profile(tmp_path / "broken.json", costs)


def test_measuring_times_each_layer_forward_and_backward():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)]
    seconds = measure_layer_seconds(layers, torch.randn(2, 8), torch.device("cpu"), reps=2)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)
    assert all(p.grad is not None for layer in layers for p in layer.parameters())


def test_the_tiny_model_is_measured_once_and_the_profile_reused(tmp_path):
    from mllmkit_parallel_pipeline.pipeline import measure_pipeline_layers

    path = tmp_path / "tiny.toml"
    # the keys go into TINY_RECIPE's closing [parallel] table, whose type the override turns to pipeline
    path.write_text(TINY_RECIPE + f'partition = "measured"\nmeta_init = false\nprofile = "{tmp_path / "p.json"}"\n')
    recipe = load_recipe(path, overrides=["parallel.type=pipeline"])
    cfg = recipe.parallel.config
    assert cfg.partition == "measured" and not cfg.meta_init
    torch.manual_seed(0)
    model = assemble(recipe)
    layers = pipeline_layers(model)
    calls = []

    def measure(costs):
        calls.append(len(costs))
        return measure_pipeline_layers(model, layers, cfg, recipe.train, torch.device("cpu"))

    plan = plan_for(model, cfg, recipe.train, measure=measure)
    again = plan_for(model, cfg, recipe.train)  # read back, not measured again
    assert calls == [len(layers)] and plan.parts == again.parts and plan.source == "measured times"
    assert all(c.seconds > 0 for c in again.layers)
    with pytest.raises(UserError, match="meta_init = true builds only this rank's stage"):
        measure_pipeline_layers(model, layers, attrs.evolve(cfg, meta_init=True), recipe.train, torch.device("cpu"))
