"""Tiny random Baichuan2-7B-format files for tests and demos: config.json, generation_config.json,
``pytorch_model.bin`` with the real key names, and a ``tokenizer.model`` with the reserved pieces at
Baichuan2's ids (``<reserved_106>`` = 195, ``<reserved_107>`` = 196, ``<reserved_113>`` = 202)."""

from __future__ import annotations

import io
import json
import pathlib

import torch

__all__ = ["TINY", "random_state_dict", "write_config", "write_folder", "write_tokenizer"]

TINY = {"hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 704}


def _reserved_names() -> list[str]:
    """Pieces for ids 3..202: ``<reserved_N>`` at id N + 89 as in Baichuan2 (195 = <reserved_106>)."""
    return [f"<reserved_{i - 89}>" if i - 89 >= 2 else f"<pre_{i}>" for i in range(3, 203)]


def write_tokenizer(path: pathlib.Path) -> None:
    """A BPE sentencepiece model whose reserved pieces are USER_DEFINED (sentencepiece would match them
    inside text unless the loader turns them into control pieces)."""
    import sentencepiece as spm

    text = ["Describe this image in detail.", "A cat sits on a red mat.", "What color is the car? It is blue.",
            "你好，百川。", "The quick brown fox jumps over the lazy dog."] * 4
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text), model_writer=out, model_type="bpe", vocab_size=520, hard_vocab_limit=False,
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=_reserved_names(), add_dummy_prefix=False, normalization_rule_name="identity",
        remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    path.write_bytes(out.getvalue())


def random_state_dict(seed: int = 0, **arch) -> dict[str, torch.Tensor]:
    """Random tensors under Baichuan2-7B's key names (fused W_pack, NormHead left unnormalised)."""
    a = {**TINY, **arch}
    g = torch.Generator().manual_seed(seed)
    h, f, v = a["hidden_size"], a["intermediate_size"], a["vocab_size"]

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {"model.embed_tokens.weight": rand(v, h, scale=1.0)}
    for n in range(a["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd[p + "self_attn.W_pack.weight"] = rand(3 * h, h)
        sd[p + "self_attn.o_proj.weight"] = rand(h, h)
        sd[p + "mlp.gate_proj.weight"] = rand(f, h)
        sd[p + "mlp.up_proj.weight"] = rand(f, h)
        sd[p + "mlp.down_proj.weight"] = rand(h, f)
        sd[p + "input_layernorm.weight"] = 1 + rand(h, scale=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1 + rand(h, scale=0.1)
    sd["model.norm.weight"] = 1 + rand(h, scale=0.1)
    sd["lm_head.weight"] = rand(v, h, scale=3.0)
    return sd


def write_config(folder: pathlib.Path, **overrides) -> None:
    config = {"architectures": ["BaichuanForCausalLM"], "model_type": "baichuan", "hidden_act": "silu",
              "rms_norm_eps": 1e-6, "max_position_embeddings": 4096, "model_max_length": 4096,
              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16", "tokenizer_class": "BaichuanTokenizer", **TINY, **overrides}
    config = {k: v for k, v in config.items() if v is not None}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


def write_folder(folder: pathlib.Path, tokenizer: pathlib.Path | None = None, seed: int = 0) -> pathlib.Path:
    """A complete tiny Baichuan2-7B-Chat-format folder with one ``pytorch_model.bin``."""
    folder.mkdir(parents=True, exist_ok=True)
    write_config(folder)
    (folder / "generation_config.json").write_text(json.dumps(
        {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "user_token_id": 195, "assistant_token_id": 196,
         "max_new_tokens": 2048, "temperature": 0.3, "top_k": 5, "top_p": 0.85, "repetition_penalty": 1.05,
         "do_sample": True}))
    if tokenizer is None:
        write_tokenizer(folder / "tokenizer.model")
    else:
        (folder / "tokenizer.model").write_bytes(tokenizer.read_bytes())
    torch.save(random_state_dict(seed), folder / "pytorch_model.bin")
    return folder
