"""Fixtures: the tiny recipe file and the ``single`` backend's reference losses."""

from __future__ import annotations

import pathlib

import pytest
from mllmkit_parallel_deepspeed.testing import TINY_RECIPE


@pytest.fixture(scope="session")
def tiny_recipe(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(TINY_RECIPE)
    return path


@pytest.fixture(scope="session")
def single_losses(tmp_path_factory, tiny_recipe):
    """Reference losses of the ``single`` backend, grad_accum 2 (world 1) and 4 (= 2 processes × 2)."""
    from mllmkit.recipe import load_recipe
    from mllmkit.train.loop import train

    out = {}
    for accum in (2, 4):
        run = tmp_path_factory.mktemp(f"single{accum}")
        out[accum] = train(load_recipe(tiny_recipe, [f"train.grad_accum={accum}"]), run).losses
    return out
