"""Component ``qwen``: options, the one builder, presets and declared widths.

Options (recipe table ``[model.llm]``, ``type = "qwen"``):
- ``path``: a model folder as downloaded. ``config.json`` with ``model_type = "qwen"`` (Qwen-7B/14B-Chat
  v1: weights in ``model.safetensors.index.json`` + shards, ``.bin`` shards or one
  ``pytorch_model.bin``; vocabulary ``qwen.tiktoken``) is converted on load to ``Qwen2ForCausalLM``;
  ``model_type = "qwen2"`` (Qwen2/Qwen2.5; ``tokenizer.json``) loads as is. No remote code, no network.
- ``preset``: ``qwen7b_chat``, ``qwen14b_chat`` or ``qwen_tiny``, used when there is no ``path``:
  random weights at that size. ``qwen_tiny`` has its own built-in vocabulary (no files at all); the
  7B/14B presets use that vocabulary too, with the special tokens at Qwen's real ids (for shape,
  speed and memory work only). ``qwen25_7b_instruct`` (Qwen2.5-7B-Instruct) only states the
  architecture beside ``path``, so recipes check before the download; it builds nothing by itself.
- ``attn_implementation`` (``sdpa``; ``flash_attention_2`` when installed; ``flex_attention``: block-sparse per-sample masks for packed rows, CUDA only for training; ``eager``), ``device_map``
  (``"auto"`` shards over the visible GPUs with accelerate for inference; or one device such as
  ``"cuda:0"``; unset: the device the run places the model on, so weights go straight there), ``system`` (default system prompt) and ``image_token`` (the image placeholder: ``<|extra_0|>`` for
  v1 as MiniGPT4Qwen; Qwen2 has no ``<|extra_0|>``, so there it defaults to ``<|image_pad|>`` when the
  tokenizer has it and must be named otherwise).
- the core's shared keys: ``precision`` (default bf16: the weights' dtype), ``trainable``,
  ``gradient_checkpointing``.

Qwen v1 changes its math past ``seq_length`` (dynamic NTK, log-n): both are put on the Qwen2 modules
(:mod:`mllmkit_llm_qwen.long_context`) and input is refused only past ``max_position_embeddings``/
``n_positions`` (``HFCausalLM.max_positions``).
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any, Literal

import torch

from mllmkit.config import config
from mllmkit.errors import UserError
from mllmkit.hf_llm import HFCausalLM, finish_meta_load, new_hf_model
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.registry import ComponentSpec
from mllmkit.weights import WeightsError, checkpoint_files, iter_tensors, load_into, real_parameters
from mllmkit_llm_qwen.convert import (
    QWEN2_KEYS,
    QWEN_V1_KEYS,
    qwen_v1_fields,
    qwen_v1_hf_config,
    qwen_v1_long_context,
    qwen_v1_max_positions,
    read_config,
)
from mllmkit_llm_qwen.template import DEFAULT_SYSTEM, ChatMLTemplate
from mllmkit_llm_qwen.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    QwenTokenizer,
    TokenizersTokenizer,
    qwen_v1_tokenizer,
    tiny_ranks,
    tiny_tokenizer,
)

__all__ = ["PRESETS", "SPECS", "QwenConfig", "build_qwen", "qwen_dims"]

logger = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    # Qwen v1 config.json fields (later spelling); the same conversion as a downloaded folder.
    "qwen7b_chat": {"model_type": "qwen", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                    "intermediate_size": 22016, "vocab_size": 151936, "seq_length": 8192,
                    "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6, "kv_channels": 128},
    "qwen14b_chat": {"model_type": "qwen", "hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40,
                     "intermediate_size": 27392, "vocab_size": 152064, "seq_length": 2048,
                     "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6, "kv_channels": 128},
    "qwen_tiny": {"model_type": "qwen", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "intermediate_size": 256, "vocab_size": 640, "seq_length": 2048,
                  "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6},
    # Qwen2.5-7B-Instruct's config.json: states the architecture for `mllmkit check` before the download
    # (building needs the folder: its tokenizer.json).
    "qwen25_7b_instruct": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28,
                           "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
                           "vocab_size": 152064, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                           "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
}
QWEN_V1_SPECIAL_BASE = 151643


@config
class QwenConfig:
    """Options of the ``qwen`` LLM component (see the module docstring)."""

    path: pathlib.Path | None = None
    preset: Literal["qwen7b_chat", "qwen14b_chat", "qwen_tiny", "qwen25_7b_instruct"] | None = None
    attn_implementation: Literal["sdpa", "flash_attention_2", "flex_attention", "eager"] = "sdpa"
    device_map: str | None = None
    system: str = DEFAULT_SYSTEM
    image_token: str | None = None


def _raw_config(cfg: QwenConfig, *, building: bool = True) -> tuple[dict[str, Any], str]:
    """The model config: the folder's config.json, else the preset.

    With both ``path`` and ``preset``, the preset states the expected architecture: ``mllmkit check``
    works before the weights are downloaded, and a downloaded folder of another size is an error.
    """
    if cfg.path is not None:
        folder = pathlib.Path(cfg.path)
        if not (folder / "config.json").is_file() and cfg.preset is not None and not building:
            return dict(PRESETS[cfg.preset]), f"preset {cfg.preset} (folder {folder} not present yet)"
        raw, source = read_config(folder), str(folder / "config.json")
        if cfg.preset is not None:
            _check_matches_preset(raw, source, cfg.preset)
        return raw, source
    if cfg.preset is None:
        raise UserError("qwen: set `path` (a downloaded Qwen model folder) or `preset` "
                        "(qwen7b_chat, qwen14b_chat, qwen_tiny: random weights)")
    if PRESETS[cfg.preset]["model_type"] == "qwen2":
        raise UserError(f"qwen: preset = {cfg.preset!r} only states the architecture of a downloaded folder; "
                        f"set `path` to that folder")
    return dict(PRESETS[cfg.preset]), f"preset {cfg.preset}"


def _check_matches_preset(raw: dict[str, Any], source: str, preset: str) -> None:
    found = _hidden_size(raw, source)
    expected = _hidden_size(dict(PRESETS[preset]), f"preset {preset}")
    if found != expected:
        raise UserError(f"qwen: {source} describes a model with hidden size {found}, but preset = {preset!r} "
                        f"expects {expected}; fix the preset or the path")


def _hidden_size(raw: dict[str, Any], source: str) -> int:
    if raw.get("model_type") == "qwen2":
        return int(raw["hidden_size"])
    return int(qwen_v1_fields(raw, source)["hidden_size"])


def qwen_dims(cfg: QwenConfig, ctx: BuildContext | None = None) -> PartDims:
    """The hidden size from the folder's config.json or the preset (no weights read)."""
    raw, source = _raw_config(cfg, building=False)
    return PartDims(out_dim=_hidden_size(raw, source))


