"""mllmkit plugin for Qwen LLMs: Qwen-7B/14B-Chat v1 folders (converted on load to transformers'
native ``Qwen2ForCausalLM``, tiktoken vocabulary from ``qwen.tiktoken``), Qwen2/Qwen2.5 folders,
the ``qwen_tiny`` preset that needs no files, and the ChatML chat template MiniGPT4Qwen trains with.
"""

from mllmkit_llm_qwen.template import ChatMLTemplate
from mllmkit_llm_qwen.tokenizer import QwenTokenizer, TokenizersTokenizer, qwen_v1_tokenizer, tiny_tokenizer

__all__ = ["ChatMLTemplate", "QwenTokenizer", "TokenizersTokenizer", "qwen_v1_tokenizer", "tiny_tokenizer"]
