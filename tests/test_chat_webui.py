"""The web UI: gradio_client against the launched app, and a real headless Chromium (Selenium)."""

from __future__ import annotations

import shutil
import socket
import sys
import time

import pytest

from mllmkit.chat import ChatSession, chat_session
from mllmkit.errors import UserError
from mllmkit.testing.toy import letters_only

gradio = pytest.importorskip("gradio", reason="gradio is not installed (pip install 'mllmkit[webui]')")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def base(plugin_host, toy_recipe, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    recipe = {**toy_recipe, "train": {**toy_recipe.get("train", {}), "seed": 0}}  # chat assembles with it
    session = chat_session(recipe, device="cpu", precision="fp32", max_new_tokens=8)
    letters_only(session.model)
    return session


@pytest.fixture
def server(base):
    from mllmkit.chat.webui import launch

    port = free_port()
    app = launch(base, port=port, block=False, max_upload_mb=0.01)
    yield app, f"http://127.0.0.1:{port}/"
    app.close()


def text_of(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(part.get("text", "") for part in content)


def ask(client, text: str, history=()):
    _, chat = client.predict(text, list(history), False, 1, 1.0, 0, 1.0, 8, "", api_name="/respond")
    return chat


def test_binds_to_loopback_by_default(server):
    from mllmkit.cli import build_parser

    app, _ = server
    assert app.server_name == "127.0.0.1"
    assert app.share is False or app.share_url is None
    args = build_parser().parse_args(["webui", "r.toml"])
    assert (args.host, args.share, args.port) == ("127.0.0.1", False, 7860)


def test_text_chat_image_chat_and_isolated_sessions(server, base, tiny_image, tmp_path):
    from gradio_client import Client, handle_file

    _, url = server
    reference_text = ChatSession.like(base)
    text_first, text_second = reference_text.ask("what is it"), reference_text.ask("and then")
    reference_image = ChatSession.like(base)
    image_answer = reference_image.ask("what is it", images=[tiny_image])
    assert image_answer != text_first  # so that the isolation checks below can fail

    a, b = Client(url, verbose=False), Client(url, verbose=False)
    status, gallery, _ = a.predict([handle_file(str(tiny_image))], api_name="/add_images")
    assert status == "image 1 added: tiny.png" and len(gallery) == 1
    chat_a = ask(a, "what is it")
    chat_b = ask(b, "what is it")  # B chats before uploading anything: text-only, and never sees A's image
    assert [m["role"] for m in chat_a] == ["user", "assistant"]
    assert text_of(chat_a[1]) == image_answer
    assert text_of(chat_b[1]) == text_first
    chat_b = ask(b, "and then", chat_b)  # B's history holds only B's turn
    assert text_of(chat_b[3]) == text_second
    chat_a = ask(a, "and then", chat_a)
    assert text_of(chat_a[3]) == reference_image.ask("and then")

    # restart clears A's images and turns
    a.predict(api_name="/restart")
    assert text_of(ask(a, "what is it")[1]) == text_first


def test_uploads_that_are_too_big_or_not_images_get_a_message(server, tmp_path):
    from gradio_client import Client, handle_file
    from PIL import Image

    _, url = server
    big = tmp_path / "big.png"
    Image.effect_noise((200, 200), 64).convert("RGB").save(big)  # ~120 kB > the 0.01 MB limit
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    client = Client(url, verbose=False)
    with pytest.raises(ValueError, match="big.png exceeds the maximum file size of 10485 bytes"):
        client.predict([handle_file(str(big))], api_name="/add_images")  # the server's own upload limit
    status, gallery, _ = client.predict([handle_file(str(text))], api_name="/add_images")
    assert status == "not added: notes.txt: not an image (PNG, JPEG, WebP, … expected)"
    assert gallery == []
    uploads = tmp_path / "gradio"  # GRADIO_TEMP_DIR: nothing refused stays there
    assert not [p for p in uploads.rglob("*") if p.is_file() and p.name in ("big.png", "notes.txt")]
    assert text_of(ask(client, "still works")[1]) != ""


def test_missing_gradio_is_a_clear_error(monkeypatch):
    from mllmkit.chat.webui import require_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(UserError) as err:
        require_gradio()
    assert str(err.value) == "the web UI needs gradio, which is not installed: pip install 'mllmkit[webui]'"


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no browser installed: needs Debian chromium and chromium-driver "
                    "(apt-get install -y chromium chromium-driver)")
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")
    return chromium, driver


@pytest.mark.slow
def test_browser_uploads_an_image_and_sees_the_streamed_answer(server, base, tiny_image, tmp_path):
    chromium, driver_path = _browser()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    _, url = server
    expected = ChatSession.like(base).ask("describe the picture", images=[tiny_image])
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'chromium-profile'}",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        wait = WebDriverWait(driver, 60)
        driver.get(url)
        upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#images input[type=file]"))
        upload.send_keys(str(tiny_image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#images td.filename[aria-label='tiny.png']"))
        driver.find_element(By.ID, "add-images").click()
        wait.until(lambda d: "image 1 added: tiny.png" in d.find_element(By.ID, "upload-status").text)
        box = driver.find_element(By.CSS_SELECTOR, "#message textarea")
        box.send_keys("describe the picture")
        box.send_keys(Keys.ENTER)
        seen: list[str] = []

        def answered(d) -> bool:
            bots = d.find_elements(By.CSS_SELECTOR, "#chatbot .bot")
            text = bots[-1].text.strip() if bots else ""
            if text and (not seen or seen[-1] != text):
                seen.append(text)
            return " ".join(text.split()) == " ".join(expected.split())

        start = time.monotonic()
        wait.until(answered)
        assert time.monotonic() - start < 60
        user_texts = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#chatbot .user")]
        assert any("describe the picture" in t for t in user_texts)
    finally:
        driver.quit()
