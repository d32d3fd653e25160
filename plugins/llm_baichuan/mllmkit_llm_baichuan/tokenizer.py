"""Baichuan2's sentencepiece vocabulary (``tokenizer.model``), and a tiny one trained at build time.

Text is always encoded as plain text: reserved pieces that the model file declares as user-defined
(which sentencepiece would otherwise match inside text) are turned into control pieces on load, so
``"<reserved_106>"`` typed by a user never becomes the user-turn id. No bos/eos is added (Baichuan2's
tokenizer has ``add_bos_token = add_eos_token = false``); the chat template adds reserved ids itself.
"""

from __future__ import annotations

import functools
import io
import pathlib
from collections.abc import Sequence

from mllmkit.weights import WeightsError

__all__ = ["TINY_RESERVED", "TINY_TEXT", "SentencePieceTokenizer", "load_tokenizer", "tiny_tokenizer"]

TINY_RESERVED = ("<reserved_106>", "<reserved_107>", "<reserved_113>")
"""Reserved pieces of the tiny vocabulary: user turn, assistant turn, image placeholder."""

TINY_TEXT = """\
Describe this image in detail.
What is in the picture? A cat sits on a red mat near the window.
The quick brown fox jumps over the lazy dog, and the dog does not mind.
Please answer the question about the image briefly.
There are two people walking along the beach at sunset.
请描述这张图片。图片里有一只猫。
你好，我是百川大模型，很高兴为你服务。
"""
"""Text the tiny vocabulary is trained on (byte fallback covers anything else)."""


class SentencePieceTokenizer:
    """Implements :class:`mllmkit.interfaces.Tokenizer` over a sentencepiece model proto."""

    def __init__(self, model_proto: bytes, name: str) -> None:
        import sentencepiece as spm
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(model_proto)
        for piece in proto.pieces:
            if piece.type == pb.ModelProto.SentencePiece.USER_DEFINED:
                piece.type = pb.ModelProto.SentencePiece.CONTROL
        self.name = name
        self.sp = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
        self.vocab_size: int = self.sp.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.vocab_size])

    def token_id(self, piece: str) -> int:
        """The id of a whole piece; KeyError if the vocabulary does not have it."""
        index = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(index) != piece:
            raise KeyError(piece)
        return index

    def is_reserved(self, index: int) -> bool:
        """True for control pieces: ids that encoding text never produces."""
        return bool(self.sp.is_control(index))


def load_tokenizer(path: pathlib.Path) -> SentencePieceTokenizer:
    if not path.is_file():
        raise WeightsError(f"{path}: Baichuan2's sentencepiece vocabulary is missing; copy tokenizer.model "
                           f"from the Baichuan2-7B-Chat download into that folder")
    from google.protobuf.message import DecodeError

    try:
        return SentencePieceTokenizer(path.read_bytes(), name=str(path))
    except (RuntimeError, DecodeError) as exc:
        raise WeightsError(f"{path}: not a sentencepiece model ({exc})") from None


@functools.lru_cache(maxsize=1)
def _tiny_proto() -> bytes:
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_TEXT.splitlines()), model_writer=out, model_type="bpe", vocab_size=400,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, control_symbols=list(TINY_RESERVED), add_dummy_prefix=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, num_threads=1, minloglevel=2)
    return out.getvalue()


def tiny_tokenizer() -> SentencePieceTokenizer:
    """A ~400-piece BPE vocabulary trained from :data:`TINY_TEXT` (deterministic, well under a second)."""
    return SentencePieceTokenizer(_tiny_proto(), name="baichuan2_tiny (built-in vocabulary)")
