"""Jinja pieces every exported chat template shares: string literals and message content.

Message content is a string or a list of parts (``{"type": "text", "text": …}``, ``{"type":
"image"}``). Each :data:`~mllmkit.template.IMAGE_MARKER` in text, and each image part (written as
:data:`~mllmkit.template.IMAGE_SPAN`, as the chat session writes an image into a question), becomes
``tokens_per_image`` copies of the image placeholder token: the same ids the training template
produces, so the target scatters the image features into the same places (a target whose processor
expands each placeholder itself, as ``LlavaProcessor`` does, asks for one copy per image).
"""

from __future__ import annotations

import json

from mllmkit.template import IMAGE_MARKER, IMAGE_SPAN

__all__ = ["content_macro", "literal"]


def literal(text: str) -> str:
    """``text`` as a Jinja string literal."""
    return json.dumps(text, ensure_ascii=False)


def content_macro(image_token: str, tokens_per_image: int) -> str:
    """Jinja defining ``render(content)``: text with image markers and image parts expanded."""
    before, after = IMAGE_SPAN.split(IMAGE_MARKER)
    return (
        f"{{%- set image_slots = {literal(image_token)} * {tokens_per_image} -%}}\n"
        "{%- macro render(content) -%}\n"
        "{%- if content is string -%}\n"
        f"{{{{- content | replace({literal(IMAGE_MARKER)}, image_slots) -}}}}\n"
        "{%- else -%}{%- for part in content -%}\n"
        "{%- if part['type'] in ('image', 'image_url') -%}"
        f"{{{{- {literal(before)} + image_slots + {literal(after)} -}}}}\n"
        "{%- elif part['type'] == 'text' -%}"
        f"{{{{- part['text'] | replace({literal(IMAGE_MARKER)}, image_slots) -}}}}\n"
        "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
        "{%- endmacro -%}\n"
    )
