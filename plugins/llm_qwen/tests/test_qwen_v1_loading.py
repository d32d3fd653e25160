"""Qwen v1 folders (real layout, tiny size) load through the ``qwen`` component and compute exactly
the published Qwen v1 forward, written out independently below."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from mllmkit_llm_qwen.components import QwenConfig, qwen_dims
from mllmkit_llm_qwen.tiny_folders import (
    FIRST_RELEASE_CONFIG,
    HEADS,
    HIDDEN,
    LATER_CONFIG,
    LAYERS,
    SEQ,
    VOCAB,
    write_v1_folder,
)

import mllmkit
from mllmkit.weights import WeightsError


def reference_qwen_v1_logits(sd: dict[str, torch.Tensor], ids: torch.Tensor, base: float = 5000.0,
                             eps: float = 1e-6) -> torch.Tensor:
    """Qwen v1 from its published architecture: fused qkv with bias, rotate-half rotary, RMSNorm,
    c_proj(w1(x) * silu(w2(x))), causal softmax attention scaled by 1/sqrt(head_dim)."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotate_half(x):
        a, b = x.chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)

    T, d = ids.shape[-1], HIDDEN // HEADS
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    freqs = torch.outer(torch.arange(T, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().float(), emb.sin().float()  # [T, d]
    x = sd["transformer.wte.weight"][ids[0]]  # [T, H]
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(LAYERS):
        p = f"transformer.h.{i}."
        h = rms(x, sd[p + "ln_1.weight"])
        qkv = h @ sd[p + "attn.c_attn.weight"].T + sd[p + "attn.c_attn.bias"]
        q, k, v = (t.reshape(T, HEADS, d).transpose(0, 1) for t in qkv.split(HIDDEN, dim=-1))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d) + causal, dim=-1)
        out = (att @ v).transpose(0, 1).reshape(T, HIDDEN)
        x = x + out @ sd[p + "attn.c_proj.weight"].T
        h = rms(x, sd[p + "ln_2.weight"])
        a1, a2 = h @ sd[p + "mlp.w1.weight"].T, h @ sd[p + "mlp.w2.weight"].T
        x = x + (a1 * F.silu(a2)) @ sd[p + "mlp.c_proj.weight"].T
    x = rms(x, sd["transformer.ln_f.weight"])
    return (x @ sd["lm_head.weight"].T)[None]


def _logits(llm, ids):
    with torch.no_grad():
        return llm.logits(llm.hidden(llm.embed(ids)))


@pytest.mark.parametrize("layout", ["safetensors_index", "bin", "bin_index"])
@pytest.mark.parametrize("config", [LATER_CONFIG, FIRST_RELEASE_CONFIG], ids=["later", "first_release"])
def test_v1_folder_matches_reference_forward(tmp_path, v1_weights, layout, config):
    folder = write_v1_folder(tmp_path / "m", v1_weights, layout=layout, config=config)
    llm = mllmkit.build("llm", "qwen", path=str(folder), precision="fp32")
    assert type(llm.hf_model).__name__ == "Qwen2ForCausalLM"
    assert llm.hidden_size == HIDDEN
    assert llm.max_positions == config.get("max_position_embeddings", config.get("n_positions"))  # not SEQ
    assert llm.hf_model.config.intermediate_size == 48 and llm.hf_model.config.vocab_size == VOCAB
    ids = torch.randint(0, 500, (1, SEQ), generator=torch.Generator().manual_seed(1))
    got = _logits(llm, ids)
    want = reference_qwen_v1_logits(v1_weights, ids)
    assert got.shape == (1, SEQ, VOCAB)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rotary_buffers_recomputed_not_meta(v1_folder):
    llm = mllmkit.build("llm", "qwen", path=str(v1_folder), precision="fp32")
    inv_freq = llm.rotary.inv_freq
    assert not inv_freq.is_meta
    d = HIDDEN // HEADS
    torch.testing.assert_close(inv_freq, 1.0 / (5000.0 ** (torch.arange(0, d, 2).float() / d)))
    assert not any(t.is_meta for t in [*llm.parameters(), *llm.buffers()])


def test_without_ntk_and_logn_there_is_no_limit_from_seq_length(tmp_path, v1_weights):
    config = dict(LATER_CONFIG, use_dynamic_ntk=False, use_logn_attn=False)
    llm = mllmkit.build("llm", "qwen", path=str(write_v1_folder(tmp_path / "m", v1_weights, config=config)),
                        precision="fp32")
    assert llm.max_positions is None


def test_missing_key_is_an_error_naming_it(tmp_path, v1_weights):
    sd = {k: v for k, v in v1_weights.items() if k != "transformer.h.1.mlp.w1.weight"}
    folder = write_v1_folder(tmp_path / "m", sd)
    with pytest.raises(WeightsError) as info:
        mllmkit.build("llm", "qwen", path=str(folder), precision="fp32")
    assert str(info.value) == (f"{folder}: checkpoint does not match the model: missing keys (1): "
                               f"model.layers.1.mlp.up_proj.weight")


