"""The ``qformer``/``qformer_tiny`` components: registration, declared widths, wiring, chains, dtypes."""

from __future__ import annotations

import pytest
import torch
from mllmkit_bridge_qformer import FP32LayerNorm, QFormerConfig, QFormerTinyConfig
from torch.utils._python_dispatch import TorchDispatchMode

import mllmkit
from mllmkit.errors import RecipeError
from mllmkit.interfaces import Bridge, BuildContext, PartDims
from mllmkit.plugins import build_plugin_host


def _spec(name):
    return build_plugin_host().registry.get("bridge", name)


def test_registered_through_the_entry_point():
    registry = build_plugin_host().registry
    for name in ("qformer", "qformer_tiny"):
        assert registry.get("bridge", name).distribution == "mllmkit-bridge-qformer"


def test_dims_without_building():
    ctx = BuildContext(key="model.bridges[0]", in_dim=1408, in_tokens=257)
    assert _spec("qformer").dims(QFormerConfig(), ctx) == PartDims(in_dim=None, out_dim=768, out_tokens=32)
    assert _spec("qformer").dims(QFormerConfig(vision_width=1408, num_query_tokens=64), ctx) == \
        PartDims(in_dim=1408, out_dim=768, out_tokens=64)
    tiny_ctx = BuildContext(key="b", in_dim=24)
    assert _spec("qformer_tiny").dims(QFormerTinyConfig(), tiny_ctx) == PartDims(in_dim=None, out_dim=64, out_tokens=8)


def test_tiny_preset_is_a_bridge_and_frozen_by_default():
    bridge = mllmkit.build("bridge", "qformer_tiny", BuildContext(key="b", in_dim=24, in_tokens=5))
    assert isinstance(bridge, Bridge)
    assert (bridge.in_dim, bridge.out_dim, bridge.tokens_out(257)) == (24, 64, 8)
    assert len(bridge.qformer.encoder.layer) == 2
    assert [layer.has_cross_attention for layer in bridge.qformer.encoder.layer] == [True, False]
    assert bridge.qformer.config.num_attention_heads == 4 and bridge.qformer.config.intermediate_size == 128
    assert not any(p.requires_grad for p in bridge.parameters()) and not bridge.training
    assert bridge(torch.randn(2, 5, 24)).shape == (2, 8, 64)
    trainable = mllmkit.build("bridge", "qformer_tiny", BuildContext(key="b", in_dim=24), trainable=True)
    assert all(p.requires_grad for p in trainable.parameters()) and trainable.training


def test_full_preset_shape_on_options():
    cfg = QFormerConfig()
    assert (cfg.num_query_tokens, cfg.cross_attention_freq, cfg.num_layers) == (32, 2, 12)
    assert _spec("qformer").defaults == {"trainable": False}  # precision: the core's default, fp32


def test_init_std_and_dropout_options():
    """Default: BLIP-2's bert-base numbers (std 0.02, dropout 0.1); both options reach every weight and dropout."""
    torch.manual_seed(0)
    default = mllmkit.build("bridge", "qformer_tiny", BuildContext(key="b", in_dim=64))
    torch.manual_seed(0)
    wide = mllmkit.build("bridge", "qformer_tiny", BuildContext(key="b", in_dim=64), init_std=0.2, dropout=0.0)
    for bridge, std, p in ((default, 0.02, 0.1), (wide, 0.2, 0.0)):
        weights = [w for n, w in bridge.qformer.named_parameters() if n.endswith(".weight") and w.dim() == 2]
        assert len(weights) == 16  # 2 layers × (self q,k,v,out + query FFN in,out) + layer 0 cross q,k,v,out
        for w in weights:
            assert abs(w.std().item() - std) < 0.25 * std
        assert abs(bridge.query_tokens.std().item() - std) < 0.25 * std
        dropouts = [m.p for m in bridge.modules() if isinstance(m, torch.nn.Dropout)]
        assert dropouts and set(dropouts) == {p}
    with pytest.raises(RecipeError, match=r"dropout: expected a value in \[0.0, 1.0\], found 1.5"):
        mllmkit.build("bridge", "qformer_tiny", BuildContext(key="b", in_dim=64), dropout=1.5)


def test_width_cannot_be_inferred_without_a_previous_part():
    with pytest.raises(RecipeError) as info:
        mllmkit.build("bridge", "qformer_tiny")
    assert str(info.value) == ("bridge:qformer_tiny.vision_width: cannot be inferred (no vision encoder width was "
                               "given to this bridge); set vision_width")


