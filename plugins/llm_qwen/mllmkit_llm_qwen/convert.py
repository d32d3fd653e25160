"""Qwen v1 (``model_type = "qwen"``) configs and weights → transformers' native ``Qwen2ForCausalLM``.

Qwen v1 and Qwen2 compute the same function up to ``seq_length`` tokens: fused ``c_attn`` (with
bias) = q/k/v stacked on the output dim, rotary embeddings (rotate-half, base ``rotary_emb_base``),
RMSNorm, SwiGLU ``c_proj(w1(x) * silu(w2(x)))``. Beyond ``seq_length`` v1 switches on dynamic NTK
rotary scaling and log-n attention scaling, which Qwen2 does not have: :func:`qwen_v1_long_context`
reads them for :mod:`mllmkit_llm_qwen.long_context`, and :func:`qwen_v1_max_positions` gives the limit
the wrapper refuses past (``max_position_embeddings``/``n_positions``).

Both config spellings are accepted: first release (``n_embd``, ``n_head``, ``n_layer``,
``ffn_hidden_size``, ``padded_vocab_size``, ``n_positions``, ``layer_norm_epsilon``) and later
(``hidden_size``, ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``,
``max_position_embeddings``). ``intermediate_size``/``ffn_hidden_size`` is twice the width of each
of ``w1``/``w2``. :data:`QWEN_V1_KEYS` is the key table (``weights.tsv`` names).
"""

from __future__ import annotations

import json
import pathlib
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs
import torch

from mllmkit.weights import KeyMap, WeightsError

__all__ = [
    "LongContext",
    "QWEN2_KEYS",
    "QWEN_V1_KEYS",
    "qwen_v1_fields",
    "qwen_v1_hf_config",
    "qwen_v1_long_context",
    "qwen_v1_max_positions",
    "read_config",
]

# (field, later spelling, first-release spelling); the first present wins.
_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("hidden_size", ("hidden_size", "n_embd")),
    ("num_layers", ("num_hidden_layers", "n_layer")),
    ("num_heads", ("num_attention_heads", "n_head")),
    ("ffn_size", ("intermediate_size", "ffn_hidden_size")),
    ("vocab_size", ("padded_vocab_size", "vocab_size")),
    ("eps", ("layer_norm_epsilon",)),
)


