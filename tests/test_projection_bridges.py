"""The built-in ``linear`` and ``mlp`` bridges: shapes, width inference, and loading released weights.

MiniGPT4Qwen releases ``llm_proj`` in three layouts: a LAVIS runner ``checkpoint_N.pth``
(``{"model": state_dict, ...}``), a bare ``model.pth``, and DeepSpeed ``mp_rank_00_model_states.pt``
(``{"module": state_dict, ...}``). Each is written here at tiny size and loaded through the bridge.
"""

from __future__ import annotations

import pytest
import torch

import mllmkit
from mllmkit.builtin.projection_bridges import SPECS, LinearBridgeConfig, MLPBridgeConfig
from mllmkit.interfaces import Bridge, BuildContext, PartDims
from mllmkit.weights import WeightsError

SPEC = {spec.name: spec for spec in SPECS}
CTX = BuildContext(key="model.bridges[1]", in_dim=12, in_tokens=8, llm_hidden=20)


def _llm_proj(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"llm_proj.weight": torch.randn(20, 12, generator=gen), "llm_proj.bias": torch.randn(20, generator=gen)}


def test_linear_shapes_and_math():
    bridge = mllmkit.build("bridge", "linear", CTX)
    assert isinstance(bridge, Bridge)
    assert (bridge.in_dim, bridge.out_dim, bridge.tokens_out(8)) == (12, 20, 8)
    feats = torch.randn(3, 8, 12)
    out = bridge(feats)
    assert out.shape == (3, 8, 20)
    torch.testing.assert_close(out, feats @ bridge.proj.weight.T + bridge.proj.bias)
    assert bridge.proj.bias is not None
    assert mllmkit.build("bridge", "linear", CTX, bias=False).proj.bias is None


def test_mlp_shapes_and_math():
    bridge = mllmkit.build("bridge", "mlp", CTX)
    assert (bridge.in_dim, bridge.out_dim, bridge.tokens_out(8)) == (12, 20, 8)
    first, second = bridge.net[0], bridge.net[2]
    assert (first.in_features, first.out_features, second.in_features, second.out_features) == (12, 20, 20, 20)
    feats = torch.randn(2, 8, 12)
    expected = torch.nn.functional.gelu(feats @ first.weight.T + first.bias) @ second.weight.T + second.bias
    torch.testing.assert_close(bridge(feats), expected)
    deep = mllmkit.build("bridge", "mlp", CTX, depth=3, activation="silu")
    assert len(deep.net) == 5 and isinstance(deep.net[1], torch.nn.SiLU)
    assert deep(feats).shape == (2, 8, 20)


def test_dims_inference():
    assert SPEC["linear"].dims(LinearBridgeConfig(), CTX) == PartDims(in_dim=None, out_dim=20, out_tokens=8)
    assert SPEC["linear"].dims(LinearBridgeConfig(in_dim=12, out_dim=7), CTX) == PartDims(in_dim=12, out_dim=7, out_tokens=8)
    assert SPEC["mlp"].dims(MLPBridgeConfig(), CTX) == PartDims(in_dim=None, out_dim=20, out_tokens=8)
    with pytest.raises(WeightsError) as info:
        SPEC["linear"].dims(LinearBridgeConfig(), BuildContext(key="model.bridges[0]", llm_hidden=20))
    assert str(info.value) == "model.bridges[0]: in_dim cannot be inferred (no previous part); set in_dim"
    with pytest.raises(WeightsError) as info:
        SPEC["mlp"].dims(MLPBridgeConfig(), BuildContext(key="model.bridges[0]", in_dim=12))
    assert str(info.value) == "model.bridges[0]: out_dim cannot be inferred; set out_dim"


