"""Write random Hugging Face CLIP/SigLIP folders in the downloaded layout, for tests and benchmarks.

:func:`write_random_folder` builds transformers' full contrastive model (``CLIPModel`` /
``SiglipModel``: the preset's vision tower and a small text tower) and saves it with
``save_pretrained``: ``config.json`` + ``model.safetensors`` with the upstream key names. Every
weight is drawn at random (LayerNorm weights near 1), so a parity test also catches swapped norm
weights and biases. ``legacy_position_ids`` adds the ``*.embeddings.position_ids`` tensors that
checkpoints saved before transformers 4.31 (the 2022 OpenAI CLIP uploads) hold.
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

from mllmkit_vision_hf.families import Preset

__all__ = ["TEXT_TOWER", "write_random_folder"]

TEXT_TOWER = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=64,
                  max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
"""The small text tower written beside the vision tower (the encoder never uses it)."""


@torch.no_grad()
def write_random_folder(folder: str | pathlib.Path, preset: Preset, *, seed: int = 0, std: float = 0.05,
                        legacy_position_ids: bool = False) -> pathlib.Path:
    """Save a random ``preset.family.full_model_class`` to ``folder``; returns the folder."""
    import transformers
    from safetensors.torch import load_file, save_file

    family = preset.family
    folder = pathlib.Path(folder)
    config = getattr(transformers, family.full_config_class)(vision_config=dict(preset.fields), text_config=TEXT_TOWER)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, family.full_model_class)(config)
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                param.normal_(0.0, std)
                if isinstance(module, nn.LayerNorm) and name == "weight":
                    param.add_(1.0)
    model.save_pretrained(str(folder))
    if legacy_position_ids:
        weights = folder / "model.safetensors"
        tensors = load_file(str(weights))
        tensors["vision_model.embeddings.position_ids"] = torch.arange(
            (preset.fields["image_size"] // preset.fields["patch_size"]) ** 2 + family.has_cls).unsqueeze(0)
        tensors["text_model.embeddings.position_ids"] = torch.arange(TEXT_TOWER["max_position_embeddings"])[None]
        save_file(tensors, str(weights), metadata={"format": "pt"})
    return folder
