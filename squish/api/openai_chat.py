"""The OpenAI Chat Completions adapter: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/models``.

A thin layer over the serving core (``squish.serving``): the pydantic body
(``openai_schemas``) becomes a ``Job``; the core's events become chat
completion chunks or one body (``openai_shapes``). Errors are ``ServeError``,
shaped by the app's handlers (``squish.api.errors``).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from squish.api.common import JSONRoute, core, reply_headers, request_id, stream_reply, whole_reply
from squish.api.openai_schemas import ChatRequest, CompletionRequest
from squish.api.openai_shapes import ChatShapes, CompletionShapes
from squish.serving.errors import bad_request
from squish.tools.errors import ToolRequestError

router = APIRouter(route_class=JSONRoute)


@router.get("/v1/models")
async def list_models(request: Request):
    e = request.app.state.engine
    return {"object": "list", "data": [_model_card(request)] if e.ready.is_set() else []}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    core(request).resolve_model(model_id)
    return _model_card(request)


def _model_card(request: Request) -> dict:
    info = core(request).model()
    return {"id": info.name, "object": "model", "created": request.app.state.started, "owned_by": "squish"}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatRequest):
    c = core(request)
    try:
        job = body.to_job()
    except ToolRequestError as exc:
        raise bad_request(str(exc), exc.param) from exc
    plan = await c.prepare(job, request_id(request))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shapes = ChatShapes(c.model().name, include_usage, body.logprobs)
    return await _reply(request, plan, shapes, body.stream)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest):
    c = core(request)
    plan = await c.prepare(body.to_job(), request_id(request))
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shapes = CompletionShapes(c.model().name, include_usage, body.logprobs is not None)
    return await _reply(request, plan, shapes, body.stream)


async def _reply(request: Request, plan, shapes, stream: bool):
    if stream:
        return stream_reply(request, plan, shapes)
    reply = await whole_reply(request, plan)
    if reply is None:
        return Response(status_code=499)
    return JSONResponse(shapes.whole(reply), headers=reply_headers(reply))
