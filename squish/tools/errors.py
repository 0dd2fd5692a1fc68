"""Errors of the tool-calling / structured-output layer, with their HTTP mapping.

``ToolRequestError`` is the client's fault (HTTP 400): an invalid JSON Schema in
``tools`` or ``response_format``, an unknown function in ``tool_choice``, a
malformed tool message. ``ToolCallFailed`` means the model could not produce a
valid call or output within the retry budget (HTTP 500, ``code`` names it);
the client never gets a half-parsed call.

Both carry ``status`` / ``code`` / ``param`` so the API maps them in one line
to an OpenAI-shaped error body.
"""

from __future__ import annotations

from squish.errors import InputError, SquishError


class ToolRequestError(InputError, ValueError):
    """The request's tools / tool_choice / response_format / messages are invalid (HTTP 400)."""

    status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ToolCallFailed(SquishError):
    """Every attempt produced an invalid call or output (HTTP 500, code ``tool_call_failed``).

    ``attempts`` lists the cause of each failed attempt (see ``loop.Cause``).
    """

    status = 500
    code = "tool_call_failed"
    param = None

    def __init__(self, message: str, attempts: list[str]):
        super().__init__(message)
        self.attempts = attempts
