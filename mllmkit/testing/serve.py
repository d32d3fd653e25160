"""A live ``mllmkit serve`` API in a background thread, for tests and benchmarks.

:func:`running_server` binds a free loopback port, runs the same uvicorn server the command runs
(:func:`mllmkit.serve.command.build_server`) in a thread and yields its base URL (``…/v1``, what
``openai.OpenAI(base_url=...)`` takes); on exit it shuts the server down gracefully and stops the
engine. ``start_engine=False`` leaves the engine's decoding thread for the caller to start (requests
then wait in its queue).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from mllmkit.serve.command import build_server

__all__ = ["running_server"]


@contextlib.contextmanager
def running_server(engine, *, model_name: str = "toy", start_engine: bool = True, **options: Any) -> Iterator[str]:
    """Serve ``engine`` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""
    server = build_server(engine, host="127.0.0.1", port=0, model_name=model_name, log_level="warning", **options)
    if start_engine:
        engine.start()
    thread = threading.Thread(target=server.run, name="mllmkit-serve-test", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join()
        engine.stop()
