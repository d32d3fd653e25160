"""ChatSession on the toy model: prompts, greedy/beam/sampling, stop tokens, streaming, image cache, window."""

from __future__ import annotations

import pytest
import torch

from mllmkit.chat import ChatSession, GenerationSettings, chat_session
from mllmkit.chat.streaming import IncrementalDecoder
from mllmkit.errors import UserError

USER, ASSISTANT, END, IMAGE = 257, 258, 259, 260  # ByteTokenizer special ids
TOKENS_PER_IMAGE = 5  # toy_vision: (16 // 8) ** 2 + 1


@pytest.fixture
def session(plugin_host, toy_recipe):
    torch.manual_seed(0)
    return chat_session(toy_recipe, device="cpu", precision="fp32", max_new_tokens=12)


def prompt_ids(*turns: tuple[str, int, str | None]) -> list[int]:
    """The toy template written out: <user> [<Img> image </Img>]* text <end> <assistant> answer <end> ..."""
    ids: list[int] = []
    for text, n_images, answer in turns:
        ids += [USER]
        for _ in range(n_images):
            ids += list(b"<Img>") + [IMAGE] * TOKENS_PER_IMAGE + list(b"</Img>")
        ids += list(text.encode()) + [END, ASSISTANT]
        if answer is not None:
            ids += list(answer.encode("utf-8")) + [END]
    return ids


def greedy_reference(model, ids: list[int], steps: int, image_embeds=None) -> list[int]:
    """Greedy decoding written out: full forward each step, argmax, no stopping."""
    hf = model.llm.hf_model
    embeds = hf.get_input_embeddings()(torch.tensor([ids]))
    if image_embeds is not None:
        mask = torch.tensor([ids]) == IMAGE
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), image_embeds.reshape(-1, embeds.shape[-1]))
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(hf(inputs_embeds=embeds).logits[0, -1].argmax())
            out.append(token)
            embeds = torch.cat([embeds, hf.get_input_embeddings()(torch.tensor([[token]]))], dim=1)
    return out


def decode_until_end(ids: list[int]) -> str:
    cut = ids.index(END) if END in ids else len(ids)
    return bytes(ids[:cut]).decode("utf-8", errors="replace")


def test_greedy_answer_matches_written_out_greedy_and_is_deterministic(session):
    answer = session.ask("hello")
    assert session.last_prompt_ids == prompt_ids(("hello", 0, None))
    assert answer == decode_until_end(greedy_reference(session.model, prompt_ids(("hello", 0, None)), 12))
    assert ChatSession.like(session).ask("hello") == answer
    # the second turn's prompt holds the first exchange as text
    session.ask("again")
    assert session.last_prompt_ids == prompt_ids(("hello", 0, answer), ("again", 0, None))
    assert session.history == [("hello", answer), ("again", session.turns[1].answer)]


def test_history_keeps_the_answer_stripped_as_qwen_chat_does(session):
    """Qwen's chat strips the decoded answer before it enters the history: the next prompt holds it so."""
    hf = session.model.llm.hf_model
    head = torch.nn.Linear(hf.lm_head.in_features, hf.lm_head.out_features, bias=True)
    with torch.no_grad():  # logits: ' ' 1.0, 'x' 0.9, the rest -1e4; penalty 1.2 -> ' ', 'x', then ' ' again
        head.weight.zero_()
        head.bias.fill_(-1e4)
        head.bias[ord(" ")], head.bias[ord("x")] = 1.0, 0.9
    hf.lm_head = head
    session.settings = GenerationSettings(max_new_tokens=6, repetition_penalty=1.2)
    assert "".join(session.stream("hello")) == " x    "  # what was generated, streamed as is
    assert session.history == [("hello", "x")]
    assert session.ask("again") == "x"
    assert session.last_prompt_ids == prompt_ids(("hello", 0, "x"), ("again", 0, None))


def test_image_prompt_and_answer_use_the_image_embeddings(session, tiny_image):
    answer = session.ask("what?", images=[tiny_image])
    ids = prompt_ids(("what?", 1, None))
    assert session.last_prompt_ids == ids
    with torch.no_grad():
        pixels = session.model.vision.image_transform(False)(__import__("PIL.Image").Image.open(tiny_image).convert("RGB"))
        embeds = session.model.encode_images(pixels.unsqueeze(0))
    assert torch.allclose(session.images[0].embeds, embeds[0])
    assert answer == decode_until_end(greedy_reference(session.model, ids, 12, image_embeds=embeds))
    assert answer != ChatSession.like(session).ask("what?")  # the image changes the answer


