"""Partition plans: the split search against brute force, stage maps, full-size 7B/14B on meta."""

from __future__ import annotations

import itertools
import random

import pytest
from mllmkit_parallel_pipeline.partition import (
    LayerCost,
    _best_split,
    format_plan,
    layer_costs,
    plan_partition,
)

from mllmkit.errors import UserError
from mllmkit.weights import meta_parameters


def _brute(weights: list[float], k: int) -> float:
    n = len(weights)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = [0, *cuts, n]
        best = min(best, max(sum(weights[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


@pytest.mark.parametrize("seed", range(5))
def test_best_split_is_optimal(seed):
    rng = random.Random(seed)
    weights = [rng.uniform(0.1, 5.0) for _ in range(9)]
    for k in (2, 3, 4):
        value, parts = _best_split(weights, k, None, None)
        assert value == pytest.approx(_brute(weights, k))
        assert parts[0] == 0 and parts[-1] == len(weights) and len(parts) == k + 1
        assert max(sum(weights[a:b]) for a, b in itertools.pairwise(parts)) == pytest.approx(value)


def _costs(n_decoders: int) -> list[LayerCost]:
    return [LayerCost("embed", 10, 20, 3.0), *(LayerCost(f"decoder {i}", 5, 10, 2.0) for i in range(n_decoders)),
            LayerCost("final", 7, 14, 1.0)]


def test_stage_map_sets_decoder_layers_per_stage():
    plan = plan_partition(_costs(6), 2, [1, 5])
    assert plan.parts == [0, 2, 8] and plan.stage_decoder_layers() == [1, 5] and plan.source == "stage_map"
    assert plan_partition(_costs(6), 3, [0, 6, 0]).parts == [0, 1, 7, 8]


def test_stage_map_that_misses_layers_is_refused():
    with pytest.raises(UserError) as err:
        plan_partition(_costs(6), 2, [2, 2])
    assert str(err.value) == ("parallel.stage_map = [2, 2] places 4 decoder layers, but the LLM has 6; give counts "
                              "that add up to 6")


def test_cost_model_balances_flops_then_memory():
    # FLOPs 3 + 6 × 2 + 1: stage 0 = embed + k decoders → (3 + 2k, 13 - 2k); k = 2 and k = 3 both give
    # a slowest stage of 9; bytes (20 + 10k, 74 - 10k) → k = 3 has the smaller largest stage (50 < 54)
    plan = plan_partition(_costs(6), 2)
    assert plan.parts == [0, 4, 8]
    assert plan.stage_flops() == [9.0, 7.0] and plan.stage_bytes() == [50, 44]


@pytest.fixture(scope="module")
def full_size():
    from mllmkit.assemble import assemble
    from mllmkit.recipe import load_recipe

    models = {}
    for preset in ("qwen7b_chat", "qwen14b_chat"):
        recipe = load_recipe({"model": {"vision": {"type": "eva_vit_g"},
                                        "bridges": [{"type": "qformer"}, {"type": "linear"}],
                                        "llm": {"type": "qwen", "preset": preset}}})
        with meta_parameters():
            models[preset] = assemble(recipe)
    return models


@pytest.mark.slow
@pytest.mark.parametrize("preset,layers,total", [("qwen7b_chat", 32, 8.815e9), ("qwen14b_chat", 40, 15.26e9)])
def test_full_size_plans_are_balanced(full_size, preset, layers, total, capsys):
    model = full_size[preset]
    assert all(p.is_meta for p in model.parameters())  # nothing materialised
    costs = layer_costs(model, seq_len=288, checkpointing=True)
    assert len(costs) == layers + 2
    assert sum(c.params for c in costs) == pytest.approx(total, rel=2e-3)
    vision = sum(p.numel() for p in model.vision.parameters())
    for stages, worst in ((2, 0.52), (4, 0.27)):
        plan = plan_partition(costs, stages)
        shares = [f / sum(plan.stage_flops()) for f in plan.stage_flops()]
        assert max(shares) <= worst, format_plan(plan)
        assert plan.stage_params()[0] > vision  # the vision tower counts on stage 0
        assert sum(plan.stage_decoder_layers()) == layers
        with capsys.disabled():
            print(f"\n{preset}\n{format_plan(plan)}")