@pytest.mark.parametrize("layout", ["lavis", "bare", "deepspeed"])
def test_linear_loads_llm_proj_from_release_layouts(tmp_path, layout):
    weights = _llm_proj()
    other = {"llm_proj_unrelated": torch.zeros(1)}  # must not be picked up: the prefix is "llm_proj."
    if layout == "lavis":
        path = tmp_path / "checkpoint_9.pth"
        torch.save({"model": {**weights, **other}, "optimizer": {}, "config": {"run": {}}, "epoch": 9}, path)
    elif layout == "bare":
        path = tmp_path / "model.pth"
        torch.save({**weights, **other}, path)
    else:
        path = tmp_path / "mp_rank_00_model_states.pt"
        torch.save({"module": weights, "buffer_names": [], "global_steps": 12, "dp_world_size": 1}, path)
    bridge = mllmkit.build("bridge", "linear", CTX, weights=str(path))
    assert torch.equal(bridge.proj.weight, weights["llm_proj.weight"])
    assert torch.equal(bridge.proj.bias, weights["llm_proj.bias"])
    feats = torch.randn(1, 8, 12)
    torch.testing.assert_close(bridge(feats), feats @ weights["llm_proj.weight"].T + weights["llm_proj.bias"])


def test_deepspeed_folder_is_accepted(tmp_path):
    weights = _llm_proj(1)
    torch.save({"module": weights}, tmp_path / "mp_rank_00_model_states.pt")
    bridge = mllmkit.build("bridge", "linear", CTX, weights=str(tmp_path))
    assert torch.equal(bridge.proj.weight, weights["llm_proj.weight"])


def test_mlp_loads_mm_projector(tmp_path):
    gen = torch.Generator().manual_seed(3)
    weights = {"mm_projector.0.weight": torch.randn(20, 12, generator=gen), "mm_projector.0.bias": torch.randn(20),
               "mm_projector.2.weight": torch.randn(20, 20, generator=gen), "mm_projector.2.bias": torch.randn(20)}
    path = tmp_path / "mm_projector.bin"
    torch.save(weights, path)
    bridge = mllmkit.build("bridge", "mlp", CTX, weights=str(path))
    assert torch.equal(bridge.net[2].weight, weights["mm_projector.2.weight"])


def test_refused_file_not_a_state_dict(tmp_path):
    path = tmp_path / "model.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError) as info:
        mllmkit.build("bridge", "linear", CTX, weights=str(path))
    assert str(info.value) == (
        f"{path}: found a list; expected one of: an mllmkit export or checkpoint folder (trainable.safetensors), a "
        ".safetensors file, a LAVIS checkpoint_N.pth ({'model': state_dict}), a bare state dict (model.pth), or a "
        "DeepSpeed folder (mp_rank_00_model_states.pt, or layer_XX-model_states.pt of a pipeline)")


def test_refused_file_with_code_running_pickle(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"llm_proj.weight": torch.zeros(20, 12), "hook": _Evil()}, path)
    with pytest.raises(WeightsError) as info:
        mllmkit.build("bridge", "linear", CTX, weights=str(path))
    assert str(info.value).startswith(f"{path}: refused to load: the file contains pickled objects that are not "
                                      f"plain tensors and containers, and loading them could run code (")


def test_file_without_the_prefix_names_the_option(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"proj.weight": torch.zeros(20, 12), "proj.bias": torch.zeros(20)}, path)
    with pytest.raises(WeightsError) as info:
        mllmkit.build("bridge", "linear", CTX, weights=str(path))
    assert str(info.value) == (f"model.bridges[1].weights: {path} has no keys starting with 'llm_proj.' "
                               f"(found: proj.bias, proj.weight); set model.bridges[1].prefix")
    bridge = mllmkit.build("bridge", "linear", CTX, weights=str(path), prefix="proj.")
    assert torch.equal(bridge.proj.weight, torch.zeros(20, 12))


def test_wrong_shape_in_file(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"llm_proj.weight": torch.zeros(20, 10), "llm_proj.bias": torch.zeros(20)}, path)
    with pytest.raises(WeightsError) as info:
        mllmkit.build("bridge", "linear", CTX, weights=str(path))
    assert str(info.value) == (f"{path}: llm_proj.weight has shape [20, 10], the model expects [20, 12] for "
                               f"proj.weight")


class _Evil:
    def __reduce__(self):
        return (print, ("this would run on load",))
