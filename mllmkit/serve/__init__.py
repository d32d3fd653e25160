"""``mllmkit serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over the batched decoder.

:mod:`~mllmkit.serve.schema` is the request body, :mod:`~mllmkit.serve.images` reads its images
within limits, :mod:`~mllmkit.serve.prompt` renders its messages with the chat session's prompt
code, :mod:`~mllmkit.serve.engine` queues and batch-decodes requests on one thread,
:mod:`~mllmkit.serve.app` is the FastAPI app and :mod:`~mllmkit.serve.command` the CLI command.
Needs the ``serve`` extra (``pip install mllmkit[serve]``).
"""

from __future__ import annotations

__all__: list[str] = []