def read_config(folder: pathlib.Path) -> dict[str, Any]:
    """``folder/config.json`` as a dict, with a clear error when absent or malformed."""
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsError(f"{folder}: no config.json; `path` must be a Qwen model folder as downloaded "
                           f"(config.json, weights, qwen.tiktoken or tokenizer.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None


def _get(raw: Mapping[str, Any], names: tuple[str, ...], source: str, default: Any = None) -> Any:
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    if default is not None:
        return default
    raise WeightsError(f"{source}: missing field {' / '.join(names)}")


def qwen_v1_fields(raw: Mapping[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The architecture fields of a Qwen v1 config in either spelling, checked."""
    fields = {name: _get(raw, names, source, 1e-6 if name == "eps" else None) for name, names in _FIELDS}
    fields["rope_theta"] = float(raw.get("rotary_emb_base", 10000))
    fields["seq_length"] = int(_get(raw, ("seq_length", "max_position_embeddings", "n_positions"), source))
    fields["max_positions"] = int(_get(raw, ("max_position_embeddings", "n_positions"), source, fields["seq_length"]))
    fields["dynamic_ntk"] = bool(raw.get("use_dynamic_ntk", True))
    fields["logn"] = bool(raw.get("use_logn_attn", True))
    fields["tie"] = bool(raw.get("tie_word_embeddings", False))
    if fields["ffn_size"] % 2:
        raise WeightsError(f"{source}: intermediate_size/ffn_hidden_size {fields['ffn_size']} must be even "
                           f"(it is twice the width of w1 and w2)")
    if float(raw.get("rotary_pct", 1.0)) != 1.0:
        raise WeightsError(f"{source}: rotary_pct {raw['rotary_pct']} is not supported (only 1.0, as every "
                           f"released Qwen v1 model)")
    head_dim = fields["hidden_size"] // fields["num_heads"]
    if raw.get("kv_channels") not in (None, head_dim) or head_dim * fields["num_heads"] != fields["hidden_size"]:
        raise WeightsError(f"{source}: kv_channels {raw.get('kv_channels')} × heads {fields['num_heads']} must "
                           f"equal hidden size {fields['hidden_size']}")
    return fields


@attrs.frozen
class LongContext:
    """A Qwen v1 config's context extension: the trained length, the length it extends to (refused
    past it), and which of dynamic NTK rotary scaling and log-n query scaling it turns on."""

    seq_length: int
    max_positions: int
    dynamic_ntk: bool
    logn: bool


def qwen_v1_long_context(raw: Mapping[str, Any], source: str = "config.json") -> LongContext | None:
    """The config's dynamic NTK / log-n settings; None when neither is on or nothing lies past ``seq_length``."""
    f = qwen_v1_fields(raw, source)
    if not (f["dynamic_ntk"] or f["logn"]) or f["max_positions"] <= f["seq_length"]:
        return None
    return LongContext(seq_length=f["seq_length"], max_positions=f["max_positions"], dynamic_ntk=f["dynamic_ntk"],
                       logn=f["logn"])


def qwen_v1_max_positions(raw: Mapping[str, Any], source: str = "config.json") -> int | None:
    """``max_position_embeddings``/``n_positions`` (the length v1 extends to) when dynamic NTK or log-n
    scaling is on; None when neither is (plain rotary at any length)."""
    fields = qwen_v1_fields(raw, source)
    return fields["max_positions"] if fields["dynamic_ntk"] or fields["logn"] else None


def qwen_v1_hf_config(raw: Mapping[str, Any], source: str = "config.json", *, pad_token_id: int | None = None,
                      eos_token_ids: list[int] | None = None):
    """A transformers ``Qwen2Config`` computing the same function as the Qwen v1 config ``raw``."""
    from transformers import Qwen2Config

    f = qwen_v1_fields(raw, source)
    return Qwen2Config(
        vocab_size=f["vocab_size"], hidden_size=f["hidden_size"], intermediate_size=f["ffn_size"] // 2,
        num_hidden_layers=f["num_layers"], num_attention_heads=f["num_heads"],
        num_key_value_heads=f["num_heads"], hidden_act="silu", max_position_embeddings=f["seq_length"],
        rms_norm_eps=float(f["eps"]), tie_word_embeddings=f["tie"],
        rope_parameters={"rope_type": "default", "rope_theta": f["rope_theta"]},
        use_sliding_window=False, attention_dropout=0.0, pad_token_id=pad_token_id,
        eos_token_id=eos_token_ids, bos_token_id=None,
    )


def _split_c_attn(match: re.Match, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """``c_attn`` [3H(, H)] → q_proj, k_proj, v_proj (contiguous thirds of the output dim)."""
    layer, kind = match.group(1), match.group(2)
    if tensor.shape[0] % 3:
        raise WeightsError(f"transformer.h.{layer}.attn.c_attn.{kind} has {tensor.shape[0]} output rows, "
                           f"not a multiple of 3")
    for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
        yield f"model.layers.{layer}.self_attn.{name}.{kind}", part


QWEN_V1_KEYS = KeyMap(
    rules=(
        (r"transformer\.wte\.weight", "model.embed_tokens.weight"),
        (r"transformer\.h\.(\d+)\.ln_1\.weight", r"model.layers.\1.input_layernorm.weight"),
        (r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)", _split_c_attn),
        (r"transformer\.h\.(\d+)\.attn\.c_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
        (r"transformer\.h\.(\d+)\.ln_2\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
        (r"transformer\.h\.(\d+)\.mlp\.w2\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
        (r"transformer\.h\.(\d+)\.mlp\.w1\.weight", r"model.layers.\1.mlp.up_proj.weight"),
        (r"transformer\.h\.(\d+)\.mlp\.c_proj\.weight", r"model.layers.\1.mlp.down_proj.weight"),
        (r"transformer\.ln_f\.weight", "model.norm.weight"),
        (r"lm_head\.weight", "lm_head.weight"),
    ),
    # buffers some Qwen v1 revisions saved: recomputed, never read
    skip=(r"transformer\.(h\.\d+\.attn\.)?rotary_emb\.inv_freq", r"transformer\.h\.\d+\.attn\.(masked_)?bias"),
)
"""Qwen v1 checkpoint keys → Qwen2ForCausalLM keys."""

QWEN2_KEYS = KeyMap(
    rules=((r"(model\..+|lm_head\.weight)", r"\1"),),
    skip=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",),
)
"""Native Qwen2/2.5 checkpoints: names are already the model's."""
