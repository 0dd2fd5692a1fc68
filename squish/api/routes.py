"""The OpenAI routes: chat completions, completions, models.

A generation request goes: pydantic validation -> caps (schemas.check_limits)
-> tokenization on a worker thread -> context check -> ``Engine.submit`` ->
events from the request's asyncio queue, returned as JSON or SSE. If the
client goes away (SSE cancelled, or the disconnect poll for JSON responses),
the request is cancelled in the engine, which drops it from the batch before
its next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import time

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, StreamingResponse

from squish.api import toolcalls
from squish.api.errors import APIError
from squish.api.schemas import ChatRequest, CompletionRequest, check_limits
from squish.api.streaming import SSE_DONE, ChatShapes, CompletionShapes, sse
from squish.runtime import engine as eng
from squish.runtime.prompts import PromptError, encode_chat, encode_text
from squish.tools.errors import ToolRequestError

log = logging.getLogger("squish.api")
router = APIRouter()

_ERROR_STATUS = {"timeout": 504, "queue_timeout": 503, "numerical": 500, "internal": 500}
DISCONNECT_POLL_S = 0.2


def _engine(request: Request) -> eng.Engine:
    e = request.app.state.engine
    if not e.ready.is_set():
        if e.failed.is_set():
            raise APIError(503, e.load_error or "model failed to load", code="model_unavailable")
        raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                       headers={"Retry-After": "2"})
    return e


def _check_model(request: Request, name: str) -> None:
    served = request.app.state.engine.model_info.name
    if name != served:
        raise APIError(404, f"model '{name}' is not served here; this server serves '{served}' "
                       "(see GET /v1/models)", param="model", code="model_not_found")


@router.get("/v1/models")
async def list_models(request: Request):
    e = request.app.state.engine
    data = []
    if e.ready.is_set():
        data.append(_model_card(request))
    return {"object": "list", "data": data}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    _engine(request)
    _check_model(request, model_id)
    return _model_card(request)


def _model_card(request: Request) -> dict:
    info = request.app.state.engine.model_info
    return {"id": info.name, "object": "model", "created": request.app.state.started,
            "owned_by": "squish"}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatRequest):
    e = _engine(request)
    _check_model(request, body.model)
    _limits(request, body)
    messages = [m.template_dict() for m in body.messages]
    tok = e.model_info.tokenizer
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shapes = ChatShapes(e.model_info.name, include_usage, body.logprobs)
    if toolcalls.needs_tools(body):
        return await _chat_tools(request, e, body, messages, shapes, include_usage)
    try:
        ids = await run_in_threadpool(encode_chat, tok, messages)
    except PromptError as exc:
        raise APIError(400, str(exc), param="messages") from exc
    top = body.top_logprobs or 0
    params = body.sampling(_max_tokens(request, len(ids), body.requested_max_tokens()), body.logprobs, top)
    return await _run(request, e, ids, params, shapes, body.stream, "chat")


async def _chat_tools(request: Request, e: eng.Engine, body: ChatRequest, messages: list, shapes, include_usage):
    """Tools / tool messages / JSON response_format: see ``squish.api.toolcalls``."""
    model_type = str((e.model_info.config or {}).get("model_type", ""))
    try:
        plan = await run_in_threadpool(toolcalls.plan, e.model_info.tokenizer, model_type, body)
    except ToolRequestError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_request_error") from exc

    def account(status: str, fin) -> None:
        _account(request, "chat", status, fin)

    run = toolcalls.Run(request, e, body, plan,
                        lambda n: _max_tokens(request, n, body.requested_max_tokens()), account)
    try:
        await run.prepare(messages)
    except ToolRequestError as exc:
        raise APIError(400, str(exc), param=exc.param, code="invalid_request_error") from exc
    if body.stream:
        return StreamingResponse(_tool_sse(run, messages, shapes, include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        reply = await toolcalls.complete(run, messages, shapes)
    except toolcalls.ClientGone:
        log.info("%s client disconnected; cancelling", run.rid)
        account("499", None)
        return JSONResponse({}, status_code=499)
    except APIError as exc:
        account(str(exc.status), None)
        raise
    account("200", run.usage.finish(reply["choices"][0]["finish_reason"]))
    if run.degraded:  # valid, but a value was cut short in every attempt (docs/tools.md)
        return JSONResponse(reply, headers={"X-Squish-Degraded": run.degraded})
    return reply


async def _tool_sse(run, messages, shapes, include_usage):
    done = False
    try:
        async for chunk in toolcalls.stream(run, messages, shapes, include_usage):
            yield chunk
        done = True
    finally:
        if not done:
            log.info("%s stream closed by client; cancelling", run.rid)
            run.account("499", None)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest):
    e = _engine(request)
    _check_model(request, body.model)
    _limits(request, body)
    tok = e.model_info.tokenizer
    prompt = body.prompt[0] if isinstance(body.prompt, list) and isinstance(body.prompt[0], str) else body.prompt
    if isinstance(prompt, str):
        ids = await run_in_threadpool(encode_text, tok, prompt)
    else:
        vocab = _vocab_size(e)
        if any(t < 0 or t >= vocab for t in prompt):
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        ids = list(prompt)
    if not ids:
        raise APIError(400, "the prompt encodes to zero tokens", param="prompt")
    n_lp = body.logprobs or 0
    params = body.sampling(_max_tokens(request, len(ids), body.requested_max_tokens()),
                           body.logprobs is not None, n_lp)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shapes = CompletionShapes(e.model_info.name, include_usage, body.logprobs is not None)
    return await _run(request, e, ids, params, shapes, body.stream, "completions")


def _vocab_size(e: eng.Engine) -> int:
    cfg = e.model_info.config or {}
    return int(cfg.get("vocab_size") or len(e.model_info.tokenizer))


def _limits(request: Request, body) -> None:
    try:
        check_limits(body, request.app.state.limits)
    except ValueError as exc:
        raise APIError(400, str(exc)) from exc
    if body.logit_bias:
        vocab = _vocab_size(request.app.state.engine)
        bad = [k for k in body.logit_bias if not 0 <= int(k) < vocab]
        if bad:
            raise APIError(400, f"logit_bias token id {bad[0]} is outside the vocabulary [0, {vocab})",
                           param="logit_bias")


def _max_tokens(request: Request, n_prompt: int, requested: int | None) -> int:
    ctx = request.app.state.context_length
    cap = request.app.state.limits.max_tokens
    room = ctx - n_prompt
    if room <= 0:
        raise APIError(400, f"the prompt is {n_prompt} tokens, which does not fit the model's "
                       f"context of {ctx} tokens", param="messages", code="context_length_exceeded")
    if requested is None:
        return min(cap, room)
    if requested > room:
        raise APIError(400, f"prompt ({n_prompt} tokens) + max_tokens ({requested}) exceeds the "
                       f"model's context of {ctx} tokens; lower max_tokens to at most {room}",
                       param="max_tokens", code="context_length_exceeded")
    return requested


async def _run(request: Request, e: eng.Engine, ids, params, shapes, stream: bool, route: str):
    state = request.app.state
    rid = request.state.request_id
    q: asyncio.Queue = asyncio.Queue()
    req = eng.Request(rid, ids, params, state.request_timeout, asyncio.get_running_loop(), q)
    try:
        e.submit(req)
    except eng.QueueFull as exc:
        raise APIError(503, str(exc), code="server_busy", headers={"Retry-After": "1"}) from exc
    except eng.NotReady as exc:
        raise APIError(503, str(exc), code="model_loading", headers={"Retry-After": "2"}) from exc
    if stream:
        return StreamingResponse(_sse(request, e, req, shapes, route), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _collect(request, e, req, shapes, route)


def _account(request: Request, route: str, status: str, fin: eng.Finish | None) -> None:
    request.app.state.metrics.requests.labels(route, status).inc()
    if fin is not None:
        request.state.log_extra = (f"prompt={fin.prompt_tokens} cached={fin.cached_tokens} "
                                   f"completion={fin.completion_tokens} finish={fin.reason}")


async def _collect(request: Request, e: eng.Engine, req: eng.Request, shapes, route: str):
    texts, lps = [], []
    finished = False
    try:
        while True:
            try:
                ev = await asyncio.wait_for(req.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    log.info("%s client disconnected; cancelling", req.rid)
                    _account(request, route, "499", None)
                    return JSONResponse({}, status_code=499)
                continue
            if isinstance(ev, eng.Delta):
                texts.append(ev.text)
                lps.extend(ev.logprobs)
            elif isinstance(ev, eng.Finish):
                finished = True
                _account(request, route, "200", ev)
                return shapes.full("".join(texts), lps, ev)
            else:
                finished = True
                status = _ERROR_STATUS.get(ev.kind, 500)
                _account(request, route, str(status), None)
                raise APIError(status, ev.message, code=ev.kind)
    finally:
        if not finished:
            e.cancel(req.rid)


async def _sse(request: Request, e: eng.Engine, req: eng.Request, shapes, route: str):
    finished = False
    t0 = time.monotonic()
    try:
        first = shapes.first()
        if first is not None:
            yield sse(first)
        while True:
            ev = await req.events.get()
            if isinstance(ev, eng.Delta):
                yield sse(shapes.delta(ev))
            elif isinstance(ev, eng.Finish):
                finished = True
                _account(request, route, "200", ev)
                yield sse(shapes.last(ev))
                if shapes.include_usage:
                    yield sse(shapes.usage_chunk(ev))
                yield SSE_DONE
                return
            else:
                finished = True
                status = _ERROR_STATUS.get(ev.kind, 500)
                _account(request, route, str(status), None)
                from squish.api.errors import error_body

                yield sse(error_body(status, ev.message, None, ev.kind))
                return
    finally:
        if not finished:
            log.info("%s stream closed by client after %.1fs; cancelling", req.rid, time.monotonic() - t0)
            _account(request, route, "499", None)
            e.cancel(req.rid)
