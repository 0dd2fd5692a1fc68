"""The FastAPI application factory.

``create_app(settings, engine)`` builds one serving core (``squish.serving``)
over the ``Engine`` and mounts each protocol adapter's router on it, with
``/health`` and ``/metrics``. Everything that applies to every route lives
here, in one place: the middleware (request ids and the access log, body size
cap, auth, rate limit, request metrics; ``squish.api.middleware``) and the
exception handlers that give every error its protocol's shape
(``squish.api.errors``), and the served OpenAPI document that says so
(``squish.api.openapi``). The engine is started by the lifespan if the caller
has not started it, and stopped on shutdown.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.responses import JSONResponse, PlainTextResponse, Response

from squish.api import middleware as mw
from squish.api.anthropic import router as anthropic
from squish.api.errors import error_response, validation_error
from squish.api.metrics import Metrics
from squish.api.ollama import router as ollama
from squish.api.openapi import install as install_openapi
from squish.api.openai_chat import router as openai_chat
from squish.api.openai_responses import router as openai_responses
from squish.api.response_store import ResponseStore
from squish.api.settings import ServeSettings
from squish.serving.core import Core, Limits
from squish.serving.errors import ServeError

log = logging.getLogger("squish.api")

ROUTERS = (openai_chat, openai_responses, anthropic, ollama)


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed(app: FastAPI, scope) -> str:
    """Every method some route serves at this path (one path may have a route per method;
    Starlette's own 405 names only the first route's). Asked of the routes themselves, so
    included routers are covered however FastAPI nests them."""
    return ", ".join(m for m in _METHODS
                     if any(r.matches({**scope, "method": m})[0] == Match.FULL for r in app.router.routes))


def create_app(settings: ServeSettings, engine, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine._thread.is_alive() and not engine.ready.is_set() and not engine.failed.is_set():
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Squish", version=_version(), lifespan=lifespan,
                  description="A local LLM server on MLX: OpenAI, Anthropic and Ollama APIs on one serving core.")
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.state.context_length = None  # None: the model's own context (from its config)
    app.state.core = Core(engine, limits=Limits(max_messages=settings.max_messages,
                                                max_content_chars=settings.max_content_chars,
                                                max_tokens=settings.max_tokens),
                          request_timeout=settings.request_timeout, stats=metrics.tool_stats,
                          context_override=lambda: app.state.context_length)
    app.state.responses = ResponseStore(settings.responses_store, settings.responses_store_mb << 20)
    for r in ROUTERS:
        app.include_router(r)

    @app.get("/health")
    async def health():
        extra = engine.health() if hasattr(engine, "health") else {}  # a multi-machine server's ranks
        if engine.ready.is_set():
            return {"status": "ok", "model": engine.model_info.name, "inflight": engine.inflight, **extra}
        if engine.failed.is_set():
            return JSONResponse({"status": "error", "error": engine.load_error, **extra}, status_code=503)
        return JSONResponse({"status": "loading", **extra}, status_code=503, headers={"Retry-After": "2"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError):
        if exc.status >= 500:
            log.warning("%s %d %s", getattr(request.state, "request_id", "-"), exc.status, exc.code)
        return error_response(request.url.path, exc.status, exc.message, param=exc.param, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        status, message, param, code = validation_error(exc.errors())
        return error_response(request.url.path, status, message, param=param, code=code)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        path = request.url.path
        if exc.status_code == 404:
            return error_response(path, 404, f"no route {request.method} {path}", code="not_found")
        if exc.status_code == 405:
            return error_response(path, 405, f"method {request.method} not allowed on {path}",
                                  code="method_not_allowed", headers={"Allow": _allowed(app, request.scope)})
        return error_response(path, exc.status_code, str(exc.detail), headers=exc.headers)

    # add_middleware wraps: the last added is outermost.
    app.add_middleware(mw.RateLimit, per_minute=settings.rate_limit_per_minute,
                       burst=settings.rate_limit_burst, keyed=bool(settings.api_key))
    app.add_middleware(mw.Auth, api_key=settings.api_key)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id", "X-Api-Key",
                                          "Anthropic-Version", "Anthropic-Beta"])
    app.add_middleware(mw.BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(mw.RequestLog, metrics=metrics)
    install_openapi(app, keyed=bool(settings.api_key))  # /openapi.json says what the routes answer
    return app


def _version() -> str:
    from squish import __version__

    return __version__
