"""``mllmkit serve`` through the official ``openai`` client against a live server on loopback (toy model, CPU).

Answers are checked against :class:`~mllmkit.chat.session.ChatSession` asking the same question
alone (greedy, batch-1 decoder), the server's batches against requests made one at a time.
"""

from __future__ import annotations

import base64
import io
import threading
import time

import httpx
import openai
import pytest
import torch
from PIL import Image

from mllmkit.chat import ChatSession, GenerationSettings
from mllmkit.chat.loading import load_chat_model
from mllmkit.serve.engine import Engine
from mllmkit.testing.serve import running_server

SETTINGS = GenerationSettings(max_new_tokens=12)


@pytest.fixture
def model(plugin_host, toy_recipe):
    torch.manual_seed(0)
    return load_chat_model(toy_recipe, device="cpu", precision="fp32")[0]


def client(base_url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)


def png(colour: tuple[int, int, int], size: int = 20) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def user(text: str, *images: bytes) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def alone(model, text: str, *images: bytes) -> tuple[str, list[int]]:
    """The chat session's answer to the same question and its prompt ids."""
    session = ChatSession(model, settings=SETTINGS)
    answer = session.ask(text, images=[Image.open(io.BytesIO(i)) for i in images])
    return answer, session.last_prompt_ids


def test_plain_request_answers_as_the_chat_session_does(model):
    expected, prompt = alone(model, "hello")
    with running_server(Engine(model, settings=SETTINGS)) as url:
        api = client(url)
        assert [m.id for m in api.models.list().data] == ["toy"]
        reply = api.chat.completions.create(model="toy", messages=[{"role": "user", "content": "hello"}])
    assert reply.object == "chat.completion" and reply.model == "toy"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content.strip() == expected  # the chat keeps answers stripped
    assert reply.choices[0].finish_reason == "length"  # 12 tokens, no stop token on this toy prompt
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), 12)
    assert reply.usage.total_tokens == len(prompt) + 12


def test_history_and_system_prompt_go_into_the_prompt(model):
    session = ChatSession(model, settings=SETTINGS)
    first = session.ask("hi")
    expected = session.ask("and then?")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": first},
                {"role": "user", "content": "and then?"}]
    with running_server(Engine(model, settings=SETTINGS)) as url:
        reply = client(url).chat.completions.create(model="toy", messages=messages)
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.prompt_tokens == len(session.last_prompt_ids)


def test_streaming_sends_the_answer_in_chunks_then_done(model):
    expected, prompt = alone(model, "stream me")
    streamed = "".join(ChatSession(model, settings=SETTINGS).stream("stream me"))  # the chat's own streaming
    with running_server(Engine(model, settings=SETTINGS)) as url:
        whole = client(url).chat.completions.create(model="toy", messages=[{"role": "user", "content": "stream me"}])
        chunks = list(client(url).chat.completions.create(
            model="toy", messages=[{"role": "user", "content": "stream me"}], stream=True,
            stream_options={"include_usage": True}))
        raw = httpx.post(f"{url}/chat/completions", json={"model": "toy", "stream": True,
                                                           "messages": [{"role": "user", "content": "stream me"}]})
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == streamed and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert whole.choices[0].message.content.strip() == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert whole.usage.prompt_tokens == len(prompt)
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = [line for line in raw.text.split("\n\n") if line]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


def test_image_request_uses_the_image(model):
    picture = png((200, 30, 30))
    expected, prompt = alone(model, "what?", picture)
    with running_server(Engine(model, settings=SETTINGS)) as url:
        reply = client(url).chat.completions.create(model="toy", messages=user("what?", picture))
    assert reply.choices[0].message.content.strip() == expected
    assert reply.usage.prompt_tokens == len(prompt)
    assert expected != alone(model, "what?")[0]  # the image changes the answer


def test_bad_image_is_a_400_and_the_server_goes_on(model):
    with running_server(Engine(model, settings=SETTINGS)) as url:
        api = client(url)
        bad = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(b"no").decode()}},
            {"type": "text", "text": "what?"}]}]
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model="toy", messages=bad)
        assert caught.value.status_code == 400
        assert caught.value.body["param"] == "messages[0].content[0].image_url.url"
        assert caught.value.body["message"].startswith("messages[0].content[0].image_url.url: not a readable image")
        assert api.chat.completions.create(model="toy", messages=user("hello")).choices[0].message.content


