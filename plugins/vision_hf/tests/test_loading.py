"""Loading Hugging Face folders: parity with transformers' own forward, strict key accounting, wrong folders."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from mllmkit_vision_hf.components import SPECS, ClipOptions, SiglipOptions, build_preset
from mllmkit_vision_hf.families import CLIP_TINY, SIGLIP_TINY
from mllmkit_vision_hf.random_checkpoint import write_random_folder
from safetensors.torch import load_file, save_file

from mllmkit.errors import UserError
from mllmkit.interfaces import BuildContext
from mllmkit.weights import WeightsError

CTX = BuildContext(key="model.vision")
PRESETS = {"clip_tiny": (CLIP_TINY, ClipOptions), "siglip_tiny": (SIGLIP_TINY, SiglipOptions)}


def _build(name, **options):
    preset, options_class = PRESETS[name]
    return build_preset(preset, options_class(**options), CTX)


def _reference(name, folder, pixels, select_layer):
    """transformers' own vision model, loaded by transformers from the same folder: hidden_states[layer]."""
    import transformers

    model_class = {"clip_tiny": transformers.CLIPVisionModel, "siglip_tiny": transformers.SiglipVisionModel}[name]
    model = model_class.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]


@pytest.mark.parametrize("name", ["clip_tiny", "siglip_tiny"])
@pytest.mark.parametrize("select_layer", [-2, -1, 1])
def test_features_equal_transformers_hidden_states(folders, name, select_layer):
    pixels = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    want = _reference(name, folders[name], pixels, select_layer)
    encoder = _build(name, path=folders[name], select_layer=select_layer)
    with torch.no_grad():
        got = encoder(pixels)
    cls = 1 if name == "clip_tiny" else 0
    assert got.shape == (2, 4, 32) and want.shape == (2, 4 + cls, 32)
    torch.testing.assert_close(got, want[:, cls:], atol=1e-5, rtol=0)
    assert len(encoder.blocks()) == (3 + 1 + select_layer if select_layer < 0 else select_layer)


def test_cls_patch_keeps_the_class_token(clip_folder):
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    encoder = _build("clip_tiny", path=clip_folder, select_feature="cls_patch")
    with torch.no_grad():
        got = encoder(pixels)
    assert encoder.num_tokens == 5 and got.shape == (1, 5, 32)
    torch.testing.assert_close(got, _reference("clip_tiny", clip_folder, pixels, -2), atol=1e-5, rtol=0)


def test_checkpoints_with_position_ids_load(tmp_path):
    """Checkpoints saved before transformers 4.31 (the 2022 OpenAI CLIP uploads) hold position_ids."""
    folder = write_random_folder(tmp_path / "old", CLIP_TINY, seed=3, legacy_position_ids=True)
    assert "vision_model.embeddings.position_ids" in load_file(str(folder / "model.safetensors"))
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(_build("clip_tiny", path=folder)(pixels),
                                   _reference("clip_tiny", folder, pixels, -2)[:, 1:], atol=1e-5, rtol=0)


def test_weights_read_into_the_context_dtype_norms_fp32(clip_folder):
    encoder = build_preset(CLIP_TINY, ClipOptions(path=clip_folder), BuildContext(key="v", dtype=torch.bfloat16))
    tower = encoder.tower
    assert tower.encoder.layers[0].mlp.fc1.weight.dtype == torch.bfloat16
    assert tower.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert tower.encoder.layers[0].layer_norm1.weight.dtype == torch.float32
    assert tower.embeddings.class_embedding.dtype == torch.float32
    assert not any(t.is_meta for t in [*encoder.parameters(), *encoder.buffers()])


def _rewrite(folder, tmp_path, edit):
    copy = tmp_path / "edited"
    shutil.copytree(folder, copy)
    tensors = load_file(str(copy / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def test_a_missing_tower_tensor_is_named(clip_folder, tmp_path):
    folder = _rewrite(clip_folder, tmp_path, lambda t: t.pop("vision_model.encoder.layers.1.mlp.fc2.bias"))
    with pytest.raises(WeightsError, match=r"model\.vision\.path: .*missing keys \(1\): "
                                           r"tower\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        _build("clip_tiny", path=folder)


def test_an_unknown_key_is_named(clip_folder, tmp_path):
    folder = _rewrite(clip_folder, tmp_path, lambda t: t.update({"vision_model.extra.weight": torch.zeros(2)}))
    with pytest.raises(WeightsError, match=r"unexpected keys \(1\): vision_model\.extra\.weight"):
        _build("clip_tiny", path=folder)


def test_layers_past_the_feature_layer_are_not_needed(clip_folder, tmp_path):
    """select_layer -2 of 3 layers builds 2: the file's third layer is skipped, its absence is no error."""
    folder = _rewrite(clip_folder, tmp_path, lambda t: [t.pop(k) for k in list(t) if ".layers.2." in k])
    assert len(_build("clip_tiny", path=folder).blocks()) == 2


def test_a_folder_of_the_other_family_is_refused(siglip_folder):
    with pytest.raises(UserError, match=r"model\.vision\.path: .*config\.json has model_type 'siglip', not a CLIP "
                                        r"model \(clip or clip_vision_model\); use the component for that family"):
        _build("clip_tiny", path=siglip_folder)


def test_a_folder_of_another_size_is_refused(clip_folder, tmp_path):
    folder = tmp_path / "other"
    shutil.copytree(clip_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    config["vision_config"]["image_size"] = 56
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"describes another CLIP tower than clip_tiny: image_size 56 \(preset 28\)"):
        _build("clip_tiny", path=folder)


def test_no_config_json_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(WeightsError, match=r"model\.vision\.path: .*empty has no config\.json; expected a Hugging "
                                           r"Face CLIP folder"):
        _build("clip_tiny", path=tmp_path / "empty")


def test_every_spec_is_registered_with_dims():
    assert [s.name for s in SPECS] == ["clip_vit_l14_336", "siglip_so400m_p14_384", "clip_tiny", "siglip_tiny"]
    assert all(s.dims is not None for s in SPECS)
