"""Toy components for tests: a patch-linear vision encoder and a byte-level Llama LLM.

They follow the same interfaces as real plugins, build in milliseconds and need no files, so core
and third-party plugin tests can assemble a whole MLLM (e.g. a new bridge between ``toy_vision``
and ``toy_llm``). Registered by :mod:`mllmkit.testing.pytest_plugin` fixtures, never by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import torch
from torch import nn

from mllmkit.config import config, positive
from mllmkit.hf_llm import HFCausalLM
from mllmkit.hookspecs import hookimpl
from mllmkit.interfaces import BuildContext, PartDims
from mllmkit.registry import ComponentSpec
from mllmkit.template import Message, Piece, text_pieces

__all__ = ["ToyVision", "ByteTokenizer", "ToyTemplate", "build_toy_llm", "ToyVisionConfig", "ToyLLMConfig",
           "letters_only"]


@config
class ToyVisionConfig:
    image_size: int = attrs.field(default=16, validator=positive)
    patch_size: int = attrs.field(default=8, validator=positive)
    width: int = attrs.field(default=24, validator=positive)


class ToyVision(nn.Module):
    """Patches → Linear, plus a class token: ``[B,3,H,W] → [B, patches + 1, width]``."""

    def __init__(self, image_size: int, patch_size: int, width: int) -> None:
        super().__init__()
        self.image_size, self.out_dim = image_size, width
        self.num_tokens = (image_size // patch_size) ** 2 + 1
        self.patch = nn.Conv2d(3, width, patch_size, patch_size)
        self.cls = nn.Parameter(torch.randn(1, 1, width) * 0.02)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.patch(pixels).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)

    def image_transform(self, train: bool):
        from torchvision import transforms

        return transforms.Compose([transforms.Resize((self.image_size, self.image_size)), transforms.ToTensor()])

    def blocks(self) -> Sequence[nn.Module]:
        return [self.patch]


class ByteTokenizer:
    """UTF-8 bytes are ids 0–255; special tokens follow. ``encode`` never produces a special id."""

    SPECIALS = ("<pad>", "<user>", "<assistant>", "<end>", "<image>")

    def __init__(self) -> None:
        self.special_ids = {name: 256 + i for i, name in enumerate(self.SPECIALS)}
        self.vocab_size = 256 + len(self.SPECIALS)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


@attrs.define
class ToyTemplate:
    """``<user> text <end> <assistant> answer <end>``; answers and their ``<end>`` are labelled."""

    tokenizer: ByteTokenizer
    default_system: str | None = None

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.special_ids["<image>"]

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.special_ids["<pad>"]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        return (self.tokenizer.special_ids["<end>"],)

    def pieces(self, messages: Sequence[Message], tokens_per_image: int, *, system: str | None = None,
               add_generation_prompt: bool = False) -> list[Piece]:
        ids = self.tokenizer.special_ids
        out: list[Piece] = []
        for message in messages:
            role = message["role"]
            if role == "system":
                continue
            answer = role == "assistant"
            out.append(Piece((ids["<assistant>" if answer else "<user>"],)))
            out += text_pieces(message["content"], self.tokenizer.encode, self.image_token_id,
                               tokens_per_image, labelled=answer)
            out.append(Piece((ids["<end>"],), labelled=answer))
        if add_generation_prompt:
            out.append(Piece((ids["<assistant>"],)))
        return out


@config
class ToyLLMConfig:
    hidden_size: int = attrs.field(default=32, validator=positive)
    num_layers: int = attrs.field(default=2, validator=positive)
    num_heads: int = attrs.field(default=4, validator=positive)


def build_toy_llm(cfg: ToyLLMConfig, ctx: BuildContext | None = None) -> HFCausalLM:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = ByteTokenizer()
    hf_config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=cfg.hidden_size,
                            intermediate_size=cfg.hidden_size * 2, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
                            max_position_embeddings=512, pad_token_id=tokenizer.special_ids["<pad>"],
                            eos_token_id=tokenizer.special_ids["<end>"], bos_token_id=None)
    return HFCausalLM(LlamaForCausalLM(hf_config), tokenizer, ToyTemplate(tokenizer), max_positions=512)


def letters_only(model: nn.Module) -> None:
    """Let a toy-LLM MLLM emit only a–z, space and ``<end>``: answers are printable single lines."""
    hf = model.llm.hf_model
    head = nn.Linear(hf.lm_head.in_features, hf.lm_head.out_features, bias=True)
    allowed = [*range(ord("a"), ord("z") + 1), ord(" "), ByteTokenizer().special_ids["<end>"]]
    with torch.no_grad():
        head.weight.copy_(hf.lm_head.weight)
        head.bias.fill_(-1e4)
        head.bias[allowed] = 0.0
    hf.lm_head = head


def _build_vision(cfg: ToyVisionConfig, ctx: BuildContext) -> ToyVision:
    return ToyVision(cfg.image_size, cfg.patch_size, cfg.width)


SPECS_VISION = [ComponentSpec(
    "toy_vision", ToyVisionConfig, _build_vision, "test-only patch-linear encoder",
    dims=lambda cfg, ctx: PartDims(out_dim=cfg.width, out_tokens=(cfg.image_size // cfg.patch_size) ** 2 + 1))]
SPECS_LLM = [ComponentSpec(
    "toy_llm", ToyLLMConfig, build_toy_llm, "test-only byte-level Llama",
    dims=lambda cfg, ctx: PartDims(out_dim=cfg.hidden_size))]


class ToyPlugin:
    """The toy components as a plugin object (registered by the ``plugin_host`` fixture)."""

    @hookimpl
    def mllmkit_register_vision_encoders(self) -> list[ComponentSpec]:
        return SPECS_VISION

    @hookimpl
    def mllmkit_register_llms(self) -> list[ComponentSpec]:
        return SPECS_LLM


TOY_MODEL_TOML = """
[model.vision]
type = "toy_vision"

[[model.bridges]]
type = "linear"

[model.llm]
type = "toy_llm"
"""
"""The ``[model]`` tables of a recipe file assembling ``toy_vision → linear → toy_llm``; append the rest."""

TOY_RECIPE: dict = {
    "model": {
        "vision": {"type": "toy_vision"},
        "bridges": [{"type": "linear"}],
        "llm": {"type": "toy_llm"},
    },
}
