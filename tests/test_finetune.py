"""Fine-tuning the LLM on CPU at tiny size: LoRA (peft) trains only adapters, merges exactly, loads in peft
as is, resumes exactly; starting from an earlier export; the errors of bad tune settings."""

from __future__ import annotations

import json
import pathlib
import re
import struct

import pytest
import torch
from safetensors.torch import load_file

from mllmkit.assemble import assemble, check_wiring
from mllmkit.chat.loading import load_chat_model
from mllmkit.cli import main
from mllmkit.errors import RecipeError, UserError
from mllmkit.recipe import load_recipe
from mllmkit.testing.launch import TINY_RECIPE
from mllmkit.train.loop import train
from mllmkit.tune.lora import adapter_inputs_uncast

LORA = ["model.llm.tune=lora", "model.llm.lora.r=4", "model.llm.lora.alpha=8", "model.llm.lora.dropout=0.0",
        "train.max_steps=4", "train.save_every=2"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    recipe = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    run = tmp_path_factory.mktemp("lora") / "run"
    result = train(load_recipe(recipe, LORA), run)
    return recipe, run, result


def _ids() -> torch.Tensor:
    return torch.tensor([[5, 17, 3, 99, 42, 7, 64, 12]])


def _logits(hf_model) -> torch.Tensor:
    hf_model.eval()
    with torch.no_grad():
        return hf_model(input_ids=_ids()).logits.float()


def test_lora_trains_only_the_adapters(lora_run):
    recipe, run, result = lora_run
    assert result.losses[-1] < result.losses[0]
    saved = load_file(str(run / "checkpoints" / "step_0000004" / "trainable.safetensors"))
    adapters = {k for k in saved if k.startswith("llm.")}
    assert set(saved) - adapters == {"bridges.1.proj.weight", "bridges.1.proj.bias"}
    # 2 decoder layers x 7 Linear layers ("all-linear": not the head), an A and a B matrix each
    assert len(adapters) == 28 and all(re.fullmatch(r"llm\.hf_model\.model\.layers\.\d\.(self_attn|mlp)\.\w+_proj\."
                                                    r"lora_[AB]\.default\.weight", k) for k in adapters)
    assert all(saved[k].abs().max() > 0 for k in adapters if ".lora_B." in k)  # B starts at zero: it trained
    # every other weight is what the run started from (the seed's assembly)
    torch.manual_seed(1)
    start = assemble(load_recipe(recipe, LORA))
    trained, _ = load_chat_model(run / "export", device="cpu", precision="fp32")
    before = dict(start.named_parameters())
    changed = {n for n, p in trained.named_parameters() if not torch.equal(p, before[n])}
    assert changed == adapters | {"bridges.1.proj.weight", "bridges.1.proj.bias"}


def test_a_step_under_autocast_skips_peft_input_casts_and_changes_no_number(lora_run):
    """A bf16 LLM with fp32 adapters: in the step, peft's cast of each adapted layer's input to fp32 is
    skipped (autocast runs the adapters' matmuls in bf16 either way); loss and gradients are identical."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    recipe, _, _ = lora_run
    model = assemble(load_recipe(recipe, [*LORA, "model.llm.precision=bf16"]))
    llm = model.llm.hf_model
    layers = [m for m in llm.modules() if isinstance(m, BaseTunerLayer)]
    assert layers and {m.lora_A["default"].weight.dtype for m in layers} == {torch.float32}

    def loss_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = llm(input_ids=_ids(), labels=_ids()).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in llm.named_parameters() if p.requires_grad}

    cast_loss, cast_grads = loss_and_grads()
    with adapter_inputs_uncast(model):
        assert not any(m.cast_input_dtype_enabled for m in layers)
        loss, grads = loss_and_grads()
    assert all(m.cast_input_dtype_enabled for m in layers)  # generation without autocast needs the casts back
    assert torch.equal(loss, cast_loss) and grads.keys() == cast_grads.keys()
    assert all(torch.equal(grads[n], cast_grads[n]) for n in grads)


def test_adapter_folder_is_peft_layout_and_loads_in_peft(lora_run):
    from peft import PeftModel

    recipe, run, _ = lora_run
    folder = run / "export" / "adapters" / "llm"
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["task_type"]) == ("LORA", 4, 8.0,
                                                                                           "CAUSAL_LM")
    keys = load_file(str(folder / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    torch.manual_seed(1)
    base = assemble(load_recipe(recipe)).llm.hf_model  # the plain transformers model, no adapters
    with_peft = PeftModel.from_pretrained(base, str(folder))
    trained, _ = load_chat_model(run / "export", device="cpu", precision="fp32")
    torch.testing.assert_close(_logits(with_peft), _logits(trained.llm.hf_model), rtol=0, atol=1e-5)


def test_merged_export_gives_the_adapted_logits(lora_run, tmp_path):
    _, run, _ = lora_run
    assert main(["convert", str(run / "export"), "--to", str(tmp_path / "merged"), "--merge-lora"]) == 0
    merged, recipe = load_chat_model(tmp_path / "merged", device="cpu", precision="fp32")
    assert recipe.llm.shared.policy == "full" and recipe.llm.shared.lora is None
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    adapted, _ = load_chat_model(run / "export", device="cpu", precision="fp32")
    reference = _logits(adapted.llm.hf_model)
    assert (reference - _logits(merged.llm.hf_model)).abs().max() < 1e-5


def test_lora_resume_continues_exactly(lora_run, tmp_path):
    recipe, run, result = lora_run
    resumed = train(load_recipe(recipe, LORA), tmp_path / "resumed",
                    resume=str(run / "checkpoints" / "step_0000002"))
    assert resumed.losses == pytest.approx(result.losses[2:], rel=1e-6)


def test_stage_two_starts_from_the_stage_one_export(lora_run, tmp_path):
    recipe, run, _ = lora_run
    stage1 = load_file(str(run / "export" / "trainable.safetensors"))
    stage2 = tmp_path / "stage2.toml"
    stage2.write_text(TINY_RECIPE.replace('[model.llm]', f'[model]\ninit_from = "{run / "export"}"\n\n[model.llm]')
                      .replace('type = "linear"', 'type = "linear"\ntrainable = false'))
    model = assemble(load_recipe(stage2, ["model.llm.tune=lora", "model.llm.lora.r=4"]))
    for name in ("bridges.1.proj.weight", "llm.hf_model.model.layers.1.mlp.up_proj.lora_B.default.weight"):
        torch.testing.assert_close(model.get_parameter(name), stage1[name])
    # names and shapes are strict: another rank, or no adapters for the export's LoRA tensors, stops the run
    with pytest.raises(RecipeError, match=r"lora_A.default.weight has shape \[4, 128\], the model expects \[8, 128\]"):
        assemble(load_recipe(stage2, ["model.llm.tune=lora"]))
    with pytest.raises(RecipeError) as info:
        assemble(load_recipe(stage2))
    assert info.value.key == "model.init_from" and "keys that match no model parameter (28)" in str(info.value)


def test_full_fine_tune_trains_every_llm_weight(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    run = train(load_recipe(recipe, ["model.llm.tune=full", "train.max_steps=2"]), tmp_path / "run")
    saved = load_file(str(run.export_dir / "trainable.safetensors"))
    model = assemble(load_recipe(recipe))
    assert {k for k in saved if k.startswith("llm.")} == {n for n, _ in model.named_parameters()
                                                          if n.startswith("llm.")}


def test_gradient_checkpointing_recomputes_the_trained_llm(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    model = assemble(load_recipe(recipe, ["model.llm.tune=full", "model.llm.gradient_checkpointing=true"]))
    calls = []
    layer = model.llm.layers()[0]
    layer.self_attn.register_forward_hook(lambda *_: calls.append(torch.is_grad_enabled()))
    model.train()
    ids = torch.tensor([[1, 2, 3, 4]])
    out = model(input_ids=ids, labels=ids)
    out.loss_sum.backward()
    assert calls == [True, True]  # once in forward, once recomputed in backward
    assert layer.self_attn.q_proj.weight.grad is not None


# -- bad input --

def _assemble_error(tmp_path, *sets) -> RecipeError:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    with pytest.raises(RecipeError) as info:
        assemble(load_recipe(recipe, list(sets)))
    return info.value


def test_a_target_matching_nothing_names_it_and_the_candidates(tmp_path):
    error = _assemble_error(tmp_path, "model.llm.tune=lora", 'model.llm.lora.targets=["q_proj", "qkv"]')
    assert error.key == "model.llm.lora.targets"
    assert error.detail == ("'qkv' matches no module of qwen; its modules LoRA can wrap: model.embed_tokens, "
                            "model.layers.N.self_attn.q_proj, model.layers.N.self_attn.k_proj, "
                            "model.layers.N.self_attn.v_proj, model.layers.N.self_attn.o_proj, "
                            "model.layers.N.mlp.gate_proj, model.layers.N.mlp.up_proj, model.layers.N.mlp.down_proj, "
                            "lm_head")


def test_a_target_lora_cannot_wrap_is_refused(tmp_path):
    error = _assemble_error(tmp_path, "model.llm.tune=lora", 'model.llm.lora.targets=["layers.*.mlp"]')
    assert error.key == "model.llm.lora.targets"
    assert error.detail.startswith("'layers.*.mlp' matches model.layers.0.mlp (Qwen2MLP), which LoRA cannot wrap")


def test_lora_on_a_part_without_linear_layers_is_refused(tmp_path):
    from mllmkit.recipe.shared import LoraKeys
    from mllmkit.tune.lora import apply_lora

    with pytest.raises(RecipeError) as info:
        apply_lora(torch.nn.Sequential(torch.nn.LayerNorm(4)), LoraKeys(), "bridge", "model.bridges[0]", "norm")
    assert (info.value.key, info.value.detail) == (
        "model.bridges[0].tune", '"lora": norm has no Linear layer for LoRA to wrap (peft wraps Linear, Embedding '
                                 'and Conv layers); set tune = "full" or "frozen"')


def test_quantize_on_cpu_is_refused_at_check_time(tmp_path):
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    with pytest.raises(RecipeError) as info:
        check_wiring(load_recipe(recipe, ["model.llm.tune=lora", "model.llm.quantize=nf4"]))
    assert info.value.key == "model.llm.quantize"
    assert "QLoRA quantizes with bitsandbytes on CUDA, and this runs on the CPU" in str(info.value)
    assert main(["check", str(recipe), "--set", "model.llm.tune=lora", "--set", "model.llm.quantize=int8"]) == 2


def _huge_safetensors(path: pathlib.Path, rows: int) -> pathlib.Path:
    """A header-only .safetensors file declaring one [rows, rows] fp32 tensor (no data: only headers are read)."""
    header = json.dumps({"weight": {"dtype": "F32", "shape": [rows, rows], "data_offsets": [0, rows * rows * 4]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode())
    return path


def test_a_full_fine_tune_that_cannot_fit_is_refused_with_its_figures(tmp_path, capsys):
    from mllmkit.tune.memory import safetensors_params

    big = _huge_safetensors(tmp_path / "big.safetensors", 400_000)  # 1.6e11 parameters: 2.3 TiB to train
    assert safetensors_params(big) == 160_000_000_000
    recipe = tmp_path / "big.toml"
    recipe.write_text(TINY_RECIPE.replace('type = "linear"', 'type = "linear"\nweights = "big.safetensors"\n'
                                                             'tune = "full"'))
    with pytest.raises(UserError) as info:
        train(load_recipe(recipe), tmp_path / "run")
    assert re.fullmatch(
        r'model\.bridges\[1\]\.tune = "full": the fine-tune needs about 2384\.2 GiB per process before activations '
        r"— weights 596\.0 GiB \+ gradients 596\.0 GiB \+ AdamW state 1192\.1 GiB for 160\.00B trainable parameters, "
        r"frozen weights 0\.0 GiB — but cpu has \d+\.\d GiB free; shard it over more devices "
        r'\(parallel\.type = "fsdp", or "zero" with stage = 3\), or set tune = "lora"', str(info.value))
    assert not (tmp_path / "run" / "checkpoints").exists()