def test_stop_token_ends_the_answer(session):
    ids = prompt_ids(("stop", 0, None))
    free = greedy_reference(session.model, ids, 12)
    head = session.model.llm.hf_model.lm_head.weight
    with torch.no_grad():  # make <end> beat the 3rd greedy token wherever that token would win
        head[END] = head[free[2]] * 1.5
    forced = greedy_reference(session.model, ids, 12)
    assert END in forced and forced.index(END) <= 2
    answer = session.ask("stop")
    assert answer == decode_until_end(forced)
    assert len(answer.encode("utf-8", errors="replace")) <= forced.index(END) * 3
    assert "".join(ChatSession.like(session).stream("stop")) == answer


def test_generate_with_inputs_embeds_returns_only_new_tokens_greedy_and_beam(session):
    ids = prompt_ids(("shape", 0, None))
    embeds = session.model.embed(torch.tensor([ids]))
    mask = torch.ones(1, len(ids), dtype=torch.long)
    session.settings = GenerationSettings(max_new_tokens=6)
    greedy = session.llm.hf_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                           generation_config=session._generation_config(6))
    reference = greedy_reference(session.model, ids, 6)
    n = reference.index(END) + 1 if END in reference else 6
    assert tuple(greedy.shape) == (1, n)
    assert greedy[0].tolist() == reference[:n]
    session.settings = GenerationSettings(max_new_tokens=6, num_beams=3)
    beam = session.llm.hf_model.generate(inputs_embeds=embeds, attention_mask=mask,
                                         generation_config=session._generation_config(6))
    assert beam.shape[0] == 1 and 1 <= beam.shape[1] <= 6
    # a beam answer is a string, also when streamed (in one piece)
    beam_answer = ChatSession.like(session).ask("shape")
    assert list(ChatSession.like(session).stream("shape")) == [beam_answer]


def test_sampling_settings_reach_generate(session):
    greedy = ChatSession.like(session).ask("sample me")
    session.settings = GenerationSettings(max_new_tokens=12, do_sample=True, top_k=1, seed=3)
    assert session.ask("sample me") == greedy  # top-k 1 sampling is greedy
    hot = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=2.0, seed=5)
    answers = set()
    for seed in (5, 5, 6, 7, 8):
        s = ChatSession.like(session)
        s.settings = hot.with_value("seed", str(seed))
        answers.add((seed, s.ask("sample me")))
    by_seed = {}
    for seed, answer in answers:
        by_seed.setdefault(seed, set()).add(answer)
    assert len(by_seed[5]) == 1  # a fixed seed repeats the answer
    assert len({a for a in by_seed.values() for a in a}) > 1  # different seeds sample differently


def test_streaming_yields_the_same_text_as_ask(session, tiny_image):
    other = ChatSession.like(session)
    pieces = list(session.stream("stream this", images=[tiny_image]))
    assert len(pieces) > 1
    assert "".join(pieces) == other.ask("stream this", images=[tiny_image])
    assert session.history == other.history


