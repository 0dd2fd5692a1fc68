"""Errors of the tool-calling / structured-output layer.

``ToolRequestError`` is the client's fault (HTTP 400): an invalid JSON Schema in
``tools`` or ``response_format``, an unknown function in ``tool_choice``, a
malformed tool message. It carries ``param`` (the field at fault). A reply the
model could not get right within the retry budget is the serving core's
``ServeError`` 500 ``tool_call_failed`` (``squish.serving.attempts``).
"""

from __future__ import annotations

from squish.errors import InputError


class ToolRequestError(InputError, ValueError):
    """The request's tools / tool_choice / response_format / messages are invalid (HTTP 400)."""

    status = 400
    code = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param
