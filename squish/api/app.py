"""The FastAPI application factory.

``create_app(settings, engine)`` wires routes, middleware, error handlers,
``/health`` and ``/metrics`` around an ``Engine`` (started by the lifespan if
the caller has not started it, stopped on shutdown).
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from squish.api import middleware as mw
from squish.api.errors import APIError, error_response, validation_error_response
from squish.api.metrics import Metrics
from squish.api.routes import router
from squish.api.schemas import Limits
from squish.api.settings import ServeSettings

log = logging.getLogger("squish.api")

DEFAULT_CONTEXT = 4096


def create_app(settings: ServeSettings, engine, metrics: Metrics | None = None) -> FastAPI:
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if not engine._thread.is_alive() and not engine.ready.is_set() and not engine.failed.is_set():
            engine.start()
        yield
        engine.stop()

    app = FastAPI(title="Squish", version=_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.state.request_timeout = settings.request_timeout
    app.state.limits = Limits(max_messages=settings.max_messages,
                              max_content_chars=settings.max_content_chars,
                              max_tokens=settings.max_tokens)
    app.state.context_length = DEFAULT_CONTEXT
    app.include_router(router)

    @app.get("/health")
    async def health():
        if engine.ready.is_set():
            _sync_context(app, engine)
            return {"status": "ok", "model": engine.model_info.name,
                    "inflight": engine.inflight}
        if engine.failed.is_set():
            return JSONResponse({"status": "error", "error": engine.load_error}, status_code=503)
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "2"})

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        if exc.status >= 500:
            log.warning("%s %d %s", getattr(request.state, "request_id", "-"), exc.status, exc.code)
        return error_response(exc.status, exc.message, param=exc.param, code=exc.code,
                              headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return validation_error_response(exc.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        msg = {404: f"no route {request.method} {request.url.path}",
               405: f"method {request.method} not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                       str(exc.detail))
        return error_response(exc.status_code, msg)

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        log.exception("%s unhandled error", getattr(request.state, "request_id", "-"))
        return error_response(500, "internal server error; see the server log")

    @app.middleware("http")
    async def context_length(request: Request, call_next):
        if engine.ready.is_set():
            _sync_context(app, engine)
        return await call_next(request)

    # add_middleware wraps: the last added is outermost.
    app.add_middleware(mw.RateLimit, per_minute=settings.rate_limit_per_minute,
                       burst=settings.rate_limit_burst)
    app.add_middleware(mw.Auth, api_key=settings.api_key)
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type", "X-Request-Id"])
    app.add_middleware(mw.BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(mw.RequestLog)
    return app


def _sync_context(app: FastAPI, engine) -> None:
    if getattr(app.state, "_ctx_synced", False):
        return
    cfg = engine.model_info.config or {}
    ctx = cfg.get("max_position_embeddings") or cfg.get("max_seq_len") or cfg.get("n_ctx")
    app.state.context_length = int(ctx) if ctx else DEFAULT_CONTEXT
    app.state._ctx_synced = True


def _version() -> str:
    from squish import __version__

    return __version__
