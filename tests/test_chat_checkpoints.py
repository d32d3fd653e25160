"""Loading trained weights for chat from every accepted layout (tiny files in the seed's layouts)."""

from __future__ import annotations

import copy

import pytest
import tomli_w
import torch
from safetensors.torch import save_file

from mllmkit.chat import chat_session
from mllmkit.weights import WeightsError

SUPPORTED = ("supported: an mllmkit export folder or its trainable.safetensors (keys named like the model's "
             "parameters), and the seed's projection checkpoints with llm_proj.weight and llm_proj.bias "
             "(LAVIS checkpoint_N.pth, model.pth, DeepSpeed mp_rank_00_model_states.pt)")


@pytest.fixture
def proj():
    g = torch.Generator().manual_seed(1)
    return {"llm_proj.weight": torch.randn(32, 24, generator=g), "llm_proj.bias": torch.randn(32, generator=g)}


def _check(session, proj, index=0):
    bridge = session.model.bridges[index].proj
    assert torch.equal(bridge.weight, proj["llm_proj.weight"])
    assert torch.equal(bridge.bias, proj["llm_proj.bias"])


def test_lavis_checkpoint(plugin_host, toy_recipe, proj, tmp_path):
    path = tmp_path / "checkpoint_9.pth"
    torch.save({"model": proj, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}, "epoch": 9}, path)
    _check(chat_session(toy_recipe, checkpoint=path, device="cpu", precision="fp32"), proj)


def test_bare_model_pth(plugin_host, toy_recipe, proj, tmp_path):
    torch.save(proj, tmp_path / "model.pth")
    _check(chat_session(toy_recipe, checkpoint=tmp_path / "model.pth", device="cpu", precision="fp32"), proj)


def test_deepspeed_model_states(plugin_host, toy_recipe, proj, tmp_path):
    folder = tmp_path / "global_step100"
    folder.mkdir()
    torch.save({"module": proj, "buffer_names": [], "global_steps": 100}, folder / "mp_rank_00_model_states.pt")
    _check(chat_session(toy_recipe, checkpoint=folder / "mp_rank_00_model_states.pt", device="cpu",
                        precision="fp32"), proj)
    _check(chat_session(toy_recipe, checkpoint=folder, device="cpu", precision="fp32"), proj)


def test_export_folder_as_checkpoint_and_as_recipe(plugin_host, toy_recipe, proj, tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    save_file({"bridges.0.proj.weight": proj["llm_proj.weight"], "bridges.0.proj.bias": proj["llm_proj.bias"]},
              str(export / "trainable.safetensors"))
    (export / "recipe.toml").write_text(tomli_w.dumps(toy_recipe))
    _check(chat_session(toy_recipe, checkpoint=export, device="cpu", precision="fp32"), proj)
    _check(chat_session(toy_recipe, checkpoint=export / "trainable.safetensors", device="cpu", precision="fp32"), proj)
    _check(chat_session(export, device="cpu", precision="fp32"), proj)  # the folder stands for recipe + weights


def test_seed_projection_goes_to_the_linear_bridge_ending_at_the_llm(plugin_host, toy_recipe, tmp_path):
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["bridges"] = [{"type": "linear", "out_dim": 16}, {"type": "linear"}]
    g = torch.Generator().manual_seed(2)
    proj = {"llm_proj.weight": torch.randn(32, 16, generator=g), "llm_proj.bias": torch.randn(32, generator=g)}
    torch.save(proj, tmp_path / "model.pth")
    _check(chat_session(recipe, checkpoint=tmp_path / "model.pth", device="cpu", precision="fp32"), proj, index=1)


def test_checkpoint_from_the_recipe_chat_section(plugin_host, toy_recipe, proj, tmp_path):
    torch.save(proj, tmp_path / "model.pth")
    recipe = copy.deepcopy(toy_recipe)
    recipe["chat"] = {"checkpoint": "model.pth", "device": "cpu", "precision": "fp32"}
    path = tmp_path / "recipe.toml"
    path.write_text(tomli_w.dumps(recipe))
    _check(chat_session(path), proj)


def test_unfreeze_llm_checkpoint_is_refused(plugin_host, toy_recipe, proj, tmp_path):
    path = tmp_path / "unfreeze_llm_model.pth"
    torch.save({**proj, "llm_model.transformer.wte.weight": torch.zeros(4, 32),
                "llm_model.transformer.h.0.attn.c_attn.weight": torch.zeros(96, 32)}, path)
    with pytest.raises(WeightsError) as err:
        chat_session(toy_recipe, checkpoint=path, device="cpu", precision="fp32")
    assert str(err.value) == (f"{path}: holds a fine-tuned LLM in the seed's layout (2 keys like "
                              f"'llm_model.transformer.wte.weight', from unfreeze_llm_model.pth); loading it is "
                              f"not supported; {SUPPORTED}")


def test_unknown_keys_are_refused_naming_the_expected_ones(plugin_host, toy_recipe, proj, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({**proj, "visual_proj.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(WeightsError) as err:
        chat_session(toy_recipe, checkpoint=path, device="cpu", precision="fp32")
    assert str(err.value) == (f"{path}: keys that match no model parameter (1): visual_proj.weight; expected this "
                              f"model's parameter names (trainable ones: bridges.0.proj.weight, "
                              f"bridges.0.proj.bias) or the seed's llm_proj.weight, llm_proj.bias; {SUPPORTED}")


def test_projection_without_a_linear_bridge_is_refused(plugin_host, toy_recipe, proj, tmp_path):
    recipe = copy.deepcopy(toy_recipe)
    recipe["model"]["bridges"] = [{"type": "mlp"}]
    torch.save(proj, tmp_path / "model.pth")
    with pytest.raises(WeightsError) as err:
        chat_session(recipe, checkpoint=tmp_path / "model.pth", device="cpu", precision="fp32")
    assert str(err.value) == ("the checkpoint holds the seed's llm_proj.* projection, but the recipe has no "
                              "'linear' bridge with out_dim = the LLM hidden size (32); add [[model.bridges]] "
                              "type = \"linear\" after the last bridge")


def test_wrong_shape_is_refused(plugin_host, toy_recipe, tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"llm_proj.weight": torch.zeros(32, 7), "llm_proj.bias": torch.zeros(32)}, path)
    with pytest.raises(WeightsError) as err:
        chat_session(toy_recipe, checkpoint=path, device="cpu", precision="fp32")
    assert str(err.value) == (f"{path}: llm_proj.weight has shape [32, 7], the model expects [32, 24] for "
                              f"bridges.0.proj.weight")


def test_missing_checkpoint(plugin_host, toy_recipe, tmp_path):
    with pytest.raises(WeightsError) as err:
        chat_session(toy_recipe, checkpoint=tmp_path / "nope.pth", device="cpu")
    assert str(err.value) == f"checkpoint not found: {tmp_path / 'nope.pth'}"


def test_parts_without_weight_files_are_the_random_parts_training_built(plugin_host, toy_recipe):
    from mllmkit import assemble, load_recipe
    from mllmkit.chat.loading import load_chat_model

    recipe = load_recipe(dict(toy_recipe, train={"seed": 7}))
    torch.manual_seed(7)  # what the training loop does before assembling
    trained = assemble(recipe).state_dict()
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    model, _ = load_chat_model(recipe, device="cpu", precision="fp32")
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is left alone
    chat = model.state_dict()
    assert chat.keys() == trained.keys()
    assert all(torch.equal(chat[k], trained[k]) for k in trained)
