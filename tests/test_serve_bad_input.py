"""``mllmkit serve`` refuses bad input with a 4xx and OpenAI's error body, and goes on answering.

One live server (toy model, CPU) takes every bad request of :data:`BAD`; after each, a good request
is still answered. ``<ImageHere>`` written as text stays text: checked against the toy template's
ids written out and decoded independently.
"""

from __future__ import annotations

import base64
import copy
import io
import struct
import zlib

import httpx
import pytest
import torch
from PIL import Image

from mllmkit.chat.loading import load_chat_model
from mllmkit.generation import generate
from mllmkit.generation_settings import GenerationSettings
from mllmkit.serve.engine import Engine
from mllmkit.serve.images import ImageLimits
from mllmkit.testing.serve import running_server
from mllmkit.testing.toy import TOY_RECIPE, ToyPlugin

USER, ASSISTANT, END, IMAGE = 257, 258, 259, 260  # ByteTokenizer special ids
TOKENS_PER_IMAGE = 5


def _png(colour=(10, 200, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (20, 20), colour).save(out, format="PNG")
    return out.getvalue()


def _bomb(side: int = 10000) -> bytes:
    """A real PNG of side × side black pixels: ~100 kB that would inflate to 100 MB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (side + 1)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _body(*parts, **extra) -> dict:
    content = [{"type": "image_url", "image_url": {"url": p}} if p.startswith(("data:", "file:", "http")) else
               {"type": "text", "text": p} for p in parts]
    return {"model": "toy", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from mllmkit.plugins import build_plugin_host, reset_plugin_host

    reset_plugin_host(build_plugin_host(extra_plugins=[("mllmkit-testing", ToyPlugin())]))
    try:
        torch.manual_seed(0)
        model = load_chat_model(copy.deepcopy(TOY_RECIPE), device="cpu", precision="fp32")[0]
    finally:
        reset_plugin_host(None)
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "green.png").write_bytes(_png())
    (allowed.parent / "secret.png").write_bytes(_png())
    engine = Engine(model, settings=GenerationSettings(max_new_tokens=8), max_window_tokens=400)
    with running_server(engine, image_limits=ImageLimits(allow_dir=allowed), max_body_bytes=2 * 1024 * 1024) as url:
        yield url, model, allowed


def _post(url: str, body=None, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/chat/completions", json=body, timeout=60, **kwargs)


BAD = [  # (name, request, status, param, message start)
    ("malformed JSON", dict(content=b'{"model": "toy", "messages": [', headers={"content-type": "application/json"}),
     400, None, "the request body is not valid JSON"),
    ("unknown field", dict(body=_body("hi", frobnicate=1)), 400, "frobnicate",
     "unrecognized request argument supplied: frobnicate"),
    ("unknown part field", dict(body={"model": "toy", "messages": [
        {"role": "user", "content": [{"type": "text", "text": "hi", "colour": "red"}]}]}),
     400, "messages[0].content[0].colour", "unrecognized request argument supplied: messages[0].content[0].colour"),
    ("not an image", dict(body=_body(_url(b"GIF89a, or so it says"), "what?")), 400,
     "messages[0].content[0].image_url.url", "messages[0].content[0].image_url.url: not a readable image"),
    ("decompression bomb", dict(body=_body(_url(_bomb()), "what?")), 400, "messages[0].content[0].image_url.url",
     "messages[0].content[0].image_url.url: the image declares 10000×10000 pixels, more than this server's limit "
     "of 16777216 pixels"),
    ("50 images", dict(body=_body(*[_url(_png())] * 50, "what?")), 400, "messages[0].content",
     "messages[0].content: more than this server's limit of 8 images in one request"),
    ("1 MB prompt", dict(body=_body("x" * 1_000_000)), 400, "messages",
     "the question and its 0 image(s) need 1000003 tokens, more than the history window of 400 tokens"),
    ("body over the limit", dict(body=_body("x" * 3_000_000)), 413, None,
     "the request body is 3000082 bytes, more than this server's limit of 2097152 bytes"),
    ("remote image URL", dict(body=_body("http://example.com/cat.png", "what?")), 400,
     "messages[0].content[0].image_url.url", "messages[0].content[0].image_url.url: only data: URLs"),
    ("file URL outside --allow-dir", dict(body=_body("file:///etc/passwd", "what?")), 400,
     "messages[0].content[0].image_url.url", "messages[0].content[0].image_url.url: /etc/passwd is outside"),
    ("data URL not base64", dict(body=_body("data:image/png,rawbytes", "what?")), 400,
     "messages[0].content[0].image_url.url", "messages[0].content[0].image_url.url: a data URL must be base64"),
    ("unknown model", dict(body={**_body("hi"), "model": "gpt-4o"}), 404, "model",
     "the model 'gpt-4o' does not exist; this server serves 'toy'"),
    ("two choices", dict(body=_body("hi", n=2)), 400, "n", "n: Input should be 1"),
    ("system message after a user one", dict(body={"model": "toy", "messages": [
        {"role": "user", "content": "hi"}, {"role": "system", "content": "be brief"}]}), 400, "messages[1].role",
     "messages[1]: a system message may only come before the first user message"),
    ("ends with an answer", dict(body={"model": "toy", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}), 400, "messages",
     "the last message must be from the user"),
    ("image in an answer", dict(body={"model": "toy", "messages": [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": _url(_png())}}]},
        {"role": "user", "content": "and?"}]}), 400, "messages[1].content",
     "messages[1].content: only user messages may hold images"),
    ("negative max_tokens", dict(body=_body("hi", max_tokens=-3)), 400, "max_tokens",
     "max_tokens: Input should be greater than or equal to 1"),
]


@pytest.mark.parametrize("name, request_kwargs, status, param, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_refused_and_the_server_goes_on(server, name, request_kwargs, status, param, message):
    url, _, _ = server
    response = _post(url, **request_kwargs)
    assert response.status_code == status
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"].startswith(message), error
    assert error["type"] == "invalid_request_error"
    good = _post(url, _body("hi"))
    assert good.status_code == 200 and good.json()["choices"][0]["message"]["content"]


def test_unknown_route_is_an_openai_error(server):
    url, _, _ = server
    response = httpx.get(f"{url}/completions")
    assert response.status_code in (404, 405) and response.json()["error"]["type"] == "invalid_request_error"


def test_file_url_under_the_allowed_folder_is_read(server):
    url, _, allowed = server
    from_file = _post(url, _body((allowed / "green.png").as_uri(), "what?")).json()
    from_data = _post(url, _body(_url(_png()), "what?")).json()
    assert from_file["choices"] == from_data["choices"] and from_file["usage"] == from_data["usage"]
    escaped = _post(url, _body(f"file://{allowed}/../secret.png", "what?"))
    assert escaped.status_code == 400 and "is outside the allowed folder" in escaped.json()["error"]["message"]


def _independent_answer(model, ids: list[int], image: bytes | None = None) -> str:
    """Greedy answer for ids written out by hand: embed, scatter the image rows, decode, cut at <end>."""
    input_ids = torch.tensor([ids])
    with torch.inference_mode():
        embeds = model.llm.embed(input_ids)
        if image is not None:
            pixels = model.vision.image_transform(False)(Image.open(io.BytesIO(image)).convert("RGB"))
            rows = model.encode_images(pixels[None]).reshape(-1, embeds.shape[-1])
            embeds = embeds.masked_scatter((input_ids == IMAGE)[..., None], rows)
    tokens = generate(model.llm, embeds, max_new_tokens=8, stop_token_ids=[END])
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


def test_image_marker_written_as_text_stays_text(server):
    url, model, _ = server
    reply = _post(url, {"model": "toy", "messages": [{"role": "user", "content": "<ImageHere> what"}]}).json()
    ids = [USER, *b"<ImageHere> what", END, ASSISTANT]
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == _independent_answer(model, ids)


def test_image_marker_beside_a_real_image_stays_text(server):
    url, model, _ = server
    picture = _png((250, 250, 0))
    reply = _post(url, _body(_url(picture), "is <ImageHere> an image?")).json()
    ids = [USER, *b"<Img>", *[IMAGE] * TOKENS_PER_IMAGE, *b"</Img>", *b"is <ImageHere> an image?", END, ASSISTANT]
    assert reply["usage"]["prompt_tokens"] == len(ids)
    assert reply["choices"][0]["message"]["content"] == _independent_answer(model, ids, picture)
