"""What every protocol adapter shares: the core, streaming and whole replies, wire framing.

An adapter route: its pydantic body → ``Job`` → ``core.prepare`` (errors are
raised as ``ServeError`` and the app's handlers shape them for the protocol)
→ ``stream_reply`` with the adapter's ``StreamEncoder``, or ``whole_reply``
and the adapter's own JSON. Both consume the core's neutral events; both
cancel the engine work when the client goes away (a stream's generator is
closed; a whole reply polls for the disconnect) and record the outcome
(``request.state.outcome``: "499" for a client that left, the status of an
error that ended a started stream) for the access log and
``squish_requests_total``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from typing import Iterable, Protocol

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import StreamingResponse

from squish.serving.core import Core, Plan
from squish.serving.errors import ClientGone, ServeError
from squish.serving.events import Reply

log = logging.getLogger("squish.api")

SSE_DONE = b"data: [DONE]\n\n"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class UnsupportedParameter(ValueError):
    """A known field at a value this server does not implement (400, ``param`` names it)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def core(request: Request) -> Core:
    return request.app.state.core


def request_id(request: Request) -> str:
    return request.state.request_id


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def sse(obj, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    return (head + "data: " + dumps(obj) + "\n\n").encode()


def ndjson(obj) -> bytes:
    return (dumps(obj) + "\n").encode()


class StreamEncoder(Protocol):
    def start(self) -> Iterable[bytes]: ...
    def event(self, ev) -> Iterable[bytes]: ...
    def error(self, exc: ServeError) -> Iterable[bytes]: ...


def _log_usage(request: Request, plan: Plan) -> None:
    d = plan.done
    if d is not None:
        u = d.usage
        request.state.log_extra = (f"prompt={u.prompt_tokens} cached={u.cached_tokens} "
                                   f"completion={u.completion_tokens} finish={d.finish_reason}")


def stream_reply(request: Request, plan: Plan, encoder: StreamEncoder,
                 media_type: str = "text/event-stream") -> StreamingResponse:
    return StreamingResponse(_stream(request, plan, encoder), media_type=media_type, headers=STREAM_HEADERS)


async def _stream(request: Request, plan: Plan, encoder: StreamEncoder):
    ended = False
    try:
        for chunk in encoder.start():
            yield chunk
        async with contextlib.aclosing(core(request).events(plan)) as events:
            async for ev in events:
                for chunk in encoder.event(ev):
                    yield chunk
        ended = True
    except ServeError as exc:
        ended = True
        request.state.outcome = str(exc.status)
        if exc.status >= 500:
            log.warning("%s stream ended with %d %s", plan.rid, exc.status, exc.code)
        for chunk in encoder.error(exc):
            yield chunk
    except Exception:  # noqa: BLE001 - a bug: end the stream with an error event, keep serving
        ended = True
        request.state.outcome = "500"
        log.exception("%s stream failed", plan.rid)
        for chunk in encoder.error(ServeError(500, "internal server error; see the server log", code="internal")):
            yield chunk
    finally:
        if not ended:
            request.state.outcome = "499"
            log.info("%s stream closed by the client; cancelled", plan.rid)
        _log_usage(request, plan)


async def whole_reply(request: Request, plan: Plan) -> Reply | None:
    """The collected reply, or None when the client disconnected (the work was cancelled)."""
    try:
        reply = await core(request).complete(plan, request.is_disconnected)
    except ClientGone:
        request.state.outcome = "499"
        log.info("%s client disconnected; cancelled", plan.rid)
        return None
    _log_usage(request, plan)
    return reply


def reply_headers(reply: Reply) -> dict[str, str]:
    """Headers of a whole reply that say it is degraded (docs/tools.md) or that its
    reasoning section was closed at its budget."""
    h = {}
    if reply.done is not None and reply.done.degraded:
        h["X-Squish-Degraded"] = reply.done.degraded
    if reply.done is not None and reply.done.reasoning_closed:
        h["X-Squish-Reasoning-Closed"] = "budget"
    return h


# ---- request bodies ------------------------------------------------------------------------------
def _number(text: str) -> float | int:
    """A JSON number with a fraction or exponent: an int when it is integral (``16.0``), since
    JSON, and JSON Schema's ``integer``, do not tell ``16.0`` from ``16``. Float fields take
    the int unchanged; ``16.5`` stays a float, which an integer field refuses."""
    value = float(text)
    return int(value) if value.is_integer() else value


class _JSONNumbers(Request):
    async def json(self):
        if not hasattr(self, "_json"):
            self._json = json.loads(await self.body(), parse_float=_number)
        return self._json


class JSONRoute(APIRoute):
    """Every protocol's routes: request bodies parsed with ``_number`` (strict types stay
    strict otherwise: ``"8"`` is still not a number)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def route(request: Request):
            return await handler(_JSONNumbers(request.scope, request.receive))

        return route

