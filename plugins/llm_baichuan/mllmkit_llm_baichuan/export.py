"""Export of ``baichuan2`` / ``baichuan2_tiny`` as ``LlamaForCausalLM`` (every export target's ``language_model``).

The weights are already ``LlamaForCausalLM`` modules once loaded (W_pack split, NormHead normalised),
so they export by one prefix rule. The sentencepiece vocabulary becomes a ``tokenizer.json`` through
transformers' ``SpmConverter.build_tokenizer_from_spm_proto``, from the proto as this plugin loads it
(reserved pieces are control pieces, so text never encodes to them); the control pieces (turn tokens,
image placeholder, bos/eos) are special tokens at their ids. The chat template is Baichuan2's layout
exactly as :class:`~mllmkit_llm_baichuan.template.BaichuanTemplate` builds it.
"""

from __future__ import annotations

import pathlib
from typing import Any

from mllmkit.export.jinja import content_macro, literal
from mllmkit.export.llm import CAUSAL_LM_KEYS, CAUSAL_LM_REVERSE, causal_lm_config, meta_causal_lm
from mllmkit.export.spec import ExportSpec, LLMExport

__all__ = ["SPECS", "baichuan_jinja", "hf_tokenizer", "restore_baichuan"]


def hf_tokenizer(llm: Any):
    """A ``tokenizers.Tokenizer`` with the same ids as the plugin's sentencepiece tokenizer."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import AddedToken
    from transformers.convert_slow_tokenizer import SpmConverter

    proto = pb.ModelProto()
    proto.ParseFromString(llm.tokenizer.sp.serialized_model_proto())
    vocab = {piece.piece: index for index, piece in enumerate(proto.pieces)}
    tokenizer = SpmConverter.build_tokenizer_from_spm_proto(proto, vocab)
    control = [piece.piece for piece in proto.pieces if piece.type == pb.ModelProto.SentencePiece.CONTROL]
    tokenizer.add_special_tokens([AddedToken(piece, normalized=False, special=True) for piece in control])
    return tokenizer


def baichuan_jinja(llm: Any, image_token: str, tokens_per_image: int) -> str:
    """System text (first system message or the default) as plain text, then ``<user>`` + text and
    ``<assistant>`` + answer per turn; the generation prompt is the assistant token; a conversation
    ending with an answer ends with eos."""
    template, tokenizer = llm.template, llm.tokenizer
    user, assistant, eos = (tokenizer.sp.id_to_piece(i) for i in (template.user_token_id,
                                                                  template.assistant_token_id, template.eos_token_id))
    return content_macro(image_token, tokens_per_image) + (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set system = messages[0]['content'] -%}{%- set turns = messages[1:] -%}"
        f"{{%- else -%}}{{%- set system = {literal(template.default_system or '')} -%}}{{%- set turns = messages -%}}"
        "{%- endif -%}\n"
        "{{- render(system) -}}\n"
        "{%- for message in turns -%}"
        f"{{%- if message['role'] == 'user' -%}}{{{{- {literal(user)} + render(message['content']) -}}}}"
        f"{{%- elif message['role'] == 'assistant' -%}}{{{{- {literal(assistant)} + render(message['content']) -}}}}"
        "{%- else -%}{{- raise_exception('roles must be user or assistant after an optional system message') -}}"
        "{%- endif -%}{%- endfor -%}\n"
        f"{{%- if add_generation_prompt -%}}{{{{- {literal(assistant)} -}}}}"
        f"{{%- elif turns and turns[-1]['role'] == 'assistant' -%}}{{{{- {literal(eos)} -}}}}{{%- endif -%}}\n"
    )


def restore_baichuan(folder: pathlib.Path, text_config: Any, config: Any, image_token_id: int, dtype):
    """The Baichuan2 LLM of an exported folder, on the meta device (its tensors are loaded by the caller)."""
    from transformers import LlamaForCausalLM

    from mllmkit.export.tokenizers import PlainTextTokenizer
    from mllmkit.hf_llm import HFCausalLM
    from mllmkit_llm_baichuan.components import ASSISTANT_TOKEN, USER_TOKEN
    from mllmkit_llm_baichuan.template import BaichuanTemplate

    tokenizer = PlainTextTokenizer(folder / "tokenizer.json")
    template = BaichuanTemplate(tokenizer.encode, user_token_id=tokenizer.token_id(USER_TOKEN),
                                assistant_token_id=tokenizer.token_id(ASSISTANT_TOKEN),
                                eos_token_id=text_config.eos_token_id[0],
                                pad_token_id=text_config.pad_token_id, image_token_id=image_token_id,
                                default_system=config.system)
    model = meta_causal_lm(LlamaForCausalLM, text_config, dtype)
    return HFCausalLM(model, tokenizer, template, max_positions=text_config.max_position_embeddings)


SPECS = [
    ExportSpec(name, "llm", "language_model", "Baichuan2-7B → LlamaForCausalLM; tokenizer.json; Baichuan2 chat format",
               keys=CAUSAL_LM_KEYS, reverse=CAUSAL_LM_REVERSE, config=causal_lm_config,
               llm=LLMExport(tokenizer=hf_tokenizer, chat_template=baichuan_jinja, restore=restore_baichuan))
    for name in ("baichuan2", "baichuan2_tiny")
]
