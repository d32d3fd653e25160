"""The core's ``zero`` backend (DeepSpeed ZeRO 0–3) on 2 CPU processes (gloo) against ``single``'s losses.

Tolerance: relative 1e-5 — the same samples and weights; ZeRO-2/3 reduce gradients in buckets, so
only summation order and float32 rounding differ.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mllmkit.builtin.zero import zero_ds_config
from mllmkit.recipe import load_recipe
from mllmkit.testing.launch import TINY_RECIPE, convert_and_chat_load, losses, torchrun

REL = 1e-5


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


def test_zero_config_follows_the_recipe(tiny_recipe):
    recipe = load_recipe(tiny_recipe, ["parallel.type=zero", "parallel.stage=2", "parallel.offload_optimizer=cpu",
                                "train.grad_clip=0.5", "parallel.reduce_bucket_size=1000"])
    config = zero_ds_config(recipe.parallel.config, recipe.train, world=4)
    assert config == {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "train_batch_size": 16,
        "steps_per_print": 10 ** 9, "wall_clock_breakdown": False, "gradient_clipping": 0.5,
        "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                              "reduce_bucket_size": 1000, "allgather_bucket_size": 200_000_000,
                              "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.05}},
    }


@pytest.mark.slow
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
    convert_and_chat_load(out, tmp_path / "converted", saved)


@pytest.mark.slow
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
