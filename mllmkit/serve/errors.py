"""Errors as the OpenAI API writes them: ``{"error": {"message", "type", "param", "code"}}`` and a status.

:class:`APIError` is raised anywhere a request is refused (bad body, bad image, wrong key, full
queue); the app turns it into that JSON body with its HTTP status. :func:`validation_error` turns a
pydantic validation failure of the request body into one such error naming the field.
"""

from __future__ import annotations

from typing import Any

__all__ = ["APIError", "validation_error"]

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          500: "server_error", 503: "server_error"}


_PART_TAGS = ("text", "image_url")  # content part types: pydantic puts the tag into the error location


class APIError(Exception):
    """A refused request: HTTP ``status`` and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _param(loc: tuple[Any, ...]) -> str | None:
    """``("messages", 0, "content", "list[...]", 0, "image_url", "image_url", "url")`` →
    ``messages[0].content[0].image_url.url``: pydantic's union branches and tags are left out."""
    text = ""
    for index, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif part == "str" or str(part).startswith("list[") or (
                part in _PART_TAGS and isinstance(loc[index - 1], int) and index + 1 < len(loc)):
            continue
        else:
            text += f".{part}" if text else str(part)
    return text or None


def validation_error(exc: Any) -> APIError:
    """The most specific problem of a ``pydantic.ValidationError`` of the request body, as a 400 (of a
    string-or-parts field, the deepest error says what is wrong with the parts)."""
    errors = exc.errors(include_url=False)
    first = max(errors, key=lambda error: len(error["loc"]))
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first['msg']}", code="invalid_json")
    param = _param(tuple(first["loc"]))
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument supplied: {param}", param=param,
                        code="unknown_parameter")
    return APIError(400, f"{param}: {first['msg']}", param=param, code="invalid_value")