def _check_attn(name: str) -> None:
    if name == "flash_attention_2":
        import importlib.util

        if importlib.util.find_spec("flash_attn") is None:
            raise UserError("qwen: attn_implementation = 'flash_attention_2' needs the flash-attn package, "
                            "which is not installed; use 'sdpa'")


def _new_model(hf_config, dtype: torch.dtype, device: str | torch.device) -> torch.nn.Module:
    from transformers import Qwen2ForCausalLM

    return new_hf_model(Qwen2ForCausalLM, hf_config, dtype, device)


def _load_folder(model: torch.nn.Module, folder: pathlib.Path, key_map, dtype: torch.dtype, tied: bool) -> None:
    """Stream the folder's weights shard by shard into the meta model; rebuild derived buffers."""
    load_into(model, iter_tensors(checkpoint_files(folder)), key_map, source=str(folder), dtype=dtype,
              allow_missing=(r"lm_head\.weight",) if tied else ())
    if tied:
        with real_parameters():  # a loaded tensor: stays real under meta_parameters too
            model.lm_head.weight = model.model.embed_tokens.weight
    finish_meta_load(model, str(folder))


def _image_token(cfg: QwenConfig, tokenizer, default: tuple[str, ...], where: str) -> int:
    candidates = (cfg.image_token,) if cfg.image_token is not None else default
    for token in candidates:
        try:
            return tokenizer.token_id(token)
        except KeyError:
            continue
    if cfg.image_token is not None:
        raise UserError(f"qwen: image_token {cfg.image_token!r} is not a token of {where}; name a reserved "
                        f"special token of that vocabulary")
    raise UserError(f"qwen: {where} has none of {', '.join(default)} to use as the image placeholder; set the "
                    f"option image_token to a reserved special token of that tokenizer")


