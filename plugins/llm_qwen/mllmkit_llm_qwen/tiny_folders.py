"""Tiny random Qwen checkpoint folders in the real upstream layouts, for tests and demos.

:func:`write_v1_folder` writes ``config.json`` (either spelling), ``qwen.tiktoken`` (the ``qwen_tiny``
ranks) and the weights as ``model.safetensors.index.json`` + 2 shards, one ``pytorch_model.bin`` or
2 ``.bin`` shards + ``pytorch_model.bin.index.json``, with the key names of ``weights.tsv``.
:func:`write_qwen2_folder` writes a Qwen2/2.5 folder (``save_pretrained`` of ``Qwen2ForCausalLM``,
tied embeddings) with a ``tokenizer.json`` of the same ranks and Qwen2's special tokens.
"""

from __future__ import annotations

import base64
import json
import pathlib

import torch

from mllmkit_llm_qwen.tokenizer import tiny_ranks

__all__ = [
    "FFN",
    "FIRST_RELEASE_CONFIG",
    "HEADS",
    "HIDDEN",
    "LATER_CONFIG",
    "LAYERS",
    "SEQ",
    "VOCAB",
    "v1_state_dict",
    "write_qwen2_folder",
    "write_tiktoken",
    "write_v1_folder",
]

HIDDEN, LAYERS, HEADS, FFN, VOCAB, SEQ = 32, 2, 4, 48, 640, 24

LATER_CONFIG = {  # the later (post Sep-2023) config.json spelling
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "hidden_size": HIDDEN,
    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "intermediate_size": 2 * FFN,
    "max_position_embeddings": 8192, "seq_length": SEQ, "vocab_size": VOCAB, "kv_channels": HIDDEN // HEADS,
    "layer_norm_epsilon": 1e-6, "rotary_emb_base": 5000, "rotary_pct": 1.0, "no_bias": True,
    "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True,
    "tokenizer_class": "QWenTokenizer",
}
FIRST_RELEASE_CONFIG = {  # the first public revision's spelling
    "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "n_embd": HIDDEN, "n_layer": LAYERS,
    "n_head": HEADS, "ffn_hidden_size": 2 * FFN, "n_positions": 6144, "seq_length": SEQ,
    "padded_vocab_size": VOCAB, "vocab_size": VOCAB, "kv_channels": HIDDEN // HEADS,
    "layer_norm_epsilon": 1e-6, "rotary_emb_base": 5000, "rotary_pct": 1.0, "no_bias": True,
    "tie_word_embeddings": False, "use_dynamic_ntk": True, "use_logn_attn": True,
}


def v1_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Qwen v1 weights with the real key names (``weights.tsv``), in module order."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.1, offset=0.0):
        return torch.randn(*shape, generator=g) * scale + offset

    sd = {"transformer.wte.weight": rnd(VOCAB, HIDDEN, scale=0.5)}
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        sd[p + "ln_1.weight"] = rnd(HIDDEN, offset=1.0)
        sd[p + "attn.c_attn.weight"] = rnd(3 * HIDDEN, HIDDEN, scale=0.3)
        sd[p + "attn.c_attn.bias"] = rnd(3 * HIDDEN, scale=0.3)
        sd[p + "attn.c_proj.weight"] = rnd(HIDDEN, HIDDEN, scale=0.2)
        sd[p + "ln_2.weight"] = rnd(HIDDEN, offset=1.0)
        sd[p + "mlp.w1.weight"] = rnd(FFN, HIDDEN, scale=0.2)
        sd[p + "mlp.w2.weight"] = rnd(FFN, HIDDEN, scale=0.2)
        sd[p + "mlp.c_proj.weight"] = rnd(HIDDEN, FFN, scale=0.2)
    sd["transformer.ln_f.weight"] = rnd(HIDDEN, offset=1.0)
    sd["lm_head.weight"] = rnd(VOCAB, HIDDEN, scale=0.2)
    return sd


def write_tiktoken(path: pathlib.Path) -> None:
    ranks = tiny_ranks()
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for tok, rank in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")


def write_v1_folder(folder: pathlib.Path, sd: dict[str, torch.Tensor], layout: str = "safetensors_index",
                    config: dict | None = None) -> pathlib.Path:
    """Write ``sd`` as a Qwen v1 folder: ``safetensors_index`` (2 shards + index), ``bin`` (one
    pytorch_model.bin) or ``bin_index`` (2 .bin shards + pytorch_model.bin.index.json)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or LATER_CONFIG, indent=2))
    write_tiktoken(folder / "qwen.tiktoken")
    keys = list(sd)
    halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
    if layout == "bin":
        torch.save(sd, folder / "pytorch_model.bin")
        return folder
    ext, index_name = {"safetensors_index": ("safetensors", "model.safetensors.index.json"),
                       "bin_index": ("bin", "pytorch_model.bin.index.json")}[layout]
    weight_map = {}
    for n, half in enumerate(halves, start=1):
        name = f"model-{n:05d}-of-00002.{ext}" if ext == "safetensors" else f"pytorch_model-{n:05d}-of-00002.bin"
        part = {k: sd[k].contiguous() for k in half}
        if ext == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map.update({k: name for k in half})
    total = sum(t.numel() * t.element_size() for t in sd.values())
    (folder / index_name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return folder


QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>")


@torch.no_grad()
def write_qwen2_folder(folder: pathlib.Path, seed: int = 0, std: float = 0.2) -> pathlib.Path:
    """A random Qwen2 folder (2 layers of width 32, GQA 4/2, tied embeddings, every weight drawn at
    ``std``) with ``tokenizer.json`` (the ``qwen_tiny`` ranks, :data:`QWEN2_SPECIALS` after them)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from mllmkit.export.tokenizers import tiktoken_tokenizer
    from mllmkit_llm_qwen.tokenizer import QWEN_PATTERN

    ranks = tiny_ranks()
    specials = {name: len(ranks) + i for i, name in enumerate(QWEN2_SPECIALS)}
    config = Qwen2Config(vocab_size=608, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
        for param in model.parameters():
            param.normal_(0, std)
    model.save_pretrained(folder)
    tiktoken_tokenizer(ranks, QWEN_PATTERN, specials, nfc=True).save(str(folder / "tokenizer.json"))
    return folder
