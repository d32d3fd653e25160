"""Baichuan2-7B folders to transformers' native ``LlamaForCausalLM``: config fields and a key table.

Baichuan2-7B is Llama math with a fused ``W_pack`` ([3*hidden, hidden], q|k|v, no bias) and a
"NormHead": at inference the head rows are L2-normalised (``F.normalize(weight)``), so the head is
normalised once here, on load. Rotary base 10000. Baichuan2-13B replaces rotary embeddings by ALiBi
biases and is refused with a message saying so.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from mllmkit.weights import KeyMap, WeightsError

__all__ = [
    "ALIBI_MESSAGE",
    "BAICHUAN_KEYS",
    "PRESETS",
    "BaichuanArch",
    "hf_config",
    "normalize_head",
    "read_arch",
]

ALIBI_MESSAGE = ("Baichuan2-13B uses ALiBi position biases, which this plugin does not implement; "
                 "use Baichuan2-7B-Chat")


@attrs.frozen
class BaichuanArch:
    """The fields of a Baichuan2 ``config.json`` this plugin uses."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    model_max_length: int = 4096


PRESETS: dict[str, BaichuanArch] = {
    "baichuan2_7b_chat": BaichuanArch(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                      num_attention_heads=32, vocab_size=125696),
    "baichuan2_tiny": BaichuanArch(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, vocab_size=512, max_position_embeddings=512,
                                   model_max_length=512),
}


def read_arch(folder: pathlib.Path) -> BaichuanArch:
    """The architecture from ``folder/config.json``; refuses non-Baichuan and ALiBi (13B) configs."""
    path = folder / "config.json"
    if not path.is_file():
        raise WeightsError(f"{path}: not found; point path at a Baichuan2-7B-Chat folder "
                           f"(config.json, tokenizer.model, pytorch_model.bin)")
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"{path}: not valid JSON ({exc})") from None
    if raw.get("model_type") != "baichuan":
        raise WeightsError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'baichuan' "
                           f"(a Baichuan2-7B-Chat folder)")
    if (raw.get("hidden_size"), raw.get("num_hidden_layers")) == (5120, 40) or "max_position_embeddings" not in raw:
        raise WeightsError(f"{path}: {ALIBI_MESSAGE}")
    fields = {f.name for f in attrs.fields(BaichuanArch)}
    required = [f.name for f in attrs.fields(BaichuanArch) if f.default is attrs.NOTHING]
    missing = [name for name in required if name not in raw]
    if missing:
        raise WeightsError(f"{path}: missing fields {', '.join(missing)}")
    values = {k: v for k, v in raw.items() if k in fields}
    values.setdefault("model_max_length", raw["max_position_embeddings"])
    return BaichuanArch(**values)


def hf_config(arch: BaichuanArch, *, pad_token_id: int, bos_token_id: int | None, eos_token_ids: list[int]):
    """The equivalent ``LlamaConfig`` (multi-head attention, no biases, untied head, rope base 10000)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_hidden_layers, num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_attention_heads, hidden_act="silu", rms_norm_eps=arch.rms_norm_eps,
        max_position_embeddings=arch.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, attention_bias=False, mlp_bias=False,
        tie_word_embeddings=False, pad_token_id=pad_token_id, bos_token_id=bos_token_id,
        eos_token_id=eos_token_ids)


def _split_w_pack(match, tensor: torch.Tensor):
    q, k, v = tensor.chunk(3, dim=0)
    prefix = f"model.layers.{match.group(1)}.self_attn"
    return [(f"{prefix}.q_proj.weight", q), (f"{prefix}.k_proj.weight", k), (f"{prefix}.v_proj.weight", v)]


def normalize_head(weight: torch.Tensor) -> torch.Tensor:
    """Baichuan2's NormHead at inference: every vocabulary row scaled to unit L2 norm (in fp32)."""
    return F.normalize(weight.float(), dim=-1)


BAICHUAN_KEYS = KeyMap(
    rules=[
        (r"model\.layers\.(\d+)\.self_attn\.W_pack\.weight", _split_w_pack),
        (r"lm_head\.weight", lambda match, tensor: [("lm_head.weight", normalize_head(tensor))]),
        (r"model\.(embed_tokens|norm)\.weight", r"model.\1.weight"),
        (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
        (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"model.layers.\1.mlp.\2_proj.weight"),
        (r"model\.layers\.(\d+)\.(input|post_attention)_layernorm\.weight", r"model.layers.\1.\2_layernorm.weight"),
    ],
    skip=[r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"],
)
