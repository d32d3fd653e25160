"""Fixtures: tiny random CLIP / SigLIP folders in the Hugging Face layout as downloaded."""

from __future__ import annotations

import pytest
from mllmkit_vision_hf.families import CLIP_TINY, SIGLIP_TINY
from mllmkit_vision_hf.random_checkpoint import write_random_folder


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    """A ``CLIPModel`` folder (config.json + model.safetensors) with clip_tiny's vision tower."""
    return write_random_folder(tmp_path_factory.mktemp("clip"), CLIP_TINY, seed=1)


@pytest.fixture(scope="session")
def siglip_folder(tmp_path_factory):
    """A ``SiglipModel`` folder with siglip_tiny's vision tower (and its pooling head)."""
    return write_random_folder(tmp_path_factory.mktemp("siglip"), SIGLIP_TINY, seed=2)


@pytest.fixture
def folders(clip_folder, siglip_folder):
    return {"clip_tiny": clip_folder, "siglip_tiny": siglip_folder}
