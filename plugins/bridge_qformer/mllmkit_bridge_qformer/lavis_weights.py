"""Loading LAVIS BLIP-2 checkpoints (``{"model": state_dict}``) into a :class:`QFormerBridge`.

The rename table maps LAVIS names (``Qformer.bert.encoder.layer.N.attention.self.query.weight``, …)
onto transformers' ``Blip2QFormerModel`` names under ``qformer.``. Tensors a BLIP-2 FlanT5 file
may carry that the query path does not use (``t5_proj``, word/position embeddings, ``position_ids``,
the text FFNs ``intermediate.``/``output.``, the MLM head ``cls.``) are expected and skipped. A ``query_tokens`` with another query count than the recipe's is dropped
with a warning and the queries keep their initialisation, as LAVIS does. Anything else unexpected or
missing is an error that lists the keys.
"""

from __future__ import annotations

import pathlib
import warnings

import torch
from torch import nn

from mllmkit.weights import KeyMap, LoadReport, checkpoint_files, iter_tensors, load_into
from mllmkit_bridge_qformer.model import QFormerBridge

__all__ = ["LAVIS_QFORMER_KEYS", "LAVIS_SKIPPED", "LAVIS_SUBKEY", "load_lavis_qformer"]

LAVIS_SUBKEY = "model"
"""LAVIS ``load_from_pretrained`` reads ``checkpoint["model"]``."""

_LAYER = r"Qformer\.bert\.encoder\.layer\.(\d+)\."

LAVIS_QFORMER_KEYS: tuple[tuple[str, str], ...] = (
    (r"query_tokens", r"query_tokens"),
    (r"ln_vision\.(weight|bias)", r"ln_vision.\1"),
    (r"Qformer\.bert\.embeddings\.LayerNorm\.(weight|bias)", r"qformer.layernorm.\1"),
    (_LAYER + r"(attention|crossattention)\.self\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.attention.\3.\4"),
    (_LAYER + r"(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.output.\3.\4"),
    (_LAYER + r"intermediate_query\.dense\.(weight|bias)", r"qformer.encoder.layer.\1.intermediate_query.dense.\2"),
    (_LAYER + r"output_query\.(dense|LayerNorm)\.(weight|bias)", r"qformer.encoder.layer.\1.output_query.\2.\3"),
)
"""LAVIS key pattern → module key, first match wins."""

LAVIS_SKIPPED: tuple[str, ...] = (
    r"t5_proj\..*",
    r"Qformer\.bert\.embeddings\.position_ids",
    r"Qformer\.bert\.embeddings\.(word|position)_embeddings\..*",
    _LAYER + r"(intermediate|output)\..*",
    r"Qformer\.cls\..*",
)
"""Text-branch and LLM-projection tensors of a BLIP-2 file that the query path does not use."""


def load_lavis_qformer(module: QFormerBridge, path: str | pathlib.Path, *, dtype: torch.dtype = torch.float32,
                       ) -> LoadReport:
    """Stream a LAVIS BLIP-2 checkpoint into ``module`` (built on the meta device or not).

    The Q-Former and ``query_tokens`` are cast to ``dtype``; ``ln_vision`` stays fp32.
    """
    path = pathlib.Path(path)
    shards = list(iter_tensors(checkpoint_files(path), subkey=LAVIS_SUBKEY))  # memory-mapped
    skip, allow_missing = list(LAVIS_SKIPPED), []
    queries = next((t for shard in shards for k, t in shard if k == "query_tokens"), None)
    dropped = queries is not None and queries.dim() == 3 and queries.shape[1] != module.num_query_tokens
    if dropped:
        warnings.warn(
            f"{path}: query_tokens holds {queries.shape[1]} queries but the recipe asks for "
            f"num_query_tokens = {module.num_query_tokens}; the checkpoint's query_tokens are not loaded and "
            f"the queries keep their initialisation (as LAVIS does)", UserWarning, stacklevel=2)
        skip.append(r"query_tokens")
        allow_missing.append(r"query_tokens")
    report = load_into(module, shards, KeyMap(rules=LAVIS_QFORMER_KEYS, skip=skip), source=str(path), dtype=dtype,
                       keep_fp32=[r"ln_vision\..*"], allow_missing=allow_missing)
    if dropped and module.query_tokens.is_meta:
        fresh = torch.empty(module.query_tokens.shape, dtype=dtype).normal_(std=module.qformer.config.initializer_range)
        module.query_tokens = nn.Parameter(fresh, requires_grad=module.query_tokens.requires_grad)
    return report
