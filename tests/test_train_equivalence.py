"""Gradient accumulation and resume are exact: 4 micro-batches of 1 equal one batch of 4 (token
reduction), and a run resumed from a checkpoint continues with the losses of the uninterrupted run."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch

from mllmkit.assemble import assemble
from mllmkit.builtin.backends import SingleBackend
from mllmkit.builtin.demo_shapes import DemoShapes
from mllmkit.data import Collator, SampleEncoder
from mllmkit.recipe import load_recipe
from mllmkit.train.optim import build_adamw


def _setup(toy_recipe, reduction: str):
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["llm"]["trainable"] = True
    recipe["train"] = {"precision": "fp32", "loss_reduction": reduction, "lr": 1e-2, "grad_clip": 1.0}
    loaded = load_recipe(recipe)
    torch.manual_seed(0)
    model = assemble(loaded)
    encoder = SampleEncoder(model.llm.template, model.tokens_per_image, model.vision.image_transform(False), 128)
    data = DemoShapes(size=4, image_size=16)
    samples = [encoder(data[i]) for i in range(4)]
    backend = SingleBackend("cpu")
    backend.setup()
    engine = backend.prepare(model, functools.partial(build_adamw, train=loaded.train), lambda step: 1e-2,
                             loaded.train)
    return engine, samples, Collator(model.llm.template.pad_token_id)


@pytest.mark.parametrize("reduction", ["token", "sample"])
def test_accumulating_4x1_equals_one_batch_of_4(plugin_host, toy_recipe, reduction):
    big, samples, collate = _setup(toy_recipe, reduction)
    small, _, _ = _setup(toy_recipe, reduction)
    assert len({len(s.input_ids) for s in samples}) > 1  # lengths differ, so the reductions differ
    grads = {}
    for name, engine in (("big", big), ("small", small)):  # record the gradients the optimizer steps with
        step = engine.runner.optimizer.step

        def recording_step(*args, _name=name, _engine=engine, _step=step, **kwargs):
            grads[_name] = [p.grad.detach().clone() for p in _engine.model.trainable_parameters()]
            return _step(*args, **kwargs)
        engine.runner.optimizer.step = recording_step
    out_big = big.train_step([collate(samples)])
    out_small = small.train_step([collate([s]) for s in samples])
    diffs = [float((a - b).abs().max()) for a, b in zip(grads["big"], grads["small"])]
    if reduction == "token":
        # an independent computation of the true loss: all token losses / all labelled tokens
        model = _setup(toy_recipe, reduction)[0].model
        with torch.no_grad():
            outs = [model(**collate([s]).model_inputs("cpu")) for s in samples]
        expected = float(sum(o.loss_sum for o in outs) / sum(o.num_tokens for o in outs))
        assert out_big["loss"] == pytest.approx(expected, abs=1e-6)
        assert out_small["loss"] == pytest.approx(expected, abs=1e-6)
        assert max(diffs) < 1e-6
        assert out_big["grad_norm"] == pytest.approx(out_small["grad_norm"], abs=1e-5)
    else:
        # the seed's per-micro-batch mean weights samples, not tokens: the steps differ when lengths do
        assert max(diffs) > 1e-6
    assert out_big["tokens"] == out_small["tokens"] == sum(collate([s]).num_tokens for s in samples)


def _run_recipe(toy_recipe, tmp_path, **train):
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["llm"]["trainable"] = True
    recipe["data"] = {"train": [{"type": "demo_shapes", "size": 48, "image_size": 16}],
                      "eval": [{"type": "demo_shapes", "split": "eval", "size": 8, "image_size": 16}]}
    recipe["train"] = {"precision": "fp32", "lr": 5e-3, "micro_batch_size": 2, "grad_accum": 2, "max_steps": 8,
                       "warmup_steps": 2, "log_every": 1, "eval_max_new_tokens": 2, "tensorboard": False, **train}
    return load_recipe(recipe)


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(plugin_host, toy_recipe, tmp_path):
    from mllmkit.train.checkpoint import list_checkpoints
    from mllmkit.train.loop import train

    recipe = _run_recipe(toy_recipe, tmp_path, save_every=3, keep_last=10, epochs=1)
    full = train(recipe, tmp_path / "full")
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["step_0000003", "step_0000006", "step_0000008"]
    resumed = train(recipe, tmp_path / "resumed", resume=str(tmp_path / "full" / "checkpoints" / "step_0000003"))
    assert resumed.steps == 8
    assert resumed.losses == pytest.approx(full.losses[3:], abs=1e-6)
    assert len(full.losses) == 8
    from safetensors.torch import load_file

    a, b = load_file(str(tmp_path / "full/export/trainable.safetensors")), load_file(
        str(tmp_path / "resumed/export/trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    # metrics.jsonl of the resumed run starts after the resumed step
    steps = [json.loads(l)["step"] for l in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert steps[:2] == [4, 5]


@pytest.mark.slow
def test_resume_auto_across_an_epoch_boundary(plugin_host, toy_recipe, tmp_path):
    import shutil

    from mllmkit.train.loop import train

    data = _run_recipe(toy_recipe, tmp_path, max_steps=6, save_every=2, keep_last=10).to_dict()
    data["data"]["train"] = [{"type": "demo_shapes", "size": 12, "image_size": 16}]  # 3 steps per epoch
    data["data"]["eval"] = []
    recipe = load_recipe(data)
    full = train(recipe, tmp_path / "a")
    # the interrupted run: its folder holds only the step-2 checkpoint (epoch 0); auto finds it
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a/checkpoints/step_0000002", tmp_path / "b/checkpoints/step_0000002")
    resumed = train(recipe, tmp_path / "b", resume="auto")
    assert resumed.losses == pytest.approx(full.losses[2:], abs=1e-6)
    # auto with the run finished: nothing left to do
    assert train(recipe, tmp_path / "b", resume="auto").losses == []


def test_a_step_whose_every_sample_was_skipped_changes_nothing(plugin_host, toy_recipe):
    """Data errors took every sample of the step: no backward, no AdamW step, the step is counted."""
    engine, samples, collate = _setup(toy_recipe, "token")
    before = {n: p.detach().clone() for n, p in engine.model.named_parameters() if p.requires_grad}
    out = engine.train_step([collate([]), collate([])])
    assert out["skipped"] is True and out["samples"] == 0.0 and out["loss"] != out["loss"]  # nan
    assert engine.step == 1 and not engine.runner.optimizer.state
    for name, param in engine.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, before[name]), name
    assert "skipped" not in engine.train_step([collate(samples)])  # the next step trains as usual


@pytest.mark.slow
def test_resume_matches_uninterrupted_run_with_dropout(plugin_host, toy_recipe, tmp_path):
    """A trained Q-Former with dropout 0.1: the resumed run draws the dropout masks of the uninterrupted
    run (the DataLoader seeds its workers from its own generator, not the restored global one)."""
    pytest.importorskip("mllmkit_bridge_qformer", reason="plugins/bridge_qformer is not installed")
    from mllmkit.data.loader import loader_seed
    from mllmkit.train.loop import train

    data = _run_recipe(toy_recipe, tmp_path, save_every=3, keep_last=10).to_dict()
    data["model"]["bridges"] = [{"type": "qformer_tiny", "dropout": 0.1, "init_std": 0.2, "trainable": True},
                                {"type": "linear"}]
    data["data"]["eval"] = []
    recipe = load_recipe(data)
    full = train(recipe, tmp_path / "full")
    state = json.loads((tmp_path / "full/checkpoints/step_0000003/trainer_state.json").read_text())
    assert state["loader_seed"] == loader_seed(recipe.train.seed, 0)  # stated in the checkpoint
    resumed = train(recipe, tmp_path / "resumed", resume=str(tmp_path / "full/checkpoints/step_0000003"))
    assert len(full.losses) == 8
    assert resumed.losses == pytest.approx(full.losses[3:], abs=1e-6)
