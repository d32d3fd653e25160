"""ChatSession on qwen_tiny (plugins/llm_qwen): the ChatML prompt, both stop tokens, streaming."""

from __future__ import annotations

import pytest
import torch

from mllmkit.chat import ChatSession, chat_session
from mllmkit.chat.session import Turn

pytest.importorskip("mllmkit_llm_qwen", reason="plugins/llm_qwen is not installed")

RECIPE = {
    "model": {"vision": {"type": "toy_vision"}, "bridges": [{"type": "linear"}],
              "llm": {"type": "qwen", "preset": "qwen_tiny", "precision": "fp32"}},
}


@pytest.fixture
def session(plugin_host):
    torch.manual_seed(0)
    return chat_session(RECIPE, device="cpu", precision="fp32", max_new_tokens=6)


def test_chatml_prompt_with_image_and_history(session, tiny_image):
    t, enc = session.template, session.tokenizer.encode
    answer = session.ask("hi", images=[tiny_image])
    session.ask("more")
    nl = enc("\n")
    image = [t.image_token_id] * session.model.tokens_per_image

    def block(role, content_ids):
        return [t.im_start_id, *enc(role), *nl, *content_ids, t.im_end_id, *nl]

    expected = (block("system", enc("You are a helpful assistant."))
                + block("user", enc("<Img>") + image + enc("</Img>") + enc("hi"))
                + block("assistant", enc(answer) if answer else [])
                + block("user", enc("more")) + [t.im_start_id, *enc("assistant"), *nl])
    assert session.last_prompt_ids == expected


def test_both_chatml_stop_tokens_end_the_answer(session):
    t = session.template
    assert set(t.stop_token_ids) == {t.im_end_id, t.im_start_id}
    hf = session.llm.hf_model
    ids = session._encode([Turn(user="x", images=[])])
    embeds = session.model.embed(torch.tensor([ids]))
    with torch.no_grad():
        logits = hf(inputs_embeds=embeds).logits[0, -1]
    first = int(logits.argmax())
    assert logits[first] > 0 and first not in t.stop_token_ids
    assert ChatSession.like(session).ask("x") != ""
    for stop in t.stop_token_ids:
        saved = hf.lm_head.weight[stop].clone()
        with torch.no_grad():
            hf.lm_head.weight[stop] = hf.lm_head.weight[first] * 1.5  # the stop token now beats the first token
        try:
            assert ChatSession.like(session).ask("x") == ""
        finally:
            with torch.no_grad():
                hf.lm_head.weight[stop] = saved


def test_streaming_equals_ask(session, tiny_image):
    other = ChatSession.like(session)
    assert "".join(session.stream("hello", images=[tiny_image])) == other.ask("hello", images=[tiny_image])
