"""What a plugin declares to export its part: :class:`ExportSpec` and the key :class:`Table` type.

An export spec says, for one registered component (``eva_vit_g``, ``qformer``, ``linear``, ``clip_tiny``,
``mlp``, ``qwen``…), which slot of a transformers target class its part fills (``role``; the targets
are :data:`mllmkit.export.targets.TARGETS`), how its parameter names become the target's (``keys``;
an LLM's become its ``*ForCausalLM`` names, which each target places) and back (``reverse``), and
which config fields it sets (``config``). LLM parts add an :class:`LLMExport`: the Hugging Face tokenizer, the Jinja chat
template, and how to rebuild the mllmkit LLM from an exported folder. Tables are pure: a function of
the tensors alone, so they are tested both ways on tiny random weights.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from mllmkit.errors import UserError

__all__ = ["ExportError", "ExportSpec", "LLMExport", "Table", "hf_config_fields"]

Rule = tuple[str, "str | Callable[[re.Match, Mapping[str, Any]], list[tuple[str, Any]]]"]


class ExportError(UserError):
    """The model cannot be exported, or the exported folder does not match it."""


@attrs.frozen
class Table:
    """Renames of a state dict as ``(pattern, replacement)`` rules, first full match wins.

    A replacement is a regex template, or a function ``(match, tensors) -> [(name, tensor), …]``
    that may read other keys of the same state dict (e.g. fuse ``q_bias`` and ``v_bias`` into one
    ``qkv.bias``); keys read that way are listed in ``consumed``. Every input key must match a rule
    or ``consumed`` and no output name may repeat, else :class:`ExportError` names the keys.
    """

    rules: Sequence[Rule]
    consumed: Sequence[str] = ()

    def matches(self, key: str) -> bool:
        return any(re.fullmatch(p, key) for p, _ in self.rules) or any(re.fullmatch(p, key) for p in self.consumed)

    def apply(self, tensors: Mapping[str, Any], source: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        unmatched = []
        for key in tensors:
            rule = next(((m, r) for p, r in self.rules if (m := re.fullmatch(p, key))), None)
            if rule is None:
                if not any(re.fullmatch(p, key) for p in self.consumed):
                    unmatched.append(key)
                continue
            match, replacement = rule
            pairs = replacement(match, tensors) if callable(replacement) else [(match.expand(replacement), tensors[key])]
            for name, value in pairs:
                if name in out:
                    raise ExportError(f"{source}: two tensors map to {name!r}")
                out[name] = value
        if unmatched:
            raise ExportError(f"{source}: no export rule for {len(unmatched)} tensor(s): {', '.join(unmatched[:10])}")
        return out


@attrs.frozen
class LLMExport:
    """What only an LLM part supplies.

    ``tokenizer(llm)`` returns a ``tokenizers.Tokenizer`` whose ids equal ``llm.tokenizer``'s (special
    tokens at the same ids); ``chat_template(llm, image_token, tokens_per_image)`` the Jinja text
    rendering the same prompt as ``llm.template`` (use :func:`mllmkit.export.jinja.content_macro` for
    message content); ``restore(folder, text_config, config, image_token_id)`` rebuilds the mllmkit
    LLM on the meta device from an exported folder (the caller loads the tensors).
    """

    tokenizer: Callable[[Any], Any]
    chat_template: Callable[[Any, str, int], str]
    restore: Callable[..., Any]


@attrs.frozen
class ExportSpec:
    """How one registered component exports: its slot, key tables both ways and config fields.

    ``name``/``kind``: the component it exports (``eva_vit_g``, ``vision``). ``config(part)`` returns
    keyword arguments of the target's config (e.g. ``{"vision_config": {...}}``) read from the built part.
    ``keys`` maps the part's ``state_dict()`` names to the target's; ``reverse`` maps them back.
    ``image_processor(part)`` (vision parts) returns the transformers image processor doing the
    part's eval transform. ``distribution`` is filled in by the registry.
    """

    name: str
    kind: str
    role: str
    description: str
    keys: Table
    reverse: Table
    config: Callable[[Any], dict[str, Any]]
    image_processor: Callable[[Any], Any] | None = None
    llm: LLMExport | None = None
    distribution: str = ""

    def __attrs_post_init__(self) -> None:
        from mllmkit.export.targets import ROLES

        if self.role not in ROLES:
            raise ValueError(f"export spec {self.name!r}: role must be one of {', '.join(sorted(ROLES))}, "
                             f"found {self.role!r}")


def hf_config_fields(config: Any) -> dict[str, Any]:
    """A transformers config as keyword arguments of a sub-config, without the fields saving adds."""
    fields = config.to_dict()
    for key in ("_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version"):
        fields.pop(key, None)
    return fields