def test_incremental_decoder_holds_back_partial_utf8():
    text = "héllo € 中文"
    decoder = IncrementalDecoder(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = [decoder.push([b]) for b in text.encode("utf-8")]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert pieces[1] == "" and pieces[2] == "é"  # the 2-byte é appears only when complete


def test_incremental_decoder_streams_bytes_that_never_form_characters():
    """A lone lead byte repeated (what a random model emits) is invalid once the next one arrives: each
    token's replacement character goes out one token later, not all at the end."""
    decoder = IncrementalDecoder(lambda ids: bytes(ids).decode("utf-8", errors="replace"))
    pieces = [decoder.push([0xE4]) for _ in range(4)]
    assert pieces == ["", "\ufffd", "\ufffd", "\ufffd"]
    assert decoder.push([0xB8]) == "" and decoder.push([0xAD]) == "中"  # the last one's sequence completes
    assert decoder.flush() == ""


def test_images_are_encoded_once_per_session(session, tiny_image, monkeypatch):
    calls = []
    original = session.model.encode_images
    monkeypatch.setattr(session.model, "encode_images", lambda pixels: calls.append(pixels.shape) or original(pixels))
    session.ask("first", images=[tiny_image])
    session.ask("second")
    session.ask("third")
    assert len(calls) == 1
    session.add_image(tiny_image)  # mid-chat: goes into the next turn
    session.ask("fourth")
    assert len(calls) == 2
    assert session.turns[3].user == "<Img><ImageHere></Img>fourth" and session.turns[3].images == [1]
    assert session.last_prompt_ids.count(IMAGE) == 2 * TOKENS_PER_IMAGE
    # clearing the history keeps the images: both go into the next question, without re-encoding
    session.clear_history()
    session.ask("fifth")
    assert session.turns[0].user == "<Img><ImageHere></Img><Img><ImageHere></Img>fifth"
    assert len(calls) == 2


def test_window_counts_image_tokens_and_drops_oldest_turns_whole(session, tiny_image):
    session.settings = GenerationSettings(max_new_tokens=4)
    a1 = session.ask("one", images=[tiny_image])
    a2 = session.ask("two")
    full = prompt_ids(("one", 1, a1), ("two", 0, a2), ("three", 0, None))
    without_first = prompt_ids(("two", 0, a2), ("three", 0, None))
    # the window fits the text of all three turns, but not the image's 5 placeholder tokens too
    text_only = len(full) - TOKENS_PER_IMAGE
    assert len(without_first) <= text_only < len(full)
    session.max_window_tokens = text_only
    session.ask("three")
    assert session.last_dropped_turns == 1
    assert session.last_prompt_ids == without_first
    assert IMAGE not in session.last_prompt_ids
    session.max_window_tokens = len(full)
    session.turns.pop()
    session.ask("three")
    assert session.last_dropped_turns == 0 and session.last_prompt_ids == full


def test_question_longer_than_the_window_is_refused(session, tiny_image):
    session.max_window_tokens = 20
    with pytest.raises(UserError) as err:
        session.ask("x" * 5, images=[tiny_image])
    assert str(err.value) == ("the question and its 1 image(s) need 24 tokens, more than the history window of "
                              "20 tokens (max_window_tokens; image tokens count); ask a shorter question or "
                              "raise chat.max_window_tokens")


def test_markers_in_the_question_place_the_images(session, tiny_image):
    session.settings = GenerationSettings(max_new_tokens=2)
    session.ask("look <ImageHere> here", images=[tiny_image])
    assert session.turns[0].user == "look <ImageHere> here"
    with pytest.raises(UserError, match="has 2 <ImageHere> marker"):
        session.ask("<ImageHere><ImageHere>", images=[tiny_image])


def test_settings_are_type_checked():
    settings = GenerationSettings()
    assert settings.with_value("top_k", "5").top_k == 5
    assert settings.with_value("do_sample", "true").do_sample is True
    assert settings.with_value("seed", "none").seed is None
    for name, value, message in [
        ("top_k", "abc", "top_k: expected int, found 'abc'"),
        ("top_p", "2", "top_p: expected a value in [0.0, 1.0], found 2.0"),
        ("do_sample", "maybe", "do_sample: expected bool, found 'maybe'"),
        ("max_new_tokens", "0", "max_new_tokens: expected a value > 0, found 0"),
        ("nope", "1", ("unknown setting 'nope'; settings: max_new_tokens, do_sample, temperature, top_k, top_p, "
                      "repetition_penalty, num_beams, seed, compile_decode")),
    ]:
        with pytest.raises(UserError) as err:
            settings.with_value(name, value)
        assert str(err.value) == message


def test_unreadable_images_are_user_errors(session, tmp_path):
    with pytest.raises(UserError) as err:
        session.add_image(tmp_path / "missing.png")
    assert str(err.value) == f"image not found: {tmp_path / 'missing.png'}"
    bad = tmp_path / "bad.png"
    bad.write_text("not a png")
    with pytest.raises(UserError, match=r"cannot read image .*bad.png"):
        session.add_image(bad)
    assert session.images == []


def test_bf16_on_cpu(plugin_host, toy_recipe, tiny_image):
    torch.manual_seed(0)
    session = chat_session(toy_recipe, device="cpu", precision="bf16", max_new_tokens=4)
    assert session.model.llm.hf_model.dtype == torch.bfloat16
    assert isinstance(session.ask("hi", images=[tiny_image]), str)
