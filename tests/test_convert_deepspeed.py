"""``mllmkit convert``: mllmkit checkpoints and the seed's DeepSpeed layouts → chat-loadable exports."""

from __future__ import annotations

import pathlib

import pytest
import torch
from safetensors.torch import load_file

from mllmkit.chat.loading import load_chat_model
from mllmkit.cli import main
from mllmkit.convert import convert_checkpoint
from mllmkit.errors import UserError


def _proj(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(64, 64, generator=generator), "bias": torch.randn(64, generator=generator)}


def _assert_loaded(export: pathlib.Path, proj: dict[str, torch.Tensor]) -> None:
    model, _ = load_chat_model(export, device="cpu", precision="fp32")
    torch.testing.assert_close(model.bridges[1].proj.weight, proj["weight"].float())
    torch.testing.assert_close(model.bridges[1].proj.bias, proj["bias"].float())


def test_seed_zero_checkpoint_by_name(tmp_path, tiny_recipe):
    proj = _proj(1)
    tag = tmp_path / "deepspeed_ckpt" / "epoch_9"
    tag.mkdir(parents=True)
    module = {"visual_encoder.cls_token": torch.zeros(1, 1, 64), "Qformer.bert.embeddings.position_ids":
              torch.arange(8)[None], "llm_proj.weight": proj["weight"].bfloat16(), "llm_proj.bias": proj["bias"].bfloat16(),
              "llm_model.transformer.wte.weight": torch.zeros(640, 64)}
    torch.save({"module": module, "global_steps": 90, "ds_version": "0.13.5", "dp_world_size": 4,
                "param_shapes": [{"llm_proj.weight": torch.Size([64, 64])}]}, tag / "mp_rank_00_model_states.pt")
    (tag.parent / "latest").write_text("epoch_9")
    out = tmp_path / "export"
    assert main(["convert", str(tag.parent), "--to", str(out), "--recipe", str(tiny_recipe)]) == 0
    assert sorted(load_file(str(out / "trainable.safetensors"))) == ["bridges.1.proj.bias", "bridges.1.proj.weight"]
    _assert_loaded(out, {k: v.bfloat16() for k, v in proj.items()})


def test_seed_pipeline_checkpoint_by_name_not_layer_index(tmp_path, tiny_recipe):
    proj = _proj(2)
    step = tmp_path / "global_step5"
    step.mkdir()
    # the projection sits in whichever layer file holds it (here not layer 00), found by its name
    torch.save({"wtepipe.word_embeddings.weight": torch.zeros(640, 64)}, step / "layer_00-model_states.pt")
    torch.save({"visionpipe.llm_proj.weight": proj["weight"], "visionpipe.llm_proj.bias": proj["bias"],
                "visionpipe.visual_encoder.cls_token": torch.zeros(1, 1, 64)}, step / "layer_01-model_states.pt")
    torch.save({}, step / "layer_02-model_states.pt")
    torch.save({"layer.ln_1.weight": torch.ones(64)}, step / "layer_03-model_states.pt")
    torch.save({"occupy.weight": torch.zeros(4, 4)}, step / "layer_04-model_states.pt")
    shapes = convert_checkpoint(step, tmp_path / "export", str(tiny_recipe))
    assert shapes == {"bridges.1.proj.weight": (64, 64), "bridges.1.proj.bias": (64,)}
    _assert_loaded(tmp_path / "export", proj)


def test_seed_llm_weights_are_refused_when_the_recipe_trains_the_llm(tmp_path, tiny_recipe):
    step = tmp_path / "global_step5"
    step.mkdir()
    torch.save({"visionpipe.llm_proj.weight": torch.zeros(64, 64), "visionpipe.llm_proj.bias": torch.zeros(64)},
               step / "layer_00-model_states.pt")
    torch.save({"layer.ln_1.weight": torch.ones(64)}, step / "layer_05-model_states.pt")
    with pytest.raises(UserError) as err:
        convert_checkpoint(step, tmp_path / "export", str(tiny_recipe), ("model.llm.trainable=true",))
    assert "the recipe trains the LLM, and this seed checkpoint's LLM weights are in Qwen v1 layout" in str(err.value)


def test_wrong_projection_shape_is_refused(tmp_path, tiny_recipe):
    folder = tmp_path / "tag"
    folder.mkdir()
    torch.save({"module": {"llm_proj.weight": torch.zeros(64, 32), "llm_proj.bias": torch.zeros(64)}},
               folder / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError) as err:
        convert_checkpoint(folder, tmp_path / "export", str(tiny_recipe))
    assert str(err.value) == f"{folder}: bridges.1.proj.weight has shape [64, 32], {tiny_recipe} expects [64, 64]"
    assert not (tmp_path / "export").exists()


def test_mllmkit_checkpoint_finds_its_recipe_and_round_trips(tmp_path, tiny_recipe):
    from mllmkit.recipe import load_recipe
    from mllmkit.train.loop import train

    run = tmp_path / "run"
    train(load_recipe(tiny_recipe, ["train.max_steps=1"]), run)
    step = run / "checkpoints" / "step_0000001"
    out = tmp_path / "export"
    assert main(["convert", str(step), "--to", str(out)]) == 0  # recipe from <run>/export/recipe.toml
    saved = load_file(str(step / "trainable.safetensors"))
    _assert_loaded(out, {"weight": saved["bridges.1.proj.weight"], "bias": saved["bridges.1.proj.bias"]})
