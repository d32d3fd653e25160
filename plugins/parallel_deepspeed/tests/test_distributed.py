"""Distributed runs on 2–4 CPU processes (gloo) against the ``single`` backend's losses.

Tolerance: relative 1e-5 — the same samples and weights; ZeRO-2/3 reduce gradients in buckets and
the pipeline reports its loss in float32, so only summation order and float32 rounding differ.
"""

from __future__ import annotations

import math
import pathlib
import subprocess
import sys

import pytest
import torch
from mllmkit_parallel_deepspeed.testing import TINY_RECIPE, ds_env, losses, torchrun
from safetensors.torch import load_file

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


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_matches_single(tmp_path, stage, single_losses):
    recipe = tmp_path / "zero.toml"
    # stage 3: partition even tiny parameters (DeepSpeed keeps small ones whole by default)
    recipe.write_text(TINY_RECIPE.replace('type = "single"', f'type = "zero"\nstage = {stage}\n'
                                          "[parallel.extra.zero_optimization]\nstage3_param_persistence_threshold = 0"
                                          if stage == 3 else f'type = "zero"\nstage = {stage}'))
    out = tmp_path / "run"
    _ok(torchrun(2, recipe, out))
    assert losses(out) == pytest.approx(single_losses[4], rel=REL)
    # the export and the checkpoint hold the full trained tensors (not ZeRO-3 partitions)
    export = load_file(str(out / "export" / "trainable.safetensors"))
    saved = load_file(str(out / "checkpoints" / "step_0000003" / "trainable.safetensors"))
    assert {k: tuple(v.shape) for k, v in export.items()} == {"bridges.1.proj.weight": (64, 64),
                                                              "bridges.1.proj.bias": (64,)}
    for name in export:
        torch.testing.assert_close(export[name], saved[name])
    optimizer = torch.load(out / "checkpoints" / "step_0000003" / "optimizer.pt", weights_only=True)["optimizer"]
    assert set(optimizer["state"]) == {"bridges.1.proj.weight", "bridges.1.proj.bias"}
    assert optimizer["state"]["bridges.1.proj.weight"]["exp_avg"].shape == (64, 64)
    assert [g["weight_decay"] for g in optimizer["param_groups"]] == [0.05, 0.0]
    _convert_and_chat_load(out, tmp_path / "converted", saved)


def test_zero_honours_lr_scale(tmp_path, tiny_recipe, single_losses):
    """``lr_scale = {bridges = 2}`` at lr 1e-3 under ZeRO-2 trains as lr 2e-3 does in one process
    (only the Linear bridge trains; no warmup, min_lr 0)."""
    from mllmkit.recipe import load_recipe
    from mllmkit.train.loop import train

    reference = train(load_recipe(tiny_recipe, ["train.grad_accum=4", "train.lr=2e-3"]), tmp_path / "single").losses
    out = tmp_path / "zero"
    _ok(torchrun(2, tiny_recipe, out, "parallel.type=zero", "parallel.stage=2", "train.lr_scale.bridges=2.0"))
    assert losses(out) == pytest.approx(reference, rel=REL)
    assert losses(out)[1:] != pytest.approx(single_losses[4][1:], rel=1e-4)  # lr 1e-3 would train otherwise


def test_pipeline_two_stages_matches_single_with_a_frozen_stage(pipeline_run, single_losses):
    out, result = pipeline_run
    assert losses(out) == pytest.approx(single_losses[2], rel=REL)
    # the cost model put the embedding (with the only trainable part) on stage 0, stage 1 is frozen
    assert "pipeline partition (cost model): 2 stages" in result.stderr
    saved = load_file(str(out / "checkpoints" / "step_0000002" / "trainable.safetensors"))
    assert set(saved) == {"bridges.1.proj.weight", "bridges.1.proj.bias"}
    _convert_and_chat_load(out, out.parent / "converted", load_file(str(out / "checkpoints" / "step_0000003" /
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
    assert ("mllmkit: parallel.num_stages = 2: starting 2 processes with torchrun, one per stage "
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


def _convert_and_chat_load(run: pathlib.Path, target: pathlib.Path, saved: dict[str, torch.Tensor]) -> None:
    """``mllmkit convert`` of the run's last checkpoint loads in chat with exactly the trained tensors."""
    from mllmkit.chat.loading import load_chat_model
    from mllmkit.cli import main

    assert main(["convert", str(run / "checkpoints" / "step_0000003"), "--to", str(target)]) == 0
    model, _ = load_chat_model(target, device="cpu", precision="fp32")
    torch.testing.assert_close(model.bridges[1].proj.weight, saved["bridges.1.proj.weight"])
    torch.testing.assert_close(model.bridges[1].proj.bias, saved["bridges.1.proj.bias"])
