"""Fixtures: tiny Baichuan2 folders in the original format (see mllmkit_llm_baichuan.random_checkpoint)."""

from __future__ import annotations

import pathlib

import pytest
from mllmkit_llm_baichuan.random_checkpoint import write_folder, write_tokenizer


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("spm") / "tokenizer.model"
    write_tokenizer(path)
    return path


@pytest.fixture
def baichuan_folder(tmp_path, tokenizer_file) -> pathlib.Path:
    """A tiny Baichuan2-7B-Chat-format folder with one pytorch_model.bin."""
    return write_folder(tmp_path / "Baichuan2-7B-Chat", tokenizer=tokenizer_file)
