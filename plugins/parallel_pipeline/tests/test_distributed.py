"""Pipeline runs on 2–4 CPU processes (gloo) against the ``single`` backend's losses.

Tolerance: relative 1e-5 — the same samples and weights; ZeRO-2/3 reduce gradients in buckets and
the pipeline reports its loss in float32, so only summation order and float32 rounding differ.
"""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from mllmkit.testing.launch import TINY_RECIPE, convert_and_chat_load, ds_env, losses, torchrun

pytestmark = pytest.mark.slow

REL = 1e-5


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory, tiny_recipe):
    """2 stages (stage 1 holds no trainable parameter), weights as ``single`` builds them, save at step 2."""
    out = tmp_path_factory.mktemp("pp") / "run"
    result = torchrun(2, tiny_recipe, out, "parallel.type=pipeline", "parallel.meta_init=false", "train.save_every=2")
    _ok(result)
    return out, result


def test_pipeline_two_stages_matches_single_with_a_frozen_stage(pipeline_run, single_losses):
    out, result = pipeline_run
    assert losses(out) == pytest.approx(single_losses[2], rel=REL)
    # the cost model put the embedding (with the only trainable part) on stage 0, stage 1 is frozen
    assert "pipeline partition (cost model): 2 stages" in result.stderr
    saved = load_file(str(out / "checkpoints" / "step_0000002" / "trainable.safetensors"))
    assert set(saved) == {"bridges.1.proj.weight", "bridges.1.proj.bias"}
    convert_and_chat_load(out, out.parent / "converted", load_file(str(out / "checkpoints" / "step_0000003" /
                                                                         "trainable.safetensors")))


def test_pipeline_resumes_under_the_same_topology(tmp_path, pipeline_run):
    first, _ = pipeline_run
    out = tmp_path / "resumed"
    _ok(torchrun(2, _recipe(tmp_path), out, "parallel.type=pipeline",
                 "parallel.meta_init=false", resume=str(first / "checkpoints" / "step_0000002")))
    assert losses(out) == pytest.approx(losses(first)[2:], rel=REL)


def test_zero_resumes_from_a_pipeline_checkpoint(tmp_path, pipeline_run):
    first, _ = pipeline_run  # pipeline: 1 pipeline × 2 micro-batches of 2; zero: 2 ranks × 1 micro-batch of 2
    out = tmp_path / "zero_from_pp"
    _ok(torchrun(2, _recipe(tmp_path), out, "parallel.type=zero", "parallel.stage=2", "train.grad_accum=1",
                 resume=str(first / "checkpoints" / "step_0000002")))
    assert losses(out) == pytest.approx(losses(first)[2:], rel=REL)


def test_pipeline_dp_x_pp_matches_single(tmp_path, tiny_recipe, single_losses):
    out = tmp_path / "run"
    _ok(torchrun(4, tiny_recipe, out, "parallel.type=pipeline", "parallel.meta_init=false"))
    assert losses(out) == pytest.approx(single_losses[4], rel=REL)


def test_pipeline_meta_init_materialises_only_the_local_stage(tmp_path, tiny_recipe):
    """Random-init parts are built on meta and materialised per stage; the vision weights come from a
    file (eva_vit_g.pth layout) and must stay loaded (they were turned to meta once: the run failed)."""
    from mllmkit_vision_eva.encoder import EVA_TINY
    from mllmkit_vision_eva.random_checkpoint import write_random_checkpoint

    weights = write_random_checkpoint(tmp_path / "eva_vit_g.pth", EVA_TINY, grid=4)
    out = tmp_path / "run"
    result = torchrun(2, tiny_recipe, out, "parallel.type=pipeline", "parallel.stage_map=[0, 2]",
                      f"model.vision.weights='{weights}'")
    _ok(result)
    assert "pipeline partition (stage_map): 2 stages" in result.stderr
    assert len(losses(out)) == 3 and all(math.isfinite(loss) for loss in losses(out))


def test_plain_mllmkit_run_starts_one_process_per_stage(tmp_path, tiny_recipe, pipeline_run):
    """`mllmkit run pipeline-recipe` with no launcher and no --nproc-per-node: num_stages processes."""
    out = tmp_path / "run"
    command = [sys.executable, "-m", "mllmkit.cli", "run", str(tiny_recipe), "--output-dir", str(out),
               "--set", "parallel.type=pipeline", "--set", "parallel.meta_init=false", "--set", "train.save_every=2"]
    result = subprocess.run(command, env=ds_env(tmp_path), capture_output=True, text=True, timeout=240, check=False)
    _ok(result)
    assert ("mllmkit: parallel.type = 'pipeline' needs 2 processes: starting them with torchrun "
            "(--nproc-per-node N for data parallel as well)") in result.stderr
    assert losses(out) == losses(pipeline_run[0])


def test_world_size_not_divisible_is_a_clear_error(tmp_path, tiny_recipe):
    result = torchrun(3, tiny_recipe, tmp_path / "run", "parallel.type=pipeline")
    assert result.returncode != 0
    assert ("mllmkit: error: parallel.num_stages = 2 does not divide the 3 processes of this launch; launch a "
            "multiple of 2 processes (--nproc-per-node), or change num_stages") in result.stderr


def _recipe(tmp_path: pathlib.Path) -> pathlib.Path:
    path = tmp_path / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path