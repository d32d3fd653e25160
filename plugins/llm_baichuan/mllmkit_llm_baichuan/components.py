"""Components ``baichuan2`` and ``baichuan2_tiny``: options, the one builder and declared widths.

Options of ``baichuan2`` (recipe table ``[model.llm]``):
- ``path``: an original Baichuan2-7B-Chat folder (``config.json`` with ``model_type = "baichuan"``,
  ``tokenizer.model``, ``pytorch_model.bin`` or shards with ``pytorch_model.bin.index.json``, or
  safetensors; ``generation_config.json`` if present gives the turn token ids). Converted on load to
  ``LlamaForCausalLM``; no remote code.
- ``preset``: ``baichuan2_7b_chat`` (default) or ``baichuan2_tiny``. ``dims`` (what ``mllmkit check``
  uses) reads ``path/config.json`` when the folder exists and falls back to the preset when it does
  not, so a recipe checks on a machine without the weights. Without ``path`` only ``baichuan2_tiny``
  builds (random weights, built-in vocabulary); ``baichuan2_7b_chat`` needs the folder.
- ``system`` (Baichuan2 has no default system text) and ``image_token``: the image placeholder, a reserved piece that text never
  encodes to (default ``<reserved_113>``, id 202 in Baichuan2's vocabulary).
``baichuan2_tiny`` is the tiny preset as its own component (fp32, no files) for tests and CPU demos.
The core's shared keys apply: ``precision`` (the weights' dtype; default bf16, ``baichuan2_tiny``
fp32), ``trainable``, ``gradient_checkpointing``.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Literal

import attrs
import torch

from mllmkit.config import config
from mllmkit.errors import UserError
from mllmkit.hf_llm import HFCausalLM, finish_meta_load, new_hf_model
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.registry import ComponentSpec
from mllmkit.weights import WeightsError, checkpoint_files, iter_tensors, load_into
from mllmkit_llm_baichuan.convert import (
    BAICHUAN_KEYS,
    PRESETS,
    BaichuanArch,
    hf_config,
    normalize_head,
    read_arch,
)
from mllmkit_llm_baichuan.template import BaichuanTemplate
from mllmkit_llm_baichuan.tokenizer import SentencePieceTokenizer, load_tokenizer, tiny_tokenizer

__all__ = ["SPECS", "Baichuan2Config", "Baichuan2TinyConfig", "baichuan_dims", "build_baichuan"]

logger = logging.getLogger(__name__)

USER_TOKEN, ASSISTANT_TOKEN = "<reserved_106>", "<reserved_107>"
EOS_ID, PAD_ID, BOS_ID = 2, 0, 1


@config
class Baichuan2Config:
    """Options of ``baichuan2`` (see the module docstring)."""

    path: pathlib.Path | None = None
    preset: Literal["baichuan2_7b_chat", "baichuan2_tiny"] = "baichuan2_7b_chat"
    system: str | None = None
    image_token: str = "<reserved_113>"


@config
class Baichuan2TinyConfig:
    """Options of ``baichuan2_tiny`` (the tiny preset, no files)."""

    system: str | None = None
    image_token: str = "<reserved_113>"


def _arch(cfg: Baichuan2Config) -> BaichuanArch:
    if cfg.path is not None and pathlib.Path(cfg.path).exists():
        return read_arch(pathlib.Path(cfg.path))
    return PRESETS[cfg.preset]


def baichuan_dims(cfg: Baichuan2Config, ctx: BuildContext | None = None) -> PartDims:
    """The hidden size from ``path/config.json``, or from the preset when the folder is absent."""
    return PartDims(out_dim=_arch(cfg).hidden_size)


def _turn_ids(folder: pathlib.Path | None, tokenizer: SentencePieceTokenizer) -> tuple[int, int]:
    gen = folder / "generation_config.json" if folder is not None else None
    if gen is not None and gen.is_file():
        raw = json.loads(gen.read_text())
        if "user_token_id" in raw and "assistant_token_id" in raw:
            return int(raw["user_token_id"]), int(raw["assistant_token_id"])
    try:
        return tokenizer.token_id(USER_TOKEN), tokenizer.token_id(ASSISTANT_TOKEN)
    except KeyError as exc:
        raise WeightsError(f"{tokenizer.name}: has no piece {exc} for the chat turns") from None


def _image_token_id(token: str, tokenizer: SentencePieceTokenizer, taken: tuple[int, ...], key: str) -> int:
    try:
        index = tokenizer.token_id(token)
    except KeyError:
        raise UserError(f"{key}.image_token: {token!r} is not a piece of {tokenizer.name}; name an unused "
                        f"reserved piece such as '<reserved_113>'") from None
    if not tokenizer.is_reserved(index) or index in taken:
        raise UserError(f"{key}.image_token: {token!r} (id {index}) is {'a turn/eos/pad token' if index in taken else 'ordinary text'}; "
                        f"name an unused reserved piece such as '<reserved_113>'")
    return index


def build_baichuan(cfg: Baichuan2Config, ctx: BuildContext | None = None) -> HFCausalLM:
    """A Baichuan2-7B folder converted to ``LlamaForCausalLM``, or the random tiny preset."""
    key = ctx.key if ctx is not None else "baichuan2"
    folder = pathlib.Path(cfg.path) if cfg.path is not None else None
    if folder is None and cfg.preset != "baichuan2_tiny":
        raise UserError(f"{key}.path: required for preset {cfg.preset!r}: the Baichuan2-7B-Chat folder "
                        f"(config.json, tokenizer.model, pytorch_model.bin); only 'baichuan2_tiny' builds without files")
    if folder is not None and not folder.is_dir():
        raise WeightsError(f"{key}.path: folder not found: {folder}")
    arch = _arch(cfg)
    tokenizer = load_tokenizer(folder / "tokenizer.model") if folder is not None else tiny_tokenizer()
    if tokenizer.vocab_size > arch.vocab_size:
        raise WeightsError(f"{tokenizer.name}: has {tokenizer.vocab_size} pieces but the model only "
                           f"{arch.vocab_size} embedding rows (vocab_size)")
    user_id, assistant_id = _turn_ids(folder, tokenizer)
    image_id = _image_token_id(cfg.image_token, tokenizer, (user_id, assistant_id, EOS_ID, PAD_ID, BOS_ID), key)
    config_hf = hf_config(arch, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_ids=[EOS_ID, user_id])
    dtype = ctx.dtype if ctx is not None and ctx.dtype is not None else torch.bfloat16
    from transformers import LlamaForCausalLM

    if folder is None:
        logger.warning("%s: no path given: baichuan2_tiny is randomly initialised", key)
        model = new_hf_model(LlamaForCausalLM, config_hf, dtype)
        with torch.no_grad():  # NormHead: the head rows are unit vectors
            model.lm_head.weight.copy_(normalize_head(model.lm_head.weight))
    else:
        model = new_hf_model(LlamaForCausalLM, config_hf, dtype, device="meta")
        load_into(model, iter_tensors(checkpoint_files(folder)), BAICHUAN_KEYS, source=str(folder), dtype=dtype)
        finish_meta_load(model, str(folder))
    model.generation_config.eos_token_id = [EOS_ID, user_id]
    model.generation_config.pad_token_id = PAD_ID
    template = BaichuanTemplate(tokenizer.encode, user_token_id=user_id, assistant_token_id=assistant_id,
                                eos_token_id=EOS_ID, pad_token_id=PAD_ID, image_token_id=image_id,
                                default_system=cfg.system)
    return HFCausalLM(model, tokenizer, template, max_positions=arch.model_max_length)


def _build_tiny(cfg: Baichuan2TinyConfig, ctx: BuildContext | None = None) -> HFCausalLM:
    return build_baichuan(Baichuan2Config(preset="baichuan2_tiny", **attrs.asdict(cfg)), ctx)


SPECS = [
    ComponentSpec("baichuan2", Baichuan2Config, build_baichuan,
                  "Baichuan2-7B-Chat (original folder converted to Llama modules, sentencepiece); Baichuan2 chat format",
                  dims=baichuan_dims, defaults={"precision": "bf16"}),
    ComponentSpec("baichuan2_tiny", Baichuan2TinyConfig, _build_tiny,
                  "toy Baichuan2 (64 wide, 2 layers, built-in 400-piece vocabulary) for tests and CPU demos",
                  dims=lambda cfg, ctx: PartDims(out_dim=PRESETS["baichuan2_tiny"].hidden_size)),
]
