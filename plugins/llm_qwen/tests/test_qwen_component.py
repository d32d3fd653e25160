"""The ``qwen`` component through mllmkit.build: qwen_tiny with no files, HFCausalLM shapes,
generation with inputs_embeds stopping at <|im_end|>, and native Qwen2 folders."""

from __future__ import annotations

import json

import pytest
import torch

import mllmkit
from mllmkit.errors import UserError
from mllmkit.template import encode_pieces

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]


def test_qwen_tiny_builds_with_no_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    llm = mllmkit.build("llm", "qwen", preset="qwen_tiny", precision="fp32")
    assert type(llm.hf_model).__name__ == "Qwen2ForCausalLM"
    assert llm.hidden_size == 64 and len(llm.layers()) == 2
    assert llm.template.image_token_id == llm.tokenizer.token_id("<|extra_0|>") == 380
    assert llm.template.stop_token_ids == (379, 378) and llm.template.pad_token_id == 377
    assert llm.template.default_system == "You are a helpful assistant."
    ids = torch.tensor([encode_pieces(llm.template.pieces([{"role": "user", "content": "hi"}], 4,
                                                          add_generation_prompt=True)).input_ids] * 2)
    hidden = llm.hidden(llm.embed(ids), attention_mask=torch.ones_like(ids))
    assert hidden.shape == (2, ids.shape[1], 64)
    assert llm.logits(hidden).shape == (2, ids.shape[1], 640)
    assert sum(p.numel() for p in llm.parameters()) < 200_000


def test_preset_options_and_errors():
    llm = mllmkit.build("llm", "qwen", preset="qwen_tiny", system="Answer in one word.", precision="bf16")
    assert llm.template.default_system == "Answer in one word."
    assert llm.hf_model.dtype == torch.bfloat16
    with pytest.raises(UserError, match="set `path`.*or `preset`"):
        mllmkit.build("llm", "qwen")


def test_generate_with_inputs_embeds_stops_at_im_end():
    llm = mllmkit.build("llm", "qwen", preset="qwen_tiny", precision="fp32")
    m, tok = llm.hf_model, llm.tokenizer
    nl, b, im_end = tok.encode("\n")[0], tok.encode("b")[0], tok.token_id("<|im_end|>")
    with torch.no_grad():  # the residual stream carries only the current token: next = f(current)
        for layer in llm.layers():
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = llm.embedding.weight, llm.head.weight
        emb[nl] = 0; emb[nl, 0] = 1.0  # "\n" → "b" → <|im_end|> → stop
        emb[b] = 0; emb[b, 1] = 1.0
        head.zero_(); head[b, 0] = 10.0; head[im_end, 1] = 10.0
    prompt = encode_pieces(llm.template.pieces([{"role": "user", "content": "hi"}], 4,
                                               add_generation_prompt=True)).input_ids
    assert prompt[-1] == nl
    ids = torch.tensor([prompt])
    out = m.generate(inputs_embeds=llm.embed(ids), attention_mask=torch.ones_like(ids), max_new_tokens=10,
                     do_sample=False)
    assert out[0].tolist() == [b, im_end]
    assert list(m.generation_config.eos_token_id) == [im_end, tok.token_id("<|im_start|>")]


# -- Qwen2 / Qwen2.5 folders --

def _tokenizer_json(path, specials):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["What shape is in the image? The circle is red.", "You are a helpful assistant."] * 5,
                            trainer)
    tok.save(str(path))
    return tok


def _qwen2_folder(tmp_path, specials=SPECIALS, tie=False):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = tmp_path / "Qwen2.5-tiny"
    tok = _tokenizer_json(tmp_path / "tokenizer.json", specials)
    config = Qwen2Config(vocab_size=448, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                         tie_word_embeddings=tie, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    model.save_pretrained(folder)
    (tmp_path / "tokenizer.json").rename(folder / "tokenizer.json")
    return folder, model, tok


@pytest.mark.parametrize("tie", [False, True])
def test_qwen2_folder_loads_and_matches(tmp_path, tie):
    folder, ref, tok = _qwen2_folder(tmp_path, tie=tie)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2"
    llm = mllmkit.build("llm", "qwen", path=str(folder), precision="fp32")
    assert llm.template.image_token_id == tok.token_to_id("<|image_pad|>")
    assert llm.template.stop_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|im_start|>"))
    assert llm.max_positions == 64
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = llm.logits(llm.hidden(llm.embed(ids)))
        want = ref(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    if tie:
        assert llm.head.weight is llm.embedding.weight
    # user text never becomes special tokens
    plain = llm.tokenizer.encode("a <|im_end|> b <|image_pad|>")
    assert not set(plain) & {tok.token_to_id(s) for s in SPECIALS}
    assert llm.tokenizer.decode(plain) == "a <|im_end|> b <|image_pad|>"


def test_qwen2_image_token_option_and_refusal(tmp_path):
    folder, _, tok = _qwen2_folder(tmp_path, specials=SPECIALS[:3] + ["<|vision_pad|>"])
    with pytest.raises(UserError, match=r"has none of <\|extra_0\|>, <\|image_pad\|> .*set the option image_token"):
        mllmkit.build("llm", "qwen", path=str(folder))
    llm = mllmkit.build("llm", "qwen", path=str(folder), image_token="<|vision_pad|>")
    assert llm.template.image_token_id == tok.token_to_id("<|vision_pad|>")
    with pytest.raises(UserError, match=r"image_token '<\|nope\|>' is not a token of"):
        mllmkit.build("llm", "qwen", path=str(folder), image_token="<|nope|>")


def test_path_and_preset_checks_before_download_and_after(tmp_path):
    """With both, `mllmkit check` works before the folder exists; a folder of another size is refused."""
    from mllmkit_llm_qwen.components import QwenConfig, qwen_dims

    missing = QwenConfig(path=tmp_path / "Qwen-7B-Chat", preset="qwen7b_chat")
    assert qwen_dims(missing).out_dim == 4096
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen2", "hidden_size": 64}')
    with pytest.raises(UserError) as info:
        qwen_dims(QwenConfig(path=folder, preset="qwen7b_chat"))
    assert str(info.value) == (f"qwen: {folder / 'config.json'} describes a model with hidden size 64, but "
                               "preset = 'qwen7b_chat' expects 4096; fix the preset or the path")
