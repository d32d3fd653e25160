"""Baichuan2-7B-Chat for mllmkit: original folders converted to ``LlamaForCausalLM`` (fused ``W_pack``
split, NormHead normalised on load), the sentencepiece vocabulary, and Baichuan2's chat format.

Components: ``baichuan2`` (a folder, or a preset for wiring checks) and ``baichuan2_tiny`` (no files).
"""

from mllmkit_llm_baichuan.components import (
           Baichuan2Config,
           Baichuan2TinyConfig,
           baichuan_dims,
           build_baichuan,
)
from mllmkit_llm_baichuan.convert import ALIBI_MESSAGE, BAICHUAN_KEYS, PRESETS, BaichuanArch, read_arch
from mllmkit_llm_baichuan.template import BaichuanTemplate
from mllmkit_llm_baichuan.tokenizer import SentencePieceTokenizer, load_tokenizer, tiny_tokenizer

__all__ = [
           "ALIBI_MESSAGE",
           "BAICHUAN_KEYS",
           "PRESETS",
           "Baichuan2Config",
           "Baichuan2TinyConfig",
           "BaichuanArch",
           "BaichuanTemplate",
           "SentencePieceTokenizer",
           "baichuan_dims",
           "build_baichuan",
           "load_tokenizer",
           "read_arch",
           "tiny_tokenizer",
]
