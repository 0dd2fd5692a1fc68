"""OpenAI-shaped error bodies and the exception handlers that produce them.

Every error the server returns looks like
``{"error": {"message", "type", "param", "code"}}`` so OpenAI clients raise
the matching exception class (BadRequestError, AuthenticationError, ...).
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, *, param=None, code=None, headers=None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_bytes(status: int, message: str, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, None, code)).encode()


def _loc(err: dict[str, Any]) -> str:
    parts = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(parts) if parts else "body"


def validation_error_response(errors: list[dict[str, Any]]) -> JSONResponse:
    """Map pydantic errors: unknown / unsupported parameters and malformed
    JSON are 400, wrong types and out-of-range values are 422."""
    for err in errors:
        ctx = err.get("ctx") or {}
        exc = ctx.get("error")
        if exc is not None and exc.__class__.__name__ == "UnsupportedParameter":
            return error_response(400, str(exc), param=exc.param, code="unsupported_parameter")
    for err in errors:
        if err.get("type") == "extra_forbidden":
            name = _loc(err)
            return error_response(400, f"unsupported parameter '{name}': this server does not implement it",
                                  param=name, code="unsupported_parameter")
        if err.get("type") == "json_invalid":
            return error_response(400, f"request body is not valid JSON: {err.get('msg')}", code="invalid_json")
    msgs = []
    for err in errors[:5]:
        msg = str(err.get("msg", "invalid value"))
        msgs.append(f"{_loc(err)}: {msg.removeprefix('Value error, ')}")
    return error_response(422, "invalid request: " + "; ".join(msgs),
                          param=_loc(errors[0]) if errors else None, code="invalid_value")
