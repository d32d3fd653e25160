"""Decoding with fused q/k/v and gate/up weights and bucketed prompts gives the unfused model's tokens.

Two copies of the same tiny transformers model (a Qwen2 with q/k/v biases, a Llama without): one
decoded by a :class:`~mllmkit.generation.Decoder` that fuses its projections, the other by one that
does not, and by transformers ``generate``; the greedy tokens must be identical.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mllmkit.fused_projections import FusedSlice, fuse_projections
from mllmkit.generation import PREFILL_BUCKET, Decoder


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return Qwen2ForCausalLM(config)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config)


def _hf_greedy(model, embeds, n):
    with torch.no_grad():
        out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0].tolist()


@pytest.mark.parametrize("build", [_qwen2, _llama])
@pytest.mark.parametrize("length", [5, 37, PREFILL_BUCKET])
def test_fused_decoding_gives_the_unfused_greedy_tokens(build, length):
    torch.manual_seed(0)
    plain = build().eval().requires_grad_(False)
    fused = copy.deepcopy(plain)
    embeds = plain.get_input_embeddings()(torch.randint(0, 300, (1, length), generator=torch.Generator().manual_seed(length)))
    expected = _hf_greedy(plain, embeds, 24)
    reference = Decoder(plain, 256, fuse=False)
    decoder = Decoder(fused, 256)
    assert reference.fused_groups == 0 and decoder.fused_groups == 4  # attention + MLP in each of 2 layers
    assert reference.generate(embeds, max_new_tokens=24) == expected
    assert decoder.generate(embeds, max_new_tokens=24) == expected
    # same names and values as before: checkpoints load into the fused model unchanged
    assert plain.state_dict().keys() == fused.state_dict().keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in fused.state_dict().items())


def test_fused_weights_are_views_into_one_tensor_and_a_load_reaches_the_fused_product():
    torch.manual_seed(0)
    model = _qwen2().eval().requires_grad_(False)
    original = copy.deepcopy(model.state_dict())
    assert fuse_projections(model) == 4
    assert fuse_projections(model) == 0  # already fused
    attn = model.model.layers[0].self_attn
    assert isinstance(attn.q_proj, FusedSlice)
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.group.weight.untyped_storage().data_ptr()
    changed = {k: v + 1.0 for k, v in original.items()}
    model.load_state_dict(changed)
    x = torch.randn(1, 3, 48)
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    assert k.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()  # slices of one fused product
    assert torch.allclose(k, x @ changed["model.layers.0.self_attn.k_proj.weight"].T
                          + changed["model.layers.0.self_attn.k_proj.bias"], atol=1e-5)
    assert torch.allclose(q, x @ changed["model.layers.0.self_attn.q_proj.weight"].T
                          + changed["model.layers.0.self_attn.q_proj.bias"], atol=1e-5)
    other = torch.randn(1, 3, 48)  # called alone, a slice computes its own product
    assert torch.allclose(attn.v_proj(other), other @ changed["model.layers.0.self_attn.v_proj.weight"].T
                          + changed["model.layers.0.self_attn.v_proj.bias"], atol=1e-5)
    assert v.shape == (1, 3, 24)


def test_trainable_projections_are_not_fused():
    model = _llama()
    model.model.layers[1].mlp.requires_grad_(False)
    model.model.layers[0].requires_grad_(True)
    assert fuse_projections(model) == 1  # only layer 1's frozen MLP
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear


def test_prompts_are_left_padded_to_the_bucket_only_where_the_cache_has_room():
    torch.manual_seed(0)
    decoder = Decoder(_llama().eval(), 128, fuse=False)
    embeds, valid = torch.randn(1, 37, 32), torch.ones(1, 37, dtype=torch.bool)
    padded, padded_valid = decoder.bucket(embeds, valid, new_tokens=10)
    assert padded.shape == (1, PREFILL_BUCKET, 32) and torch.equal(padded[:, -37:], embeds)
    assert padded_valid.sum() == 37 and not padded_valid[0, :PREFILL_BUCKET - 37].any()
    same, _ = decoder.bucket(embeds, valid, new_tokens=128 - 37)  # no room for the padding
    assert same is embeds
