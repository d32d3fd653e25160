"""Export of the ``qwen`` LLM as ``Qwen2ForCausalLM``, the ``language_model`` of every export target.

Qwen v1 weights are already Qwen2 modules once loaded, so v1, Qwen2 and Qwen2.5 export the same way.
The tokenizer: a Qwen2/2.5 folder's ``tokenizer.json`` as it is; the v1 tiktoken vocabulary (and
``qwen_tiny``'s) converted to a byte-level BPE ``tokenizer.json`` with the special tokens at Qwen's
ids and NFC normalisation, as Qwen's tokenizer encodes. The chat template is ChatML exactly as
:class:`~mllmkit_llm_qwen.template.ChatMLTemplate` lays it out.
"""

from __future__ import annotations

import pathlib
from typing import Any

from mllmkit.export.jinja import content_macro, literal
from mllmkit.export.llm import CAUSAL_LM_KEYS, CAUSAL_LM_REVERSE, causal_lm_config, meta_causal_lm
from mllmkit.export.spec import ExportSpec, LLMExport
from mllmkit_llm_qwen.tokenizer import ENDOFTEXT, IM_END, IM_START, QWEN_PATTERN, QwenTokenizer

__all__ = ["SPECS", "chatml_jinja", "hf_tokenizer", "restore_qwen"]


def hf_tokenizer(llm: Any):
    """A ``tokenizers.Tokenizer`` with the same ids as ``llm.tokenizer``."""
    from tokenizers import Tokenizer

    from mllmkit.export.tokenizers import tiktoken_tokenizer

    tokenizer = llm.tokenizer
    if isinstance(tokenizer, QwenTokenizer):
        encoding = tokenizer._enc
        ranks = {piece: encoding.encode_single_token(piece) for piece in encoding.token_byte_values()}
        return tiktoken_tokenizer(ranks, QWEN_PATTERN, tokenizer.special_ids, nfc=True)
    return Tokenizer.from_file(str(tokenizer.path))


def chatml_jinja(llm: Any, image_token: str, tokens_per_image: int) -> str:
    """ChatML: system block (the first system message or the default), then the turns; a first
    message that is not the user's is dropped; the generation prompt opens the assistant turn."""
    default = llm.template.default_system or ""
    return content_macro(image_token, tokens_per_image) + (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {literal(default)} -%}}{{%- set turns = messages -%}}{{%- endif -%}}\n"
        "{%- if turns and turns[0]['role'] != 'user' -%}{%- set turns = turns[1:] -%}{%- endif -%}\n"
        "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' -}}\n"
        "{%- for message in turns -%}"
        "{%- if message['role'] not in ('user', 'assistant') -%}"
        "{{- raise_exception('after the first message, roles must be user or assistant') -}}{%- endif -%}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + render(message['content']) + '<|im_end|>\\n' -}}"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}\n"
    )


def restore_qwen(folder: pathlib.Path, text_config: Any, config: Any, image_token_id: int, dtype):
    """The ``qwen`` LLM of an exported folder, on the meta device (its tensors are loaded by the caller)."""
    from transformers import Qwen2ForCausalLM

    from mllmkit.export.tokenizers import PlainTextTokenizer
    from mllmkit.hf_llm import HFCausalLM
    from mllmkit_llm_qwen.template import ChatMLTemplate

    tokenizer = PlainTextTokenizer(folder / "tokenizer.json")
    template = ChatMLTemplate(tokenizer.encode, im_start_id=tokenizer.token_id(IM_START),
                              im_end_id=tokenizer.token_id(IM_END), image_token_id=image_token_id,
                              pad_token_id=tokenizer.token_id(ENDOFTEXT), default_system=config.system)
    model = meta_causal_lm(Qwen2ForCausalLM, text_config, dtype)
    return HFCausalLM(model, tokenizer, template, max_positions=text_config.max_position_embeddings)


SPECS = [ExportSpec("qwen", "llm", "language_model", "Qwen v1/2/2.5 → Qwen2ForCausalLM; tokenizer.json; ChatML",
                    keys=CAUSAL_LM_KEYS, reverse=CAUSAL_LM_REVERSE, config=causal_lm_config,
                    llm=LLMExport(tokenizer=hf_tokenizer, chat_template=chatml_jinja, restore=restore_qwen))]