def test_extra_key_is_an_error_naming_it(tmp_path, v1_weights):
    sd = dict(v1_weights)
    sd["transformer.h.0.attn.extra_scale"] = torch.ones(3)
    folder = write_v1_folder(tmp_path / "m", sd, layout="bin")
    with pytest.raises(WeightsError) as info:
        mllmkit.build("llm", "qwen", path=str(folder), precision="fp32")
    assert str(info.value) == (f"{folder}: checkpoint does not match the model: unexpected keys (1): "
                               f"transformer.h.0.attn.extra_scale")


def test_rotary_buffer_in_old_files_is_skipped(tmp_path, v1_weights):
    sd = dict(v1_weights)
    sd["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.zeros(4)  # must not be read
    llm = mllmkit.build("llm", "qwen", path=str(write_v1_folder(tmp_path / "m", sd, layout="bin")), precision="fp32")
    assert float(llm.rotary.inv_freq[0]) == 1.0


def test_wrong_shape_names_key(tmp_path, v1_weights):
    sd = dict(v1_weights)
    sd["transformer.ln_f.weight"] = torch.ones(HIDDEN + 1)
    folder = write_v1_folder(tmp_path / "m", sd)
    with pytest.raises(WeightsError, match=r"transformer\.ln_f\.weight has shape \[33\], the model expects "
                                           r"\[32\] for model\.norm\.weight"):
        mllmkit.build("llm", "qwen", path=str(folder), precision="fp32")


def test_missing_tiktoken_file_is_named(v1_folder):
    (v1_folder / "qwen.tiktoken").unlink()
    with pytest.raises(WeightsError, match="tokenizer file not found: .*qwen.tiktoken"):
        mllmkit.build("llm", "qwen", path=str(v1_folder))


def test_unknown_model_type_is_refused(v1_folder):
    (v1_folder / "config.json").write_text(json.dumps(dict(LATER_CONFIG, model_type="llama")))
    with pytest.raises(WeightsError, match="model_type 'llama' is not a Qwen model"):
        mllmkit.build("llm", "qwen", path=str(v1_folder))


def test_dtype_and_freezing(v1_folder):
    llm = mllmkit.build("llm", "qwen", path=str(v1_folder), precision="bf16")
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in llm.parameters()) and not llm.hf_model.training
    trainable = mllmkit.build("llm", "qwen", path=str(v1_folder), precision="fp32", trainable=True,
                              gradient_checkpointing=True)
    assert all(p.requires_grad for p in trainable.parameters())
    assert all("forward" in layer.__dict__ for layer in trainable.layers())  # checkpointed (tests/test_llm_checkpointing.py)


def test_dims_from_config_only(v1_folder):
    for name in v1_folder.iterdir():
        if name.name != "config.json":
            name.unlink()  # no weights, no tokenizer: dims reads config.json alone
    assert qwen_dims(QwenConfig(path=v1_folder)).out_dim == HIDDEN
    assert qwen_dims(QwenConfig(preset="qwen7b_chat")).out_dim == 4096
    assert qwen_dims(QwenConfig(preset="qwen14b_chat")).out_dim == 5120


def test_dims_of_the_real_config_files():
    import pathlib

    data = pathlib.Path(__file__).parent / "data"
    first, later = data / "qwen7b_chat_first_release.config.json", data / "qwen7b_chat_later_format.config.json"
    from mllmkit_llm_qwen.convert import (
        LongContext,
        qwen_v1_hf_config,
        qwen_v1_long_context,
        qwen_v1_max_positions,
    )

    for config_file in (first, later):
        raw = json.loads(config_file.read_text())
        hf = qwen_v1_hf_config(raw)
        assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size,
                hf.vocab_size) == (4096, 32, 32, 11008, 151936)
        assert hf.rms_norm_eps == 1e-6 and hf.rope_parameters["rope_theta"] == 10000
    assert qwen_v1_max_positions(json.loads(first.read_text())) == 6144  # n_positions, past seq_length 2048
    assert qwen_v1_long_context(json.loads(first.read_text())) == LongContext(2048, 6144, True, True)
    assert qwen_v1_max_positions(json.loads(later.read_text())) == 32768  # max_position_embeddings
    assert qwen_v1_long_context(json.loads(later.read_text())) == LongContext(8192, 32768, True, True)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_build_under_meta_parameters_keeps_the_loaded_weights(tmp_path, v1_weights, tied):
    """What a pipeline stage does: every parameter built under meta_parameters goes to meta, except
    what the loader reads from the folder (and the tie of the head to it)."""
    from mllmkit.weights import meta_parameters

    weights = {k: v for k, v in v1_weights.items() if not (tied and k == "lm_head.weight")}
    folder = write_v1_folder(tmp_path / "m", weights, config={**LATER_CONFIG, "tie_word_embeddings": tied})
    with meta_parameters():
        llm = mllmkit.build("llm", "qwen", path=str(folder), precision="fp32")
    assert not any(p.is_meta for p in llm.parameters())
    assert (llm.head.weight is llm.embedding.weight) == tied
    reference = mllmkit.build("llm", "qwen", path=str(folder), precision="fp32")
    ids = torch.randint(0, 500, (1, SEQ), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(llm, ids), _logits(reference, ids), atol=0, rtol=0)
