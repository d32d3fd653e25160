"""Loading original Baichuan2-7B folders: numerical parity, formats, strict errors, refusals, dims."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from mllmkit_llm_baichuan import ALIBI_MESSAGE, Baichuan2Config, baichuan_dims, build_baichuan
from mllmkit_llm_baichuan.random_checkpoint import TINY, random_state_dict, write_config

from mllmkit.interfaces import BuildContext
from mllmkit.weights import WeightsError

FP32 = BuildContext(key="model.llm", dtype=torch.float32)


def reference_logits(sd: dict[str, torch.Tensor], ids: torch.Tensor, heads: int, eps: float = 1e-6) -> torch.Tensor:
    """Baichuan2-7B's forward written out: fused W_pack, rotate_half rotary (base 10000), RMSNorm,
    SwiGLU, causal attention, NormHead (rows L2-normalised)."""
    def rms(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w

    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    x = sd["model.embed_tokens.weight"][ids]
    b, t, h = x.shape
    d = h // heads
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
    angles = torch.outer(torch.arange(t).float(), inv_freq)
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    causal = torch.full((t, t), float("-inf")).triu(1)
    n = 0
    while f"model.layers.{n}.input_layernorm.weight" in sd:
        p = f"model.layers.{n}."
        y = rms(x, sd[p + "input_layernorm.weight"])
        qkv = y @ sd[p + "self_attn.W_pack.weight"].T
        q, k, v = (z.view(b, t, heads, d).transpose(1, 2) for z in qkv.split(h, dim=-1))
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        att = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5 + causal, dim=-1)
        x = x + (att @ v).transpose(1, 2).reshape(b, t, h) @ sd[p + "self_attn.o_proj.weight"].T
        y = rms(x, sd[p + "post_attention_layernorm.weight"])
        mlp = F.silu(y @ sd[p + "mlp.gate_proj.weight"].T) * (y @ sd[p + "mlp.up_proj.weight"].T)
        x = x + mlp @ sd[p + "mlp.down_proj.weight"].T
        n += 1
    x = rms(x, sd["model.norm.weight"])
    head = sd["lm_head.weight"] / sd["lm_head.weight"].norm(dim=-1, keepdim=True)
    return x @ head.T


def _logits(llm, ids):
    with torch.no_grad():
        return llm.logits(llm.hidden(llm.embed(ids)))


def test_parity_with_reference_forward(baichuan_folder):
    llm = build_baichuan(Baichuan2Config(path=baichuan_folder), FP32)
    ids = torch.tensor([[5, 300, 17, 42, 99, 250, 3, 1]])
    expected = reference_logits(random_state_dict(), ids, heads=TINY["num_attention_heads"])
    torch.testing.assert_close(_logits(llm, ids), expected, atol=1e-5, rtol=1e-5)
    assert type(llm.hf_model).__name__ == "LlamaForCausalLM"
    assert llm.max_positions == 4096 and llm.hidden_size == TINY["hidden_size"]


def test_w_pack_split_and_normalised_head(baichuan_folder):
    llm = build_baichuan(Baichuan2Config(path=baichuan_folder), FP32)
    sd, h = random_state_dict(), TINY["hidden_size"]
    attn = llm.hf_model.model.layers[1].self_attn
    w_pack = sd["model.layers.1.self_attn.W_pack.weight"]
    assert torch.equal(attn.q_proj.weight, w_pack[:h]) and torch.equal(attn.k_proj.weight, w_pack[h:2 * h])
    assert torch.equal(attn.v_proj.weight, w_pack[2 * h:])
    norms = llm.head.weight.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert llm.hf_model.generation_config.eos_token_id == [2, 195]


def test_bf16_precision_by_default_and_frozen_by_the_core(plugin_host, baichuan_folder):
    import mllmkit

    llm = mllmkit.build("llm", "baichuan2", path=str(baichuan_folder))
    assert {p.dtype for p in llm.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in llm.parameters()) and not llm.hf_model.training
    assert llm.hf_model.model.rotary_emb.inv_freq.dtype == torch.float32


def test_shards_with_bin_index_and_safetensors(baichuan_folder):
    from safetensors.torch import save_file

    sd = random_state_dict()
    (baichuan_folder / "pytorch_model.bin").unlink()
    keys = sorted(sd)
    parts = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
             "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in parts.items():
        torch.save({k: sd[k] for k in part}, baichuan_folder / name)
    (baichuan_folder / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in parts.items() for k in part}}))
    ids = torch.tensor([[7, 8, 9, 10]])
    expected = reference_logits(sd, ids, heads=TINY["num_attention_heads"])
    llm = build_baichuan(Baichuan2Config(path=baichuan_folder), FP32)
    torch.testing.assert_close(_logits(llm, ids), expected, atol=1e-5, rtol=1e-5)

    for name in parts:
        (baichuan_folder / name).unlink()
    (baichuan_folder / "pytorch_model.bin.index.json").unlink()
    save_file(sd, str(baichuan_folder / "model.safetensors"))
    llm = build_baichuan(Baichuan2Config(path=baichuan_folder), FP32)
    torch.testing.assert_close(_logits(llm, ids), expected, atol=1e-5, rtol=1e-5)


def test_missing_and_unexpected_keys_are_named(baichuan_folder):
    sd = random_state_dict()
    del sd["model.layers.1.mlp.up_proj.weight"]
    torch.save(sd, baichuan_folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"missing keys \(1\): model\.layers\.1\.mlp\.up_proj\.weight"):
        build_baichuan(Baichuan2Config(path=baichuan_folder))
    sd = {**random_state_dict(), "model.layers.0.self_attn.q_proj.bias": torch.zeros(TINY["hidden_size"])}
    torch.save(sd, baichuan_folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): model\.layers\.0\.self_attn\.q_proj\.bias"):
        build_baichuan(Baichuan2Config(path=baichuan_folder))


def test_rotary_inv_freq_in_file_is_accepted(baichuan_folder):
    sd = random_state_dict()
    sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    torch.save(sd, baichuan_folder / "pytorch_model.bin")
    build_baichuan(Baichuan2Config(path=baichuan_folder))


def test_wrong_w_pack_shape(baichuan_folder):
    sd = random_state_dict()
    sd["model.layers.0.self_attn.W_pack.weight"] = torch.zeros(3 * 16, TINY["hidden_size"])
    torch.save(sd, baichuan_folder / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"model\.layers\.0\.self_attn\.W_pack\.weight has shape \[16, 32\], "
                                           r"the model expects \[32, 32\] for model\.layers\.0\.self_attn\.q_proj"):
        build_baichuan(Baichuan2Config(path=baichuan_folder))


@pytest.mark.parametrize("overrides", [
    {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "intermediate_size": 13696},
    {"max_position_embeddings": None},
])
def test_baichuan2_13b_is_refused(baichuan_folder, overrides):
    write_config(baichuan_folder, **overrides)
    expected = f"{baichuan_folder / 'config.json'}: {ALIBI_MESSAGE}"
    assert ALIBI_MESSAGE == ("Baichuan2-13B uses ALiBi position biases, which this plugin does not implement; "
                             "use Baichuan2-7B-Chat")
    for call in (baichuan_dims, build_baichuan):
        with pytest.raises(WeightsError) as info:
            call(Baichuan2Config(path=baichuan_folder))
        assert str(info.value) == expected


def test_other_model_type_is_refused(baichuan_folder):
    write_config(baichuan_folder, model_type="llama")
    with pytest.raises(WeightsError, match="model_type is 'llama', expected 'baichuan'"):
        baichuan_dims(Baichuan2Config(path=baichuan_folder))


def test_dims_folder_or_preset(baichuan_folder, tmp_path):
    assert baichuan_dims(Baichuan2Config(path=baichuan_folder)).out_dim == TINY["hidden_size"]
    absent = tmp_path / "not-downloaded"
    assert baichuan_dims(Baichuan2Config(path=absent)).out_dim == 4096
    assert baichuan_dims(Baichuan2Config(path=absent, preset="baichuan2_tiny")).out_dim == 64
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(WeightsError, match=r"config\.json: not found; point path at a Baichuan2-7B-Chat folder"):
        baichuan_dims(Baichuan2Config(path=empty))
    with pytest.raises(WeightsError, match="folder not found"):
        build_baichuan(Baichuan2Config(path=absent))


def test_7b_preset_needs_a_folder():
    from mllmkit.errors import UserError

    with pytest.raises(UserError, match=r"baichuan2\.path: required for preset 'baichuan2_7b_chat'"):
        build_baichuan(Baichuan2Config())


def test_full_size_parameter_count_on_meta():
    from mllmkit_llm_baichuan.convert import PRESETS, hf_config
    from transformers import LlamaForCausalLM

    from mllmkit.hf_llm import new_hf_model

    model = new_hf_model(LlamaForCausalLM, hf_config(PRESETS["baichuan2_7b_chat"], pad_token_id=0, bos_token_id=1,
                                                     eos_token_ids=[2, 195]), torch.bfloat16, device="meta")
    # 2 × 125696 × 4096 (embedding, head) + 32 × (3·4096² + 4096² + 3·4096·11008 + 2·4096) + 4096
    assert sum(p.numel() for p in model.parameters()) == 7_505_973_248
