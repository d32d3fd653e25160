"""Fixtures: tiny Qwen v1 folders written in the real upstream layout."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from mllmkit_llm_qwen.tiny_folders import v1_state_dict, write_v1_folder


@pytest.fixture(scope="session")
def v1_weights() -> dict[str, torch.Tensor]:
    return v1_state_dict()


@pytest.fixture
def v1_folder(tmp_path, v1_weights) -> pathlib.Path:
    return write_v1_folder(tmp_path / "Qwen-7B-Chat", v1_weights)
