"""Qwen tokenizers: the v1 tiktoken vocabulary (``qwen.tiktoken``), ``qwen_tiny``'s built-in one,
and Qwen2/2.5 ``tokenizer.json`` folders through the ``tokenizers`` library.

All of them satisfy :class:`mllmkit.interfaces.Tokenizer`: ``encode(text)`` treats every
special-token string (``<|im_end|>``, ``<|extra_0|>``, …) as plain text, so user text can never
inject control or image tokens; special ids are only placed by the chat template. Qwen v1 text is
NFC-normalised before encoding, as Qwen's own tokenizer does.

Qwen v1 ids: the BPE ranks 0..151642 from ``qwen.tiktoken``, then ``<|endoftext|>`` 151643,
``<|im_start|>`` 151644, ``<|im_end|>`` 151645, ``<|extra_0|>``..``<|extra_204|>`` 151646..151850
(the first-release tokenizer named the extras differently but used the same ids; only the three
ChatML ids and ``<|extra_0|>`` are used here). ``qwen_tiny`` uses the same special scheme placed
right after its own base ranks.
"""

from __future__ import annotations

import base64
import binascii
import collections
import functools
import itertools
import pathlib
import re
import unicodedata
from collections.abc import Sequence

from mllmkit.weights import WeightsError

__all__ = [
    "ENDOFTEXT",
    "IM_END",
    "IM_START",
    "QWEN_PATTERN",
    "SPECIAL_TOKENS",
    "QwenTokenizer",
    "TokenizersTokenizer",
    "qwen_v1_tokenizer",
    "read_tiktoken_ranks",
    "tiny_ranks",
    "tiny_tokenizer",
]

QWEN_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS: tuple[str, ...] = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))


def read_tiktoken_ranks(path: str | pathlib.Path) -> dict[bytes, int]:
    """Parse a ``.tiktoken`` file (``base64-token rank`` per line) without tiktoken's download cache."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise WeightsError(f"tokenizer file not found: {path} (a Qwen v1 folder has qwen.tiktoken next to config.json)")
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise WeightsError(f"{path}:{number}: expected 'base64-token rank', found {line[:60]!r}") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise WeightsError(f"{path}: ranks are not exactly 0..{len(ranks) - 1} (duplicated or missing ranks)")
    return ranks


class QwenTokenizer:
    """A tiktoken Encoding with Qwen's pre-tokenizer pattern and special tokens after the base ranks."""

    def __init__(self, ranks: dict[bytes, int], name: str = "qwen", special_base: int | None = None) -> None:
        """``special_base``: id of ``<|endoftext|>`` (default: right after the ranks)."""
        import tiktoken

        base = len(ranks) if special_base is None else special_base
        self.special_ids: dict[str, int] = {tok: base + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self._enc = tiktoken.Encoding(name, pat_str=QWEN_PATTERN, mergeable_ranks=ranks,
                                      special_tokens=self.special_ids)
        self.vocab_size: int = self._enc.n_vocab
        self._known = frozenset(ranks.values()) | frozenset(self.special_ids.values())
        self.name = name

    def encode(self, text: str) -> list[int]:
        """Plain-text ids: special-token strings in ``text`` are encoded as ordinary text."""
        return self._enc.encode(unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special ids render as their names; ids the vocabulary does not hold (the model's
        padded embedding rows past it, the gaps of a stand-in vocabulary) are dropped."""
        return self._enc.decode([int(i) for i in ids if int(i) in self._known], errors="replace")

    def token_id(self, token: str) -> int:
        if token not in self.special_ids:
            raise KeyError(f"{token!r} is not a special token of the {self.name} vocabulary")
        return self.special_ids[token]


class TokenizersTokenizer:
    """A Qwen2/2.5 ``tokenizer.json`` (``tokenizers`` library) with special strings encoded as text."""

    def __init__(self, path: str | pathlib.Path) -> None:
        from tokenizers import Tokenizer

        path = pathlib.Path(path)
        if not path.is_file():
            raise WeightsError(f"tokenizer file not found: {path} (a Qwen2 folder has tokenizer.json)")
        self._tok = Tokenizer.from_file(str(path))
        self._tok.encode_special_tokens = True  # "<|im_end|>" typed by a user stays plain text
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.path = path

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_id(self, token: str) -> int:
        token_id = self._tok.token_to_id(token)
        if token_id is None:
            raise KeyError(f"{token!r} is not in {self.path}")
        return token_id

    def has_token(self, token: str) -> bool:
        return self._tok.token_to_id(token) is not None


def qwen_v1_tokenizer(path: str | pathlib.Path) -> QwenTokenizer:
    """The Qwen v1 tokenizer from a ``qwen.tiktoken`` file."""
    return QwenTokenizer(read_tiktoken_ranks(path), name="qwen")


# -- qwen_tiny: a vocabulary built from constants, no files --

TINY_TEXT = """\
The picture shows a red circle on a white background. The circle is in the center of the image.
There is a blue square in the top left corner and a green triangle in the bottom right corner.
What shape is in the image? The shape in the image is a circle. What color is the square? The
square is blue. How many shapes are there? There are three shapes: a circle, a square and a
triangle. Describe the image. The image shows a small yellow star above a large black rectangle.
Is the triangle red or green? The triangle is green. Where is the star? The star is at the top
of the picture, near the middle. You are a helpful assistant. Please answer the question about the
image in one short sentence. The answer is yes. The answer is no. This is a photo of a cat sitting
on a chair next to a window, and the light comes from the left side of the room.
system user assistant system user assistant system user assistant <Img></Img> <Img></Img>
"""
"""Fixed English text the tiny BPE merges are learned from (deterministically)."""

TINY_MERGES = 256


@functools.cache
def tiny_ranks(num_merges: int = TINY_MERGES) -> dict[bytes, int]:
    """The 256 single bytes, then ``num_merges`` BPE merges learned from :data:`TINY_TEXT`.

    Merges are learned inside pre-tokenizer chunks (ASCII text: words with their leading space,
    punctuation runs, single digits, whitespace), most frequent pair first, ties broken by the
    pair's bytes, so the result never changes.
    """
    ranks = {bytes([b]): b for b in range(256)}
    chunks = collections.Counter(re.findall(r" ?[A-Za-z]+| ?[^\sA-Za-z0-9]+|[0-9]|\s+", TINY_TEXT))
    words = {tuple(bytes([b]) for b in chunk.encode()): count for chunk, count in chunks.items()}
    for _ in range(num_merges):
        pairs: collections.Counter[tuple[bytes, bytes]] = collections.Counter()
        for word, count in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merged = best[0] + best[1]
        ranks.setdefault(merged, len(ranks))
        new_words = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + count
        words = new_words
    return ranks


@functools.cache
def tiny_tokenizer() -> QwenTokenizer:
    """``qwen_tiny``'s tokenizer: :func:`tiny_ranks` + Qwen's special tokens right after them."""
    return QwenTokenizer(dict(tiny_ranks()), name="qwen_tiny")