def build_qwen(cfg: QwenConfig, ctx: BuildContext | None = None) -> HFCausalLM:
    """The one builder: a folder (Qwen v1 converted, or Qwen2 native) or a preset, wrapped in HFCausalLM,
    its weights in ``ctx.dtype`` (the recipe's ``precision``)."""
    _check_attn(cfg.attn_implementation)
    raw, source = _raw_config(cfg)
    dtype = ctx.dtype if ctx is not None and ctx.dtype is not None else torch.bfloat16
    # where the model will run (the backend's device): weights are created or read straight there
    fallback = ctx.device if ctx is not None and ctx.device is not None else "cpu"
    single_device = cfg.device_map if cfg.device_map not in (None, "auto") else fallback
    model_type = raw.get("model_type")
    if model_type == "qwen":
        if cfg.path is not None:
            tokenizer = qwen_v1_tokenizer(pathlib.Path(cfg.path) / "qwen.tiktoken")
        elif cfg.preset == "qwen_tiny":
            tokenizer = tiny_tokenizer()
        else:
            tokenizer = QwenTokenizer(dict(tiny_ranks()), name=f"{cfg.preset} (stand-in vocabulary)",
                                      special_base=QWEN_V1_SPECIAL_BASE)
        hf_config = qwen_v1_hf_config(raw, source, pad_token_id=tokenizer.token_id(ENDOFTEXT),
                                      eos_token_ids=[tokenizer.token_id(IM_END), tokenizer.token_id(IM_START)])
        max_positions = qwen_v1_max_positions(raw, source)
        long_context = qwen_v1_long_context(raw, source)
        image_default: tuple[str, ...] = ("<|extra_0|>",)
        key_map = QWEN_V1_KEYS
    elif model_type == "qwen2":
        from transformers import Qwen2Config

        tokenizer = TokenizersTokenizer(pathlib.Path(cfg.path) / "tokenizer.json")
        hf_config = Qwen2Config.from_pretrained(str(cfg.path))
        hf_config.pad_token_id = tokenizer.token_id(ENDOFTEXT)
        hf_config.eos_token_id = [tokenizer.token_id(IM_END), tokenizer.token_id(IM_START)]
        max_positions = hf_config.max_position_embeddings
        long_context = None
        image_default = ("<|extra_0|>", "<|image_pad|>")
        key_map = QWEN2_KEYS
    else:
        raise WeightsError(f"{source}: model_type {model_type!r} is not a Qwen model this plugin loads "
                           f"(expected 'qwen' for Qwen-7B/14B v1 or 'qwen2' for Qwen2/Qwen2.5)")
    if tokenizer.vocab_size > hf_config.vocab_size:
        raise WeightsError(f"{source}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                           f"{hf_config.vocab_size} embedding rows")
    hf_config._attn_implementation = cfg.attn_implementation
    image_id = _image_token(cfg, tokenizer, image_default, str(cfg.path or source))

    if cfg.path is None:
        model = _new_model(hf_config, dtype, single_device)
    else:
        model = _new_model(hf_config, dtype, "meta")
        _load_folder(model, pathlib.Path(cfg.path), key_map, dtype, bool(hf_config.tie_word_embeddings))
        if single_device != "cpu":
            model.to(single_device)
    if long_context is not None:
        from mllmkit_llm_qwen.long_context import install_long_context

        install_long_context(model, long_context)
    model.generation_config.eos_token_id = list(hf_config.eos_token_id)
    model.generation_config.pad_token_id = hf_config.pad_token_id
    model.generation_config.bos_token_id = None
    if cfg.device_map == "auto":
        model = _dispatch(model)

    template = ChatMLTemplate(tokenizer.encode, im_start_id=tokenizer.token_id(IM_START),
                              im_end_id=tokenizer.token_id(IM_END), image_token_id=image_id,
                              pad_token_id=tokenizer.token_id(ENDOFTEXT), default_system=cfg.system)
    return HFCausalLM(model, tokenizer, template, max_positions=max_positions)


def _dispatch(model: torch.nn.Module) -> torch.nn.Module:
    """Spread the layers over the visible GPUs (inference), as ``device_map="auto"`` does in HF."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise UserError("qwen: device_map = 'auto' needs the accelerate package "
                        "(pip install 'mllmkit-llm-qwen[multi-gpu]')") from None
    device_map = infer_auto_device_map(model, no_split_module_classes=["Qwen2DecoderLayer"])
    return dispatch_model(model, device_map=device_map)


SPECS = [ComponentSpec(
    "qwen", QwenConfig, build_qwen,
    "Qwen-7B/14B-Chat (v1 folders converted to Qwen2 modules), Qwen2/2.5 folders, or a random-init preset; ChatML",
    dims=qwen_dims, defaults={"precision": "bf16"},
)]
