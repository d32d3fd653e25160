"""LAVIS checkpoints through the real loader, checked against an independent Q-Former written here.

The reference below reads the LAVIS-named state dict directly (no key map, no transformers) and
computes LAVIS's query path: ln_vision in fp32, embeddings LayerNorm on the queries, then per layer
self-attention, cross-attention to the image tokens on even layers and the query FFN, each a
post-LayerNorm residual as in BERT.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from mllmkit_bridge_qformer import LAVIS_QFORMER_KEYS, build_qformer
from mllmkit_bridge_qformer.lavis_weights import LAVIS_SKIPPED

import mllmkit
from mllmkit.interfaces import BuildContext
from mllmkit.precision import part_autocast
from mllmkit.weights import KeyMap, WeightsError

TINY = {"hidden": 64, "heads": 4, "ffn": 128, "layers": 2, "width": 48, "queries": 8}  # = conftest.TINY
EPS = 1e-12


def ref_layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def ref_gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def ref_linear(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def ref_attention_block(h, context, sd, prefix, heads):
    """BertAttention: multi-head attention of h over context, dense, dropout(off), LayerNorm(out + h)."""
    batch, n, dim = h.shape
    d = dim // heads

    def split(x):
        return x.view(batch, x.shape[1], heads, d).permute(0, 2, 1, 3)

    q = split(ref_linear(h, sd, prefix + ".self.query"))
    k = split(ref_linear(context, sd, prefix + ".self.key"))
    v = split(ref_linear(context, sd, prefix + ".self.value"))
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(batch, n, dim)
    out = ref_linear(out, sd, prefix + ".output.dense")
    return ref_layer_norm(out + h, sd[prefix + ".output.LayerNorm.weight"], sd[prefix + ".output.LayerNorm.bias"], EPS)


def ref_layer(h, image, sd, n, heads, cross):
    prefix = f"Qformer.bert.encoder.layer.{n}"
    h = ref_attention_block(h, h, sd, prefix + ".attention", heads)
    if cross:
        h = ref_attention_block(h, image, sd, prefix + ".crossattention", heads)
    inner = ref_gelu(ref_linear(h, sd, prefix + ".intermediate_query.dense"))
    out = ref_linear(inner, sd, prefix + ".output_query.dense")
    return ref_layer_norm(out + h, sd[prefix + ".output_query.LayerNorm.weight"],
                          sd[prefix + ".output_query.LayerNorm.bias"], EPS)


def ref_qformer(sd, feats, layers, heads, freq=2):
    image = ref_layer_norm(feats.float(), sd["ln_vision.weight"], sd["ln_vision.bias"], 1e-5)
    h = sd["query_tokens"].expand(feats.shape[0], -1, -1)
    h = ref_layer_norm(h, sd["Qformer.bert.embeddings.LayerNorm.weight"], sd["Qformer.bert.embeddings.LayerNorm.bias"], EPS)
    for n in range(layers):
        h = ref_layer(h, image, sd, n, heads, cross=n % freq == 0)
    return h


def _build_tiny(path, **options):
    ctx = BuildContext(key="model.bridges[0]", in_dim=TINY["width"], in_tokens=17)
    return mllmkit.build("bridge", "qformer_tiny", ctx, weights=str(path), **options)


def test_round_trip_forward_matches_reference(tiny_lavis, lavis):
    assert lavis.TINY == TINY
    path, sd = tiny_lavis
    bridge = _build_tiny(path)
    assert not any(p.is_meta for p in bridge.parameters())
    assert torch.equal(bridge.query_tokens, sd["query_tokens"])
    assert torch.equal(bridge.ln_vision.weight, sd["ln_vision.weight"])
    feats = torch.randn(3, 17, TINY["width"], generator=torch.Generator().manual_seed(1))
    out = bridge(feats)
    assert out.shape == (3, TINY["queries"], TINY["hidden"])
    expected = ref_qformer(sd, feats, TINY["layers"], TINY["heads"])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


def test_one_layer_matches_independent_computation(tiny_lavis):
    path, sd = tiny_lavis
    bridge = _build_tiny(path)
    gen = torch.Generator().manual_seed(2)
    h = torch.randn(2, TINY["queries"], TINY["hidden"], generator=gen)
    image = torch.randn(2, 11, TINY["width"], generator=gen)
    for n, cross in ((0, True), (1, False)):
        layer = bridge.qformer.encoder.layer[n]
        assert layer.has_cross_attention is cross
        got = layer(h, None, image, query_length=TINY["queries"])
        torch.testing.assert_close(got, ref_layer(h, image, sd, n, TINY["heads"], cross), rtol=0, atol=1e-5)


def test_real_file_without_text_branch_or_position_ids(tmp_path, lavis):
    sd = lavis.state(text_branch=False)
    del sd["Qformer.bert.embeddings.position_ids"]  # "uncertain" in the manifest: may be absent
    bridge = _build_tiny(lavis.write(tmp_path / "b.pth", sd))
    feats = torch.randn(1, 5, TINY["width"])
    torch.testing.assert_close(bridge(feats), ref_qformer(sd, feats, TINY["layers"], TINY["heads"]), rtol=0, atol=1e-5)


def test_precision_bf16_keeps_ln_vision_fp32(tiny_lavis):
    path, sd = tiny_lavis
    bridge = _build_tiny(path, precision="bf16")
    assert bridge.query_tokens.dtype == torch.float32 and bridge.qformer.layernorm.weight.dtype == torch.float32
    assert bridge.qformer.encoder.layer[0].attention.attention.query.weight.dtype == torch.bfloat16
    assert bridge.ln_vision.weight.dtype == torch.float32 and torch.equal(bridge.ln_vision.weight, sd["ln_vision.weight"])
    with part_autocast("bf16", "cpu"):
        out = bridge(torch.randn(2, 9, TINY["width"]))
    assert out.shape == (2, TINY["queries"], TINY["hidden"])


def test_query_count_mismatch_drops_checkpoint_queries_with_warning(tmp_path, lavis):
    sd = lavis.state(queries=TINY["queries"])
    path = lavis.write(tmp_path / "blip2.pth", sd)
    message = (f"{path}: query_tokens holds 8 queries but the recipe asks for num_query_tokens = 4; the "
               f"checkpoint's query_tokens are not loaded and the queries keep their initialisation (as LAVIS does)")
    with pytest.warns(UserWarning) as record:
        bridge = _build_tiny(path, num_query_tokens=4)
    assert [str(w.message) for w in record] == [message]
    queries = bridge.query_tokens
    assert queries.shape == (1, 4, TINY["hidden"]) and not queries.is_meta and torch.isfinite(queries).all()
    assert 0.01 < queries.std().item() < 0.03  # LAVIS init: normal(0, 0.02)
    # everything else did load
    assert torch.equal(bridge.qformer.layernorm.weight, sd["Qformer.bert.embeddings.LayerNorm.weight"])
    assert bridge(torch.randn(2, 6, TINY["width"])).shape == (2, 4, TINY["hidden"])


def test_unexpected_key_is_an_error(tmp_path, lavis):
    sd = lavis.state()
    sd["vision_proj.weight"] = torch.zeros(4, TINY["hidden"])  # a stage-1 BLIP-2 file's ITC head
    path = lavis.write(tmp_path / "blip2.pth", sd)
    with pytest.raises(WeightsError) as info:
        _build_tiny(path)
    assert str(info.value) == f"{path}: checkpoint does not match the model: unexpected keys (1): vision_proj.weight"


def test_missing_key_is_an_error(tmp_path, lavis):
    sd = lavis.state()
    del sd["Qformer.bert.encoder.layer.1.output_query.LayerNorm.bias"]
    path = lavis.write(tmp_path / "blip2.pth", sd)
    with pytest.raises(WeightsError) as info:
        _build_tiny(path)
    assert str(info.value) == (f"{path}: checkpoint does not match the model: missing keys (1): "
                               f"qformer.encoder.layer.1.output_query.LayerNorm.bias")


def test_deeper_checkpoint_than_recipe_is_an_error(tmp_path, lavis):
    path = lavis.write(tmp_path / "blip2.pth", lavis.state(text_branch=False))
    with pytest.raises(WeightsError) as info:
        _build_tiny(path, num_layers=1)
    assert "unexpected keys (16): Qformer.bert.encoder.layer.1.attention.self.query.weight " \
           "(as qformer.encoder.layer.1.attention.attention.query.weight)" in str(info.value)


def test_vision_width_mismatch_with_file_is_an_error(tmp_path, lavis):
    path = lavis.write(tmp_path / "blip2.pth", lavis.state(width=40))
    with pytest.raises(WeightsError) as info:
        _build_tiny(path)
    assert str(info.value) == (f"{path}: ln_vision.weight has shape [40], the model expects [48] for "
                               f"ln_vision.weight")


def test_file_without_model_wrapper_is_refused(tmp_path, lavis):
    path = tmp_path / "bare.pth"
    torch.save(lavis.state(), path)
    with pytest.raises(WeightsError) as info:
        _build_tiny(path)
    assert str(info.value).startswith(f"{path}: expected a dict with key 'model', found keys: query_tokens, ln_vision.weight")


def test_key_map_covers_the_real_manifest_at_full_size(lavis):
    """Every key of the real file maps onto the full-size module with the manifest's shape (or is a
    known skip), and every module tensor is supplied exactly once."""
    bridge = build_qformer(vision_width=1408, hidden=768, num_layers=12, num_heads=12, ffn=3072,
                           num_query_tokens=32, cross_attention_freq=2, device="meta")
    module_shapes = {k: list(v.shape) for k, v in bridge.state_dict().items()}
    key_map = KeyMap(rules=LAVIS_QFORMER_KEYS, skip=LAVIS_SKIPPED)
    supplied: list[str] = []
    for row in lavis.manifest_rows():
        shape = json.loads(row["shape"])
        mapped = key_map.apply(row["key_in_checkpoint_model"], torch.empty(shape, device="meta"))
        assert mapped is not None, row["key_in_checkpoint_model"]
        if row["present"] == "no" or row["key_in_checkpoint_model"].startswith("t5_proj") or "position_ids" in row[
                "key_in_checkpoint_model"]:
            assert mapped == [], row["key_in_checkpoint_model"]
            continue
        ((target, _tensor),) = mapped
        assert module_shapes[target] == shape, target
        supplied.append(target)
    assert sorted(supplied) == sorted(module_shapes)
    assert len(supplied) == 257


def test_full_size_parameter_count_on_meta():
    bridge = build_qformer(vision_width=1408, hidden=768, num_layers=12, num_heads=12, ffn=3072,
                           num_query_tokens=32, cross_attention_freq=2, device="meta")
    total = sum(p.numel() for p in bridge.parameters())
    ln_vision = sum(p.numel() for p in bridge.ln_vision.parameters())
    assert ln_vision == 2 * 1408
    assert total == 105_165_056  # query path incl. query_tokens (24,576) and ln_vision (2,816)
    assert total - ln_vision == 105_162_240


def test_build_under_meta_parameters_keeps_the_loaded_weights(tiny_lavis):
    """A pipeline stage builds under meta_parameters: the weights read from the file stay real."""
    from mllmkit.weights import meta_parameters

    path, _ = tiny_lavis
    with meta_parameters():
        bridge = _build_tiny(path)
    reference = _build_tiny(path)
    assert not any(p.is_meta for p in bridge.parameters())
    for (name, got), (_, want) in zip(bridge.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(got, want), name
