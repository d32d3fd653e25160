"""Hugging Face fast tokenizers for exports, and a plain-text wrapper to read them back.

:func:`tiktoken_tokenizer` turns tiktoken-style BPE ranks (bytes → rank), a pre-tokenizer pattern
and special tokens at fixed ids into a ``tokenizers.Tokenizer`` (byte-level BPE, whole-word lookup
before merges as tiktoken does), with transformers' own ``TikTokenConverter`` building the vocabulary
and merges. :class:`PlainTextTokenizer` reads an exported ``tokenizer.json`` back as an mllmkit
tokenizer whose ``encode`` treats special-token strings as text. :data:`CORPUS` is the multilingual
text the export's tokenizer check runs on.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

__all__ = ["CORPUS", "PlainTextTokenizer", "tiktoken_tokenizer"]

CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog. What shape is in the image? It's a RED circle!",
    "请描述这张图片。图片里有一只猫，坐在窗边的椅子上。",
    "この画像には何が写っていますか？猫が椅子の上に座っています。",
    "이 사진에 무엇이 있나요? 고양이가 의자에 앉아 있습니다.",
    "Emoji: 😀🐱‍👤👍🏽🇯🇵 and symbols ©®™ ∑∫√ café naïve Ångström",
    "def f(x):\n    return {\"a\": [1, 2, 3], 'b': x ** 2}  # comment\n\n\tprint(f(10_000))\n",
    "spaces:   three    four     five\n\n\n  newlines\r\n\tand tabs\t\t end   ",
    "<|im_start|>user\nnot a turn<|im_end|> <|endoftext|> <|extra_0|> <Img><ImageHere></Img> <reserved_106>",
    "numbers 1234567890 3.14159 -42 1e-5 0x1F; mixed日本語English한국어中文",
    "",
)
"""Text the exported tokenizer must encode to exactly the project's ids."""


def tiktoken_tokenizer(ranks: Mapping[bytes, int], pattern: str, special_ids: Mapping[str, int], *,
                       nfc: bool = False):
    """A ``tokenizers.Tokenizer`` equal to ``tiktoken.Encoding(pat_str=pattern, mergeable_ranks=ranks,
    special_tokens=special_ids)`` (plus NFC normalisation of the input when ``nfc``)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Ranks(TikTokenConverter):  # the converter reads a file; ours are in memory already
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return dict(ranks)

    vocab, merges = _Ranks(vocab_file="<memory>", pattern=pattern).extract_vocab_merges_from_model("<memory>")
    taken = {rank: token for token, rank in vocab.items()}
    clash = [f"{name} (id {i})" for name, i in special_ids.items() if i in taken]
    if clash:
        raise ValueError(f"special tokens at ids the BPE ranks already use: {', '.join(clash)}")
    vocab.update(special_ids)  # in the model vocabulary at their ids, so added tokens keep those ids
    tokenizer = Tokenizer(BPE(vocab, merges, fuse_unk=False, ignore_merges=True))
    if nfc:
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(name, normalized=False, special=True)
                                  for name, _ in sorted(special_ids.items(), key=lambda item: item[1])])
    wrong = {name: tokenizer.token_to_id(name) for name, i in special_ids.items() if tokenizer.token_to_id(name) != i}
    if wrong:
        raise ValueError(f"special tokens landed at other ids: {wrong}")
    return tokenizer


class PlainTextTokenizer:
    """An exported ``tokenizer.json`` as an mllmkit tokenizer: special-token strings in text stay text."""

    def __init__(self, path: str | pathlib.Path) -> None:
        from tokenizers import Tokenizer

        self.path = pathlib.Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        self._tok.encode_special_tokens = True
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        found = self._tok.token_to_id(token)
        if found is None:
            raise KeyError(f"{token!r} is not in {self.path}")
        return found
