"""Reading a Hugging Face CLIP/SigLIP folder as downloaded: its config, then its weights.

A folder such as ``openai/clip-vit-large-patch14-336`` or ``google/siglip-so400m-patch14-384``
holds the full contrastive model: ``config.json`` (``model_type`` ``clip``/``siglip`` with a
``vision_config``) and the weights (``model.safetensors``, shards with an index, or
``pytorch_model.bin``) with keys ``vision_model.*``, ``text_model.*`` and the projection/logit
tensors. The vision config is read with transformers' own config class. The key table maps
``vision_model.*`` onto the tower, skips the layers past the feature layer and declares the keys the
vision features never use (text tower, projections, SigLIP's pooling head, the final norm, and the
``position_ids`` buffer that checkpoints saved before transformers 4.31 hold); any other key, and
any tower tensor the file lacks, is an error naming it.
"""

from __future__ import annotations

import json
import pathlib
import re

from mllmkit.errors import UserError
from mllmkit.weights import KeyMap, WeightsError, checkpoint_files, iter_tensors, load_into
from mllmkit_vision_hf.encoder import HFVisionEncoder, transformer_of
from mllmkit_vision_hf.families import Family, Preset

__all__ = ["folder_config", "load_folder", "vision_key_map"]

_MATCH_FIELDS = ("hidden_size", "image_size", "patch_size", "num_hidden_layers")


def folder_config(folder: pathlib.Path, preset: Preset, where: str):
    """The vision config of ``folder`` (transformers' class for ``preset.family``), checked against the
    preset's architecture so that ``mllmkit check`` before the download states the same widths."""
    import transformers

    family = preset.family
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{where}.path: {folder} has no config.json; expected a Hugging Face {family.name} "
                           f"folder as downloaded (config.json and model.safetensors)")
    try:
        model_type = json.loads(path.read_text()).get("model_type")
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None
    if model_type not in family.model_types:
        raise UserError(f"{where}.path: {path} has model_type {model_type!r}, not a {family.name} model "
                        f"({' or '.join(family.model_types)}); use the component for that family")
    config = getattr(transformers, family.config_class).from_pretrained(str(folder))
    expected = preset.hf_config()
    differ = [f"{name} {getattr(config, name)} (preset {getattr(expected, name)})" for name in _MATCH_FIELDS
              if getattr(config, name) != getattr(expected, name)]
    if differ:
        raise UserError(f"{where}.path: {path} describes another {family.name} tower than {preset.name}: "
                        f"{', '.join(differ)}; point path at a folder of that model")
    return config


def vision_key_map(family: Family, num_layers: int, prefix: str) -> KeyMap:
    """File keys → encoder keys (``prefix`` = the tower transformer's key prefix) for ``num_layers`` layers."""

    def layer(match: re.Match, tensor):
        index = int(match.group(1))
        if index >= num_layers:
            return []  # past the feature layer: in the file, not built
        return [(f"{prefix}encoder.layers.{index}.{match.group(2)}", tensor)]

    return KeyMap(rules=[(r"vision_model\.encoder\.layers\.(\d+)\.(.+)", layer),
                         (r"vision_model\.(.+)", rf"{prefix}\1")],
                  skip=family.unused_keys)


def load_folder(encoder: HFVisionEncoder, folder: pathlib.Path, where: str) -> None:
    """Stream the folder's weights into ``encoder`` (built under ``meta_parameters``), strictly, each
    tensor in the dtype of the parameter it fills."""
    transformer = transformer_of(encoder.tower)
    prefix = "tower." + ("vision_model." if transformer is not encoder.tower else "")
    key_map = vision_key_map(encoder.family, len(transformer.encoder.layers), prefix)
    try:
        files = checkpoint_files(folder)
    except WeightsError as exc:
        raise WeightsError(f"{where}.path: {exc}") from None
    try:
        load_into(encoder, iter_tensors(files), key_map, source=str(folder))
    except WeightsError as exc:
        raise WeightsError(f"{where}.path: {exc}. Expected a Hugging Face {encoder.family.full_model_class} "
                           f"folder (keys vision_model.*, text_model.*) as downloaded") from None