class _LayerNormDtypes(TorchDispatchMode):
    """Records the input dtype of every aten layer-norm kernel that runs inside the block."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket is torch.ops.aten.native_layer_norm:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


def test_ln_vision_computes_in_fp32_and_casts_back():
    norm = FP32LayerNorm(16)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 1.5, 16))
        norm.bias.copy_(torch.linspace(-1, 1, 16))
    # a large offset and small spread: low-precision statistics would cancel badly
    x32 = 100.0 + torch.randn(3, 7, 16, generator=torch.Generator().manual_seed(0))
    for dtype in (torch.float16, torch.bfloat16):
        x = x32.to(dtype)
        with _LayerNormDtypes() as seen:
            out = norm(x)
        assert seen.dtypes == [torch.float32]  # the normalisation itself ran in fp32
        assert out.dtype == dtype
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        var = ((xf - mean) ** 2).mean(-1, keepdim=True)
        expected = (xf - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
        ulp = torch.finfo(dtype).eps
        torch.testing.assert_close(out.float(), expected, rtol=ulp, atol=ulp)  # fp32 result, rounded once
    assert norm.eps == 1e-5  # nn.LayerNorm's default, as LAVIS builds ln_vision


def test_precision_without_weights_keeps_ln_vision_fp32():
    context = BuildContext(key="b", in_dim=24, device=torch.device("cuda"))  # fp16 on CPU runs in fp32
    bridge = mllmkit.build("bridge", "qformer_tiny", context, precision="fp16")
    linear = {n for n, m in bridge.qformer.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, param in bridge.qformer.named_parameters():
        assert param.dtype == (torch.float16 if name.rpartition(".")[0] in linear else torch.float32), name
    assert bridge.query_tokens.dtype == torch.float32
    assert bridge.ln_vision.weight.dtype == torch.float32 and bridge.ln_vision.bias.dtype == torch.float32


def test_chain_toy_vision_qformer_tiny_linear(wiring_host, toy_chain_recipe):
    recipe = mllmkit.load_recipe(toy_chain_recipe)
    wiring = mllmkit.check_wiring(recipe)
    assert wiring.bridges == [PartDims(in_dim=None, out_dim=64, out_tokens=8),
                              PartDims(in_dim=None, out_dim=32, out_tokens=8)]
    model = mllmkit.assemble(recipe)
    assert model.tokens_per_image == 8
    qformer, linear = model.bridges
    assert (qformer.in_dim, linear.in_dim, linear.out_dim) == (24, 64, 32)
    assert not any(p.requires_grad for p in qformer.parameters())
    assert all(p.requires_grad for p in linear.parameters())
    model.train()
    assert not qformer.training and linear.training
    assert model.encode_images(torch.randn(3, 3, 16, 16)).shape == (3, 8, 32)


def test_explicit_matching_width_is_accepted(wiring_host, toy_chain_recipe):
    toy_chain_recipe["model"]["bridges"][0]["vision_width"] = 24
    wiring = mllmkit.check_wiring(mllmkit.load_recipe(toy_chain_recipe))
    assert wiring.bridges[0] == PartDims(in_dim=24, out_dim=64, out_tokens=8)


def test_wrong_explicit_width_is_rejected_naming_the_key(wiring_host, toy_chain_recipe):
    toy_chain_recipe["model"]["bridges"][0]["vision_width"] = 99
    recipe = mllmkit.load_recipe(toy_chain_recipe)
    with pytest.raises(RecipeError) as info:
        mllmkit.check_wiring(recipe)
    assert info.value.key == "model.bridges[0].vision_width"
    assert str(info.value) == ("<recipe>: model.bridges[0].vision_width: expected 24 (the output width of the part before "
                               "this bridge), found 99; set vision_width = 24 or leave it out to infer it")


def test_chain_eva_tiny_qformer_tiny_linear(wiring_host, toy_chain_recipe):
    if "eva_tiny" not in wiring_host.registry.names("vision"):
        pytest.skip("eva_tiny is not installed (plugins/vision_eva was being written in parallel); "
                    "the same chain is covered with toy_vision above")
    toy_chain_recipe["model"]["vision"] = {"type": "eva_tiny"}
    recipe = mllmkit.load_recipe(toy_chain_recipe)
    wiring = mllmkit.check_wiring(recipe)
    assert wiring.bridges[0].out_tokens == 8
    model = mllmkit.assemble(recipe)
    size = model.vision.image_size
    assert model.bridges[0].in_dim == model.vision.out_dim
    assert model.encode_images(torch.randn(2, 3, size, size)).shape == (2, 8, 32)
