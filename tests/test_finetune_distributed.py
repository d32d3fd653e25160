"""Full fine-tuning and LoRA of the LLM on 2 CPU processes (gloo) against ``single``: ``fsdp`` (FSDP2) and
``zero`` stage 3, and state written under ``fsdp`` resumed under ``single``.

Tolerance: relative 1e-5 — the same samples and weights; sharded backends reduce gradients in other
orders, so only summation order and float32 rounding differ.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mllmkit.recipe import load_recipe
from mllmkit.testing.launch import TINY_RECIPE, losses, torchrun
from mllmkit.train.loop import train

pytestmark = pytest.mark.slow

REL = 1e-5
FULL = ["model.llm.tune=full", "model.llm.gradient_checkpointing=true"]
LORA = ["model.llm.tune=lora", "model.llm.lora.r=4", "model.llm.lora.dropout=0.0"]


def _ok(result) -> None:
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_recipe):
    """``single`` with 4 micro-batches a step (2 ranks x 2 micro-batches), full and LoRA, saving at step 2."""
    runs = {}
    for name, sets in (("full", FULL), ("lora", LORA)):
        out = tmp_path_factory.mktemp(f"single_{name}") / "run"
        runs[name] = (out, train(load_recipe(tiny_recipe, [*sets, "train.grad_accum=4", "train.save_every=2"]),
                                 out).losses)
    return runs


@pytest.fixture(scope="module")
def fsdp_full(tmp_path_factory, tiny_recipe):
    out = tmp_path_factory.mktemp("fsdp") / "run"
    _ok(torchrun(2, tiny_recipe, out, "parallel.type=fsdp", "train.save_every=2", *FULL))
    return out


def test_fsdp_full_fine_tune_matches_single(fsdp_full, reference):
    single_run, single = reference["full"]
    assert losses(fsdp_full) == pytest.approx(single, rel=REL)
    saved = load_file(str(fsdp_full / "checkpoints" / "step_0000003" / "trainable.safetensors"))
    expected = load_file(str(single_run / "checkpoints" / "step_0000003" / "trainable.safetensors"))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}  # full tensors
    for name in expected:
        torch.testing.assert_close(saved[name], expected[name], rtol=1e-4, atol=1e-6)
    optimizer = torch.load(fsdp_full / "checkpoints" / "step_0000003" / "optimizer.pt", weights_only=True)
    moments = optimizer["optimizer"]["state"]["llm.hf_model.model.layers.0.mlp.up_proj.weight"]
    assert moments["exp_avg"].shape == (128, 64)


def test_an_fsdp_checkpoint_resumes_under_single(fsdp_full, tiny_recipe, tmp_path):
    resumed = train(load_recipe(tiny_recipe, [*FULL, "train.grad_accum=4"]), tmp_path / "single",
                    resume=str(fsdp_full / "checkpoints" / "step_0000002"))
    assert resumed.losses == pytest.approx(losses(fsdp_full)[2:], rel=REL)


def test_single_checkpoint_resumes_under_fsdp(reference, tiny_recipe, tmp_path):
    single_run, single = reference["full"]
    out = tmp_path / "run"
    _ok(torchrun(2, tiny_recipe, out, "parallel.type=fsdp", *FULL,
                 resume=str(single_run / "checkpoints" / "step_0000002")))
    assert losses(out) == pytest.approx(single[2:], rel=REL)


def test_fsdp_lora_matches_single(reference, tiny_recipe, tmp_path):
    out = tmp_path / "run"
    _ok(torchrun(2, tiny_recipe, out, "parallel.type=fsdp", *LORA))
    assert losses(out) == pytest.approx(reference["lora"][1], rel=REL)
    assert (out / "export" / "adapters" / "llm" / "adapter_model.safetensors").is_file()


def test_zero3_full_fine_tune_matches_single(reference, tmp_path):
    recipe = tmp_path / "zero3.toml"
    recipe.write_text(TINY_RECIPE.replace('type = "single"', 'type = "zero"\nstage = 3\n'
                                          "[parallel.extra.zero_optimization]\nstage3_param_persistence_threshold = 0"))
    out = tmp_path / "run"
    _ok(torchrun(2, recipe, out, *FULL))
    assert losses(out) == pytest.approx(reference["full"][1], rel=REL)
    saved = load_file(str(out / "export" / "trainable.safetensors"))
    assert saved["llm.hf_model.model.layers.1.mlp.down_proj.weight"].shape == (64, 128)
