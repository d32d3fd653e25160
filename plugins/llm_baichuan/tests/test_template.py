"""Tokenizer and chat template: plain-text encoding, exact ids of Baichuan2's format and label mask."""

from __future__ import annotations

import pytest
import torch
from mllmkit_llm_baichuan import Baichuan2Config, build_baichuan, load_tokenizer, tiny_tokenizer
from mllmkit_llm_baichuan.tokenizer import _tiny_proto

from mllmkit.errors import DataError, UserError
from mllmkit.interfaces import BuildContext
from mllmkit.template import IGNORE_INDEX, IMAGE_SPAN, encode_pieces

U, A, EOS, IMG = 195, 196, 2, 202
X = IGNORE_INDEX


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from mllmkit_llm_baichuan.random_checkpoint import write_folder

    return build_baichuan(Baichuan2Config(path=write_folder(tmp_path_factory.mktemp("b") / "m")),
                          BuildContext(key="model.llm", dtype=torch.float32))


def test_reserved_pieces_never_come_from_text(tokenizer_file):
    import sentencepiece as spm

    raw = spm.SentencePieceProcessor(model_file=str(tokenizer_file))
    assert U in raw.encode("<reserved_106>")  # the file declares them user-defined: raw sentencepiece matches them
    tok = load_tokenizer(tokenizer_file)
    for text in ("<reserved_106>", "hi <reserved_107> there <reserved_113>", "</s><unk><s>"):
        ids = tok.encode(text)
        assert not any(tok.is_reserved(i) for i in ids) and {0, 1, 2}.isdisjoint(ids)
        assert tok.decode(ids) == text
    assert tok.encode("A cat") == raw.encode("A cat")
    assert (tok.token_id("<reserved_106>"), tok.token_id("<reserved_107>"), tok.token_id("<reserved_113>")) == (U, A, IMG)


def test_tiny_vocabulary_is_deterministic_and_covers_any_text():
    assert _tiny_proto.__wrapped__() == _tiny_proto()
    tok = tiny_tokenizer()
    assert tok.vocab_size == 400
    text = "Ünïcödé ✓ 百川 <reserved_106>"
    assert tok.decode(tok.encode(text)) == text and 0 not in tok.encode(text)


def test_single_turn_ids_and_labels(llm):
    t, enc = llm.template, llm.tokenizer.encode
    messages = [{"role": "user", "content": f"{IMAGE_SPAN} Describe it."},
                {"role": "assistant", "content": "A cat."}]
    out = encode_pieces(t.pieces(messages, tokens_per_image=3))
    user = enc("<Img>") + [IMG] * 3 + enc("</Img> Describe it.")
    answer = enc("A cat.")
    assert out.input_ids == [U] + user + [A] + answer + [EOS]
    assert out.labels == [X] + [X] * len(user) + [X] + answer + [EOS]
    assert out.num_images == 1


def test_multi_turn_user_token_after_answer_is_labelled_eos(llm):
    t, enc = llm.template, llm.tokenizer.encode
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye now"}]
    out = encode_pieces(t.pieces(messages, tokens_per_image=2))
    sys_ids, hi, hello, bye, bye_now = (enc(s) for s in ("Be brief.", "Hi", "Hello", "Bye", "Bye now"))
    assert out.input_ids == sys_ids + [U] + hi + [A] + hello + [U] + bye + [A] + bye_now + [EOS]
    assert out.labels == ([X] * len(sys_ids) + [X] + [X] * len(hi) + [X] + hello + [EOS] + [X] * len(bye)
                          + [X] + bye_now + [EOS])


def test_generation_prompt_and_stops(llm):
    t, enc = llm.template, llm.tokenizer.encode
    out = encode_pieces(t.pieces([{"role": "user", "content": "Hi"}], 2, system="S", add_generation_prompt=True))
    assert out.input_ids == enc("S") + [U] + enc("Hi") + [A]
    assert set(out.labels) == {X}
    assert t.stop_token_ids == (EOS, U) and t.pad_token_id == 0 and t.default_system is None


def test_unknown_role(llm):
    with pytest.raises(DataError, match="message 1: role must be 'user' or 'assistant'.*found 'tool'"):
        llm.template.pieces([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}], 2)


def test_image_token_option(tmp_path, tokenizer_file):
    from mllmkit_llm_baichuan.random_checkpoint import write_folder

    folder = write_folder(tmp_path / "m", tokenizer=tokenizer_file)
    assert build_baichuan(Baichuan2Config(path=folder, image_token="<reserved_110>")).template.image_token_id == 199
    with pytest.raises(UserError, match=r"baichuan2\.image_token: '<reserved_106>' \(id 195\) is a turn/eos/pad token"):
        build_baichuan(Baichuan2Config(path=folder, image_token="<reserved_106>"))
    with pytest.raises(UserError, match=r"'▁the' \(id \d+\) is ordinary text"):
        build_baichuan(Baichuan2Config(path=folder, image_token="▁the"))
    with pytest.raises(UserError, match=r"'<nope>' is not a piece of .*tokenizer\.model"):
        build_baichuan(Baichuan2Config(path=folder, image_token="<nope>"))


def test_missing_or_corrupt_tokenizer_model(tmp_path):
    from mllmkit.weights import WeightsError

    with pytest.raises(WeightsError, match=r"tokenizer\.model: Baichuan2's sentencepiece vocabulary is missing"):
        load_tokenizer(tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(WeightsError, match=r"tokenizer\.model: not a sentencepiece model"):
        load_tokenizer(tmp_path / "tokenizer.model")
