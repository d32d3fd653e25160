"""Fixtures: tiny random checkpoints in LAVIS ``eva_vit_g.pth`` format, key names from the manifest.

``data/eva_vit_g.tsv`` is the key manifest of the real LAVIS file:
every key, its full-size shape, and whether BLIP-2's 39-block model uses it.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

MANIFEST = pathlib.Path(__file__).parent / "data" / "eva_vit_g.tsv"


def manifest_rows() -> list[tuple[str, list[int], bool]]:
    """(key, shape, used by BLIP-2's 39-block model) for every row of formats/eva_vit_g.tsv."""
    lines = MANIFEST.read_text().splitlines()
    header = lines[0].split("\t")
    rows = []
    for line in lines[1:]:
        cells = dict(zip(header, line.split("\t")))
        rows.append((cells["key"], json.loads(cells["shape"]), cells["used_by_blip2_depth39"].startswith("yes")))
    return rows


def tiny_lavis_state_dict(*, blocks: int, grid: int, width: int = 64, mlp: int = 256, patch: int = 14,
                          dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """The manifest's keys for blocks < ``blocks``, with every full-size dimension scaled down."""
    scale = {1408: width, 4224: 3 * width, 6144: mlp, 257: grid * grid + 1, 14: patch}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape, _ in manifest_rows():
        if key.startswith("blocks.") and int(key.split(".")[1]) >= blocks:
            continue
        tiny = [scale.get(d, d) for d in shape]
        std = 1.0 if "norm" in key and key.endswith("weight") else 0.1
        value = torch.randn(tiny, generator=gen) * std
        if "norm" in key and key.endswith("weight"):
            value = 1.0 + 0.1 * value
        state[key] = value.to(dtype)
    return state


@pytest.fixture
def tiny_ckpt(tmp_path) -> pathlib.Path:
    """eva_tiny-sized eva_vit_g.pth: 3 blocks (one beyond eva_tiny's 2), grid 4x4 (56 px / 14)."""
    path = tmp_path / "eva_vit_g.pth"
    torch.save(tiny_lavis_state_dict(blocks=3, grid=4), path)
    return path


@pytest.fixture
def manifest() -> list[tuple[str, list[int], bool]]:
    return manifest_rows()


@pytest.fixture
def make_state_dict():
    """``tiny_lavis_state_dict`` as a fixture (test modules cannot import conftest in importlib mode)."""
    return tiny_lavis_state_dict
