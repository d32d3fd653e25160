"""The encoder module: transformers' own CLIP/SigLIP vision tower, cut at LLaVA's feature layer.

LLaVA-1.5 takes ``hidden_states[select_layer]`` of the vision tower (−2: the output of the
penultimate layer, before any final norm) and drops the class token (``select_feature = "patch"``).
:func:`build_encoder` builds only the layers those features need, so the tower's
``last_hidden_state`` *is* that hidden state: later layers, the final norm (``post_layernorm``, an
identity here) and SigLIP's pooling head are not built and their keys in the file are skipped.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mllmkit.errors import UserError
from mllmkit_vision_hf.families import Family

__all__ = ["HFVisionEncoder", "build_encoder", "layers_needed", "transformer_of"]


def layers_needed(select_layer: int, num_layers: int, where: str) -> int:
    """How many layers ``hidden_states[select_layer]`` of a ``num_layers``-layer tower depends on.

    ``hidden_states`` holds the embeddings then every layer's output (``num_layers + 1`` entries);
    the embeddings alone (0 layers) are refused as features.
    """
    needed = select_layer if select_layer > 0 else num_layers + 1 + select_layer
    if not 1 <= needed <= num_layers:
        raise UserError(f"{where}.select_layer: expected -{num_layers}..-1 or 1..{num_layers} (the tower has "
                        f"{num_layers} layers), found {select_layer}")
    return needed


def transformer_of(tower: nn.Module) -> nn.Module:
    """The module holding ``embeddings``/``encoder`` (``vision_model`` in transformers releases that nest it)."""
    return getattr(tower, "vision_model", tower)


class HFVisionEncoder(nn.Module):
    """``forward(pixels [B,3,H,W]) -> [B, num_tokens, out_dim]``: the selected layer's tokens.

    ``tower`` is a transformers ``CLIPVisionModel`` / ``SiglipVisionModel`` of the needed layers;
    ``drop_cls`` removes the class token (CLIP with ``select_feature = "patch"``).
    """

    def __init__(self, tower: nn.Module, family: Family, *, drop_cls: bool, image_aspect: str) -> None:
        super().__init__()
        self.tower = tower
        self.family = family
        self.image_aspect = image_aspect
        config = tower.config
        self.image_size: int = config.image_size
        self.out_dim: int = config.hidden_size
        self.skip = 1 if family.has_cls and drop_cls else 0
        self.num_tokens: int = (config.image_size // config.patch_size) ** 2 + int(family.has_cls) - self.skip

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        weight = transformer_of(self.tower).embeddings.patch_embedding.weight
        feats = self.tower(pixel_values=pixels.to(weight.dtype)).last_hidden_state
        return feats[:, self.skip:]

    def image_transform(self, train: bool) -> Callable[[Any], torch.Tensor]:
        """The encoder's own image processor (no augmentation in training, as LLaVA-1.5)."""
        from mllmkit_vision_hf.transforms import llava_image_transform

        return llava_image_transform(self.family, self.image_size, self.image_aspect)

    def blocks(self) -> Sequence[nn.Module]:
        return list(transformer_of(self.tower).encoder.layers)

    def gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each layer in backward (transformers' own switch, acting while the tower trains;
        ``activation_checkpointing_*`` where the installed transformers has renamed ``gradient_checkpointing_*``)."""
        tower = self.tower
        if enabled:
            switch = getattr(tower, "activation_checkpointing_enable", tower.gradient_checkpointing_enable)
            switch({"use_reentrant": False})
        else:
            getattr(tower, "activation_checkpointing_disable", tower.gradient_checkpointing_disable)()


def build_encoder(family: Family, hf_config, *, select_layer: int, drop_cls: bool, image_aspect: str,
                  attn_implementation: str, where: str) -> HFVisionEncoder:
    """An encoder of ``hf_config``'s family with the layers ``select_layer`` needs, weights as
    transformers initialises them (parameters land on meta under ``mllmkit.weights.meta_parameters``)."""
    import transformers

    config = copy.deepcopy(hf_config)
    config.num_hidden_layers = layers_needed(select_layer, hf_config.num_hidden_layers, where)
    for name, value in family.tower_options.items():
        setattr(config, name, value)
    config._attn_implementation = attn_implementation
    tower = getattr(transformers, family.model_class)(config)
    transformer_of(tower).post_layernorm = nn.Identity()
    return HFVisionEncoder(tower, family, drop_cls=drop_cls, image_aspect=image_aspect)
