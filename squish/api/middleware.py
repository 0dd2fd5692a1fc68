"""ASGI middleware: request ids, the access log and request metrics; body size cap;
auth; rate limit. One place for every route of every protocol.

All of it runs on the event loop (one thread), so the rate limiter's bucket
table needs no lock. Order (outermost first): RequestLog -> BodyLimit ->
[CORS] -> Auth -> RateLimit -> app. ``/health`` is always open and never rate
limited; ``/metrics`` needs the key when one is set but is not rate limited.

Errors they return have the protocol's shape (``squish.api.errors``, chosen
by path). An exception no handler took becomes a 500 here, logged once with
its traceback, with the request id on the reply.

The access log carries the request id, method, path, status, duration and
(for completions) token counts that routes put in ``scope["state"]``; never
the prompt or the generated text.
"""

from __future__ import annotations

import hmac
import logging
import math
import re
import secrets
import time

from squish.api.errors import error_bytes

log = logging.getLogger("squish.access")
errlog = logging.getLogger("squish.api")

_RID_OK = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
OPEN_PATHS = ("/health",)
UNLIMITED_PATHS = ("/health", "/metrics")


async def _send_error(scope, send, status: int, message: str, code: str, headers=()) -> None:
    body = error_bytes(scope.get("path", ""), status, message, code)
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _route(scope) -> str:
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class RequestLog:
    """Request id (``X-Request-Id`` in, or made up; always on the reply), the access log,
    ``squish_requests_total{route, status}`` for every reply (a route's ``state.outcome``
    overrides the status: "499" for a client that left, the status of an error that
    ended a started stream), and the 500 for an unhandled exception."""

    def __init__(self, app, metrics=None):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        rid = _header(scope, b"x-request-id")
        if not rid or not _RID_OK.match(rid):
            rid = "req-" + secrets.token_hex(8)
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        start = time.perf_counter()
        status = [None]

        async def send_wrapped(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                msg["headers"] = list(msg.get("headers", [])) + [(b"x-request-id", rid.encode())]
            await send(msg)

        try:
            await self.app(scope, receive, send_wrapped)
        except Exception:  # noqa: BLE001 - nothing else caught it: one log line with the traceback, one 500
            errlog.exception("%s unhandled error", rid)
            if status[0] is None:
                await _send_error(scope, send_wrapped, 500, "internal server error; see the server log",
                                  "internal_error")
            state["outcome"] = "500"
        finally:
            ms = (time.perf_counter() - start) * 1000
            code = status[0] if status[0] is not None else 500
            outcome = state.get("outcome") or str(code)
            if self.metrics is not None:
                self.metrics.requests.labels(_route(scope), outcome).inc()
            extra = state.get("log_extra", "")
            log.info("%s %s %s %s %.0fms%s", rid, scope["method"], scope["path"], outcome, ms,
                     f" {extra}" if extra else "")


class BodyLimit:
    """413 for bodies over ``max_bytes`` (by Content-Length or as streamed)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"request body exceeds {self.max_bytes} bytes"
        length = _header(scope, b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await _send_error(scope, send, 413, too_big, "body_too_large")
        chunks, size = [], 0
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(scope, send, 413, too_big, "body_too_large")
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def presented_key(scope) -> str | None:
    """The API key a request presents: ``Authorization: Bearer KEY`` (OpenAI, Ollama
    clients) or ``x-api-key: KEY`` (Anthropic clients)."""
    auth = _header(scope, b"authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = _header(scope, b"x-api-key")
    return key.strip() if key and key.strip() else None


class Auth:
    """API-key check when a key is configured (Bearer or x-api-key)."""

    def __init__(self, app, api_key: str | None):
        self.app = app
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.key is None or scope["path"] in OPEN_PATHS \
                or scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        key = presented_key(scope)
        if key is None or not hmac.compare_digest(key.encode(), self.key):
            return await _send_error(
                scope, send, 401, "missing or invalid API key: send 'Authorization: Bearer <key>' "
                "or 'x-api-key: <key>'", "invalid_api_key", [("www-authenticate", "Bearer")])
        await self.app(scope, receive, send)


class RateLimit:
    """Token bucket per client: ``per_minute`` requests per minute with bursts of up to
    ``burst``. With an API key configured (``keyed``), the bucket is the key's: Auth has
    already refused any other. Without one, it is the client's address: a made-up
    ``Authorization`` header must not open a fresh bucket."""

    MAX_CLIENTS = 10_000

    def __init__(self, app, per_minute: int, burst: int, keyed: bool = False):
        self.app = app
        self.rate = per_minute / 60.0
        self.burst = float(max(1, burst))
        self.keyed = keyed
        self._buckets: dict[str, tuple[float, float]] = {}

    def _client(self, scope) -> str:
        if self.keyed:
            return "key"  # the one valid key (Auth ran first)
        client = scope.get("client")
        return "addr:" + (client[0] if client else "unknown")

    def _take(self, client: str, now: float) -> float:
        """0 when allowed, else seconds until the next token."""
        tokens, last = self._buckets.get(client, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens >= 1.0:
            self._buckets[client] = (tokens - 1.0, now)
            return 0.0
        self._buckets[client] = (tokens, now)
        return (1.0 - tokens) / self.rate

    def _prune(self, now: float) -> None:
        full_after = self.burst / self.rate
        for k, (_, last) in list(self._buckets.items()):
            if now - last > full_after:
                del self._buckets[k]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.rate <= 0 or scope["path"] in UNLIMITED_PATHS:
            return await self.app(scope, receive, send)
        now = time.monotonic()
        if len(self._buckets) > self.MAX_CLIENTS:
            self._prune(now)
        wait = self._take(self._client(scope), now)
        if wait > 0:
            retry = str(max(1, math.ceil(wait)))
            return await _send_error(scope, send, 429, f"rate limit exceeded; retry after {retry}s",
                                     "rate_limit_exceeded", [("retry-after", retry)])
        await self.app(scope, receive, send)
