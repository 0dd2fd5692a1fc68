"""Error bodies in each protocol's own shape, chosen by the request path.

- OpenAI (``/v1/...`` except Anthropic's routes): ``{"error": {"message",
  "type", "param", "code"}}``, so OpenAI SDKs raise the matching class
  (BadRequestError, AuthenticationError, ...).
- Anthropic (``/v1/messages...``): ``{"type": "error", "error": {"type",
  "message"}}`` with Anthropic's error types. Anthropic answers every invalid
  request with 400 ``invalid_request_error`` (its SDKs raise BadRequestError),
  so a 422 (a wrong type or an out-of-range value) is sent as 400 there.
- Ollama (``/api/...``): ``{"error": "message"}``.

Every error the server returns goes through ``error_response`` /
``error_bytes`` (handlers, middleware); streamed replies that fail after they
started use each adapter's own stream error event.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}
ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def protocol(path: str) -> str:
    if path.startswith("/v1/messages"):
        return "anthropic"
    if path.startswith("/api/"):
        return "ollama"
    return "openai"


def openai_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": OPENAI_TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def anthropic_body(status: int, message: str) -> dict:
    return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}


def ollama_body(message: str) -> dict:
    return {"error": message}


def error_body(path: str, status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = protocol(path)
    if kind == "anthropic":
        return anthropic_body(status, message)
    if kind == "ollama":
        return ollama_body(message)
    return openai_body(status, message, param, code)


def error_response(path: str, status: int, message: str, *, param=None, code=None, headers=None) -> JSONResponse:
    if status == 422 and protocol(path) == "anthropic":
        status = 400
    return JSONResponse(error_body(path, status, message, param, code), status_code=status, headers=headers)


def error_bytes(path: str, status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(error_body(path, status, message, None, code)).encode()


def _loc(err: dict[str, Any]) -> str:
    parts = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(parts) if parts else "body"


def validation_error(errors: list[dict[str, Any]]) -> tuple[int, str, str | None, str]:
    """``(status, message, param, code)`` for pydantic errors: unknown / unsupported
    parameters and malformed JSON are 400, wrong types and out-of-range values 422."""
    for err in errors:
        ctx = err.get("ctx") or {}
        exc = ctx.get("error")
        if exc is not None and exc.__class__.__name__ == "UnsupportedParameter":
            return 400, str(exc), exc.param, "unsupported_parameter"
    for err in errors:
        if err.get("type") == "extra_forbidden":
            name = _loc(err)
            return 400, f"unsupported parameter '{name}': this server does not implement it", name, \
                "unsupported_parameter"
        if err.get("type") == "json_invalid":
            return 400, f"request body is not valid JSON: {err.get('msg')}", None, "invalid_json"
    msgs = []
    for err in errors[:5]:
        msg = str(err.get("msg", "invalid value"))
        msgs.append(f"{_loc(err)}: {msg.removeprefix('Value error, ')}")
    return 422, "invalid request: " + "; ".join(msgs), (_loc(errors[0]) if errors else None), "invalid_value"
