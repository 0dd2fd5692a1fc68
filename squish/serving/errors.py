"""Protocol-neutral errors of the serving core.

A ``ServeError`` carries an HTTP status, a message for the client, the request
field at fault (``param``, in the caller's own field names) and a machine code.
The API maps it once, per protocol (``squish.api.errors``): OpenAI's
``{"error": {...}}``, Anthropic's ``{"type": "error", "error": {...}}``,
Ollama's ``{"error": "..."}``.
"""

from __future__ import annotations


class ServeError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}


class ClientGone(Exception):
    """The client of a whole (non-streamed) reply disconnected; the work was cancelled."""


# Engine error kinds -> HTTP status.
ENGINE_STATUS = {"timeout": 504, "queue_timeout": 503, "numerical": 500, "internal": 500, "unavailable": 503}
NO_RETRY = {"x-should-retry": "false"}  # the server already retried (OpenAI SDKs honour it)


def bad_request(message: str, param: str | None = None, code: str = "invalid_request_error") -> ServeError:
    return ServeError(400, message, param=param, code=code)
