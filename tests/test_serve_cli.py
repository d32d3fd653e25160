"""The ``mllmkit serve`` command as a user runs it: the demo recipe in a subprocess on a loopback port.

SIGTERM in the middle of a streamed answer: the answer still arrives whole (the same token count as
the same request made before), then the process ends (by that signal, as uvicorn does). User errors exit 2 with one line.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(*args: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLLMKIT_API_KEY": ""}
    return subprocess.Popen([sys.executable, "-m", "mllmkit.cli", "serve", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_up(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"mllmkit serve exited with {proc.returncode}:\n{proc.stdout.read()}")
        try:
            if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError("mllmkit serve did not come up")


@pytest.mark.slow
def test_demo_served_and_sigterm_finishes_the_answer_in_flight():
    port = _free_port()
    url = f"http://127.0.0.1:{port}/v1"
    proc = _serve("recipes/demo.toml", "--device", "cpu", "--port", str(port))
    try:
        _wait_up(proc, url)
        assert httpx.get(f"{url}/models").json()["data"][0]["id"] == "demo"
        body = {"model": "demo", "messages": [{"role": "user", "content": "count the shapes"}], "max_tokens": 150}
        before = httpx.post(f"{url}/chat/completions", json=body, timeout=120).json()
        events = []
        with httpx.stream("POST", f"{url}/chat/completions", timeout=120,
                          json={**body, "stream": True, "stream_options": {"include_usage": True}}) as response:
            lines = (line for line in response.iter_lines() if line)
            events.append(next(lines))
            proc.send_signal(signal.SIGTERM)  # the answer is in flight
            events.extend(lines)
        assert proc.wait(timeout=120) == -signal.SIGTERM  # uvicorn exits by the signal once it has shut down
    finally:
        if proc.poll() is None:
            proc.kill()
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert chunks[-1]["usage"] == before["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] == before["choices"][0]["finish_reason"]
    with pytest.raises(httpx.TransportError):  # and nothing listens any more
        httpx.get(f"{url}/models", timeout=5)


@pytest.mark.parametrize("args, message", [
    (["recipes/demo.toml", "--allow-dir", "no/such/folder"], "mllmkit: error: --allow-dir no/such/folder: not a folder"),
    (["recipes/demo.toml", "--max-queue", "0"], "mllmkit: error: --max-queue must be at least 1, found 0"),
    ([], "mllmkit: error: give a recipe (mllmkit serve RECIPE --checkpoint CKPT) or an exported folder (--model DIR)"),
])
def test_user_errors_exit_2_with_one_line(args, message):
    proc = _serve(*args)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert out.strip().splitlines() == [message]