def test_api_key_is_required_when_set(model):
    with running_server(Engine(model, settings=SETTINGS), api_key="s3cret") as url:
        with pytest.raises(openai.AuthenticationError) as caught:
            client(url, key="wrong").chat.completions.create(model="toy", messages=user("hi"))
        assert caught.value.status_code == 401 and caught.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(url, key="wrong").models.list()
        assert httpx.get(f"{url}/models").status_code == 401  # no header at all
        assert client(url, key="s3cret").chat.completions.create(model="toy", messages=user("hi")).choices


@pytest.mark.slow
def test_sixteen_concurrent_clients_get_their_own_answers(model):
    colours = [(16 * i, 255 - 16 * i, (90 * i) % 256) for i in range(16)]
    requests = [(f"question {i}: {'x' * i}", png(colour)) for i, colour in enumerate(colours)]
    expected = [alone(model, text, picture)[0] for text, picture in requests]
    assert len(set(expected)) > 8  # the answers differ, so a mix-up would show
    engine = Engine(model, settings=SETTINGS, max_batch=8, max_queue=16)
    answers: list[str | None] = [None] * 16

    def ask(i: int) -> None:
        text, picture = requests[i]
        reply = client(url).chat.completions.create(model="toy", messages=user(text, picture))
        answers[i] = reply.choices[0].message.content

    with running_server(engine, start_engine=False) as url:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        while engine.waiting < 16:  # every request queued before decoding starts: batches of 8
            time.sleep(0.01)
        engine.start()
        for thread in threads:
            thread.join()
    assert [answer.strip() for answer in answers] == expected
    assert engine.batch_sizes == {8: 2}


def test_full_queue_is_a_429_with_a_message_and_queued_requests_are_answered(model):
    engine = Engine(model, settings=SETTINGS, max_batch=1, max_queue=2)
    answers: list[str] = []
    with running_server(engine, start_engine=False) as url:
        threads = [threading.Thread(target=lambda t=t: answers.append(client(url).chat.completions.create(
            model="toy", messages=user(t)).choices[0].message.content)) for t in ("one", "two")]
        for thread in threads:
            thread.start()
        while engine.waiting < 2:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError) as caught:
            client(url).chat.completions.create(model="toy", messages=user("three"))
        assert caught.value.status_code == 429
        assert caught.value.body["message"] == ("the server is busy: 2 requests are already waiting (--max-queue); "
                                                "retry later")
        engine.start()
        for thread in threads:
            thread.join()
        assert sorted(answer.strip() for answer in answers) == sorted([alone(model, "one")[0], alone(model, "two")[0]])
        assert client(url).chat.completions.create(model="toy", messages=user("three")).choices


def test_stop_strings_seed_and_sampling(model):
    with running_server(Engine(model, settings=SETTINGS, max_batch=4)) as url:
        api = client(url)
        full = api.chat.completions.create(model="toy", messages=user("hello")).choices[0].message.content
        assert full.strip() == alone(model, "hello")[0]
        stop = full[3:5]
        cut = api.chat.completions.create(model="toy", messages=user("hello"), stop=[stop, "zzzz"])
        assert cut.choices[0].message.content == full[:full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"
        streamed = "".join(c.choices[0].delta.content or "" for c in api.chat.completions.create(
            model="toy", messages=user("hello"), stop=stop, stream=True) if c.choices)
        assert streamed == full[:full.index(stop)]
        assert api.chat.completions.create(model="toy", messages=user("hello"), temperature=0).choices[0] \
            .message.content == full  # temperature 0 is greedy
        sampled = [api.chat.completions.create(model="toy", messages=user("hello"), temperature=1.5, seed=seed,
                                               max_tokens=5) for seed in (1, 1, 2)]
        texts = [s.choices[0].message.content for s in sampled]
        assert texts[0] == texts[1] != texts[2] and sampled[0].usage.completion_tokens == 5
