"""Export → transformers load → parity, for Qwen v1, Qwen2 and Baichuan2 LLMs at tiny size.

Each case writes real-layout tiny files (LAVIS ``eva_vit_g.pth``, a Qwen v1 folder with
``qwen.tiktoken``, a Qwen2 folder with ``tokenizer.json`` and tied embeddings, a Baichuan2 folder
with ``tokenizer.model``) plus a trained projection checkpoint, runs ``mllmkit export --verify``,
then checks the folder independently: ``Blip2ForConditionalGeneration`` and the PIL processor from
transformers against the mllmkit model loaded by ``mllmkit chat``'s loader (logits, 32 greedy
tokens, prompt ids, the tokenizer on a multilingual corpus), and ``load_export`` against both.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from mllmkit.cli import main
from mllmkit.export.tokenizers import CORPUS
from mllmkit.template import IMAGE_SPAN, encode_pieces

pytestmark = pytest.mark.slow


EMBEDDINGS = ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias")


def _eva(tmp_path, scale: float):
    """LAVIS-format EVA weights; the embeddings scaled by ``scale`` (50: unit-scale features, as a
    trained ViT's; at std 0.02 the tiny encoder's features are smaller than LayerNorm eps)."""
    from mllmkit_vision_eva import EVA_TINY, random_eva_state_dict

    state = random_eva_state_dict(EVA_TINY, blocks=3, dtype=torch.float32, seed=3)
    state = {k: v * scale if k in EMBEDDINGS else v for k, v in state.items()}
    path = tmp_path / "eva_vit_g.pth"
    torch.save(state, path)
    return path


def _qwen_v1(tmp_path):
    from mllmkit_llm_qwen.tiny_folders import LATER_CONFIG, v1_state_dict, write_v1_folder

    return {"type": "qwen", "path": str(write_v1_folder(tmp_path / "Qwen-tiny", v1_state_dict(),
                                                       config={**LATER_CONFIG, "seq_length": 512}))}


def _qwen2(tmp_path):
    from mllmkit_llm_qwen.tiny_folders import write_qwen2_folder

    return {"type": "qwen", "path": str(write_qwen2_folder(tmp_path / "Qwen2.5-tiny"))}


def _baichuan(tmp_path):
    from mllmkit_llm_baichuan.random_checkpoint import write_folder

    return {"type": "baichuan2", "path": str(write_folder(tmp_path / "Baichuan2-tiny")), "precision": "fp32"}


def _recipe(tmp_path, llm: dict, eva_scale: float) -> dict:
    return {"model": {"vision": {"type": "eva_tiny", "weights": str(_eva(tmp_path, eva_scale))},
                      "bridges": [{"type": "qformer_tiny", "init_std": 0.2, "dropout": 0.0}, {"type": "linear"}],
                      "llm": llm},
            "data": {"train": [{"type": "demo_shapes", "size": 8}]}, "chat": {"precision": "fp32"}}


def _write(tmp_path, llm_case, eva_scale: float = 50.0):
    import tomli_w

    from mllmkit.chat.loading import load_chat_model

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(tomli_w.dumps(_recipe(tmp_path, llm_case(tmp_path), eva_scale)))
    model, _ = load_chat_model(recipe, device="cpu", precision="fp32")
    g = torch.Generator().manual_seed(5)
    proj = model.bridges[1].proj
    trained = {"bridges.1.proj.weight": torch.randn(proj.weight.shape, generator=g) * 0.3,
               "bridges.1.proj.bias": torch.randn(proj.bias.shape, generator=g) * 0.3}
    save_file(trained, str(tmp_path / "trainable.safetensors"))
    return recipe, tmp_path / "trainable.safetensors", trained


@pytest.mark.parametrize("llm_case", [_qwen_v1, _qwen2, _baichuan], ids=["qwen_v1", "qwen2", "baichuan2"])
def test_export_loads_in_transformers_with_parity(plugin_host, tmp_path, capsys, llm_case):
    from PIL import Image
    from transformers import AutoProcessor, Blip2ForConditionalGeneration, GenerationConfig

    from mllmkit.chat.loading import load_chat_model
    from mllmkit.export import load_export
    from mllmkit.generation import generate

    recipe, ckpt, trained = _write(tmp_path, llm_case)
    out = tmp_path / "export"
    assert main(["export", str(recipe), "--checkpoint", str(ckpt), "--to", str(out), "--dtype", "fp32",
                 "--verify", "--max-shard-size", "200KB"]) == 0
    printed = capsys.readouterr().out
    assert "greedy 32 tokens identical: True" in printed and "texts identical" in printed
    assert len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1

    ours, _ = load_chat_model(recipe, checkpoint=ckpt, device="cpu", precision="fp32")
    assert torch.equal(ours.bridges[1].proj.weight, trained["bridges.1.proj.weight"])
    hf = Blip2ForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(out, backend="pil")
    assert hf.config.image_token_id == ours.llm.template.image_token_id
    assert hf.config.num_query_tokens == ours.tokens_per_image

    image = Image.new("RGB", (60, 44), (20, 160, 90))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[image], text=text, return_tensors="pt")
    ids = encode_pieces(ours.llm.template.pieces([{"role": "user", "content": IMAGE_SPAN + "What is this?"}],
                                                 ours.tokens_per_image, add_generation_prompt=True)).input_ids
    assert inputs["input_ids"][0].tolist() == ids
    pixels = ours.vision.image_transform(train=False)(image)[None]
    assert torch.equal(inputs["pixel_values"], pixels)
    with torch.no_grad():
        theirs = hf(**inputs).logits
        embeds = ours.embed(inputs["input_ids"], pixels=pixels)
        mine = ours.llm.logits(ours.llm.hidden(embeds))
        assert (theirs - mine).abs().max() <= 1e-4
        hf.language_model.generation_config.eos_token_id = None  # else generate stops there: compare all 32
        config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=None,
                                  pad_token_id=ours.llm.template.pad_token_id)
        hf_tokens = hf.generate(**inputs, generation_config=config)[0, inputs["input_ids"].shape[1]:].tolist()
    assert hf_tokens == generate(ours.llm, embeds, max_new_tokens=32, stop_token_ids=())
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == list(
        ours.llm.template.stop_token_ids)
    for sample in CORPUS:
        assert processor.tokenizer(sample, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
            ours.llm.tokenizer.encode(sample), sample

    restored = load_export(out, device="cpu", precision="fp32")
    original = ours.state_dict()
    assert restored.state_dict().keys() == original.keys()
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert restored.llm.tokenizer.encode(CORPUS[1]) == ours.llm.tokenizer.encode(CORPUS[1])


def test_verify_failure_stops_the_export(plugin_host, tmp_path, capsys):
    """EVA features near LayerNorm eps: LAVIS's ln_vision eps 1e-5 against Blip2's one vision eps
    (EVA's 1e-6) then changes the output; verify measures it and the export stops (exit 2)."""
    recipe, ckpt, _ = _write(tmp_path, _qwen_v1, eva_scale=1.0)
    out = tmp_path / "export"
    assert main(["export", str(recipe), "--checkpoint", str(ckpt), "--to", str(out), "--dtype", "fp32",
                 "--verify"]) == 2
    err = capsys.readouterr().err
    assert "parity check failed, nothing written to" in err and "logits max abs difference" in err
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-export*"))
