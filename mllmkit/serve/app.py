"""The OpenAI-compatible HTTP API (FastAPI): ``POST /v1/chat/completions`` and ``GET /v1/models``.

:func:`create_app` wires an :class:`~mllmkit.serve.engine.Engine` to the routes. A chat request's
body is read up to ``max_body_bytes`` (413 above), validated by :class:`~mllmkit.serve.schema.ChatRequest`
(400 naming the field), turned into a prompt off the event loop (images read and checked, template
applied, history window), then queued on the engine (429 when full). The answer comes back as one
``chat.completion`` object, or with ``stream: true`` as server-sent ``chat.completion.chunk`` events
ending with ``data: [DONE]``; ``usage`` counts prompt tokens (image tokens included) and generated
tokens. With an API key every route wants ``Authorization: Bearer KEY`` (401 otherwise). Every error,
including unknown routes, is OpenAI's ``{"error": {...}}`` body with its HTTP status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pydantic
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mllmkit.errors import UserError
from mllmkit.serve.engine import Delta, Done, Engine, Failed, Job
from mllmkit.serve.errors import APIError, validation_error
from mllmkit.serve.images import ImageLimits
from mllmkit.serve.prompt import build_prompt
from mllmkit.serve.schema import ChatRequest

__all__ = ["create_app"]


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, more than this server's limit of {limit} "
                            f"bytes (--max-body-mb)", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"the request body is more than this server's limit of {limit} bytes "
                                f"(--max-body-mb)", code="body_too_large")
    return bytes(body)


def _sampling(request: ChatRequest, engine: Engine) -> dict[str, Any]:
    """Decoding settings: the recipe's ``[chat]`` settings, with the request's temperature and top_p
    (temperature 0: greedy; above 0: sampling)."""
    s = engine.settings
    do_sample = s.do_sample if request.temperature is None else request.temperature > 0
    if request.temperature is None and request.top_p is not None and request.top_p < 1.0:
        do_sample = True
    return dict(do_sample=do_sample, temperature=request.temperature or s.temperature,
                top_k=s.top_k, top_p=s.top_p if request.top_p is None else request.top_p,
                repetition_penalty=s.repetition_penalty, seed=request.seed)


def _max_new_tokens(request: ChatRequest, engine: Engine, prompt_tokens: int) -> int:
    asked = request.max_completion_tokens or request.max_tokens or engine.settings.max_new_tokens
    max_positions = getattr(engine.model.llm, "max_positions", None)
    if not max_positions:
        return asked
    room = max_positions - prompt_tokens
    if room <= 0:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, which leaves no room for an answer in the "
                            f"model's {max_positions} positions", param="messages", code="context_length_exceeded")
    return min(asked, room)


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None, image_limits: ImageLimits | None = None,
               max_body_bytes: int = 32 * 1024 * 1024) -> FastAPI:
    """The API over ``engine`` (which the caller starts; the app stops it when the server shuts down),
    serving it as ``model_name``."""
    limits = image_limits or ImageLimits()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.stop)  # uvicorn has finished the requests in flight; end the worker

    app = FastAPI(title="mllmkit serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return _error_response(APIError(400, str(exc)))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.middleware("http")
    async def _check_key(request: Request, call_next):
        if api_key is not None:
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), api_key.encode()):
                return _error_response(APIError(401, "incorrect or missing API key: send the header "
                                                     "'Authorization: Bearer KEY' with the server's --api-key",
                                                code="invalid_api_key"))
        return await call_next(request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "mllmkit"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = ChatRequest.model_validate_json(await _read_body(request, max_body_bytes))
        except pydantic.ValidationError as exc:
            raise validation_error(exc) from None
        if body.model != model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        if len(body.stop_strings()) > 4:
            raise APIError(400, "stop: at most 4 stop strings", param="stop", code="invalid_value")
        prompt = await run_in_threadpool(build_prompt, engine.model, body.messages, system=engine.system,
                                         max_window_tokens=engine.max_window_tokens, limits=limits,
                                         transform=engine.transform)
        job = Job(prompt=prompt, max_new_tokens=_max_new_tokens(body, engine, len(prompt.ids)),
                  loop=asyncio.get_running_loop(), events=asyncio.Queue(), stop=body.stop_strings(),
                  **_sampling(body, engine))
        engine.submit(job)
        ident, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_sse(job, ident, now, model_name, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await _complete(job, ident, now, model_name)

    return app


def _usage(done: Done) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _complete(job: Job, ident: str, created: int, model: str) -> JSONResponse:
    try:
        while True:
            event = await job.events.get()
            if isinstance(event, Failed):
                return _error_response(event.error)
            if isinstance(event, Done):
                break
    finally:
        job.cancelled.set()  # no-op once done; ends the row if the client went away
    return JSONResponse({
        "id": ident, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": event.text},
                     "logprobs": None, "finish_reason": event.finish_reason}],
        "usage": _usage(event),
    })


async def _sse(job: Job, ident: str, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(choices: list, **extra: Any) -> str:
        payload = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def choice(delta: dict, finish: str | None = None) -> list:
        return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]

    try:
        yield chunk(choice({"role": "assistant", "content": ""}))
        while True:
            event = await job.events.get()
            if isinstance(event, Delta):
                yield chunk(choice({"content": event.text}))
            elif isinstance(event, Failed):
                yield f"data: {json.dumps(event.error.body())}\n\n"
                break
            else:
                yield chunk(choice({}, event.finish_reason))
                if include_usage:
                    yield chunk([], usage=_usage(event))
                break
        yield "data: [DONE]\n\n"
    finally:
        job.cancelled.set()
