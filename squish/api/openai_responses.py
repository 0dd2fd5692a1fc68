"""The OpenAI Responses adapter: ``POST /v1/responses``, ``GET`` / ``DELETE /v1/responses/{id}``,
``GET /v1/responses/{id}/input_items``.

A thin layer over the serving core (``squish.serving``): the pydantic body
(``openai_responses_schemas``) becomes a ``Job``, continuing the stored
conversation a ``previous_response_id`` names; the core's events become a
response object or its stream of events (``openai_responses_shapes``). With
``store`` (the default, as OpenAI documents) the finished response is kept in
the app's bounded in-memory store (``response_store``), so it can be fetched,
listed, deleted and continued; ``store: false`` keeps nothing. Errors are
``ServeError``, shaped by the app's handlers (``squish.api.errors``).
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse, Response

from squish.api.common import JSONRoute, core, reply_headers, request_id, stream_reply, whole_reply
from squish.api.openai_responses_schemas import ResponseRequest
from squish.api.openai_responses_shapes import ResponseShapes
from squish.api.response_store import ResponseStore
from squish.serving.errors import ServeError, bad_request
from squish.tools.errors import ToolRequestError

router = APIRouter(route_class=JSONRoute)


def _store(request: Request) -> ResponseStore:
    return request.app.state.responses


def _stored(request: Request, response_id: str):
    entry = _store(request).get(response_id)
    if entry is None:
        raise ServeError(404, f"No response found with id '{response_id}' (responses are kept in memory, "
                         "bounded, and only with store: true).", param="response_id", code="not_found")
    return entry


@router.post("/v1/responses")
async def create_response(request: Request, body: ResponseRequest):
    c = core(request)
    store = _store(request)
    history = store.conversation(body.previous_response_id) if body.previous_response_id else []
    items = body.normalized_input()
    try:
        job = body.to_job(history, items)
    except ToolRequestError as exc:
        raise bad_request(str(exc), exc.param) from exc
    plan = await c.prepare(job, request_id(request))

    def keep(response: dict) -> None:
        if body.store is not False:
            store.put(response, items, body.previous_response_id)

    shapes = ResponseShapes(body, c.model().name, keep)
    if body.stream:
        return stream_reply(request, plan, shapes)
    reply = await whole_reply(request, plan)
    if reply is None:
        return Response(status_code=499)
    return JSONResponse(shapes.whole(reply), headers=reply_headers(reply))


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str, stream: bool = False):
    if stream:
        raise bad_request("streaming a stored response again is not supported; fetch it whole", "stream")
    return _stored(request, response_id).response


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str):
    _stored(request, response_id)
    _store(request).delete(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


@router.get("/v1/responses/{response_id}/input_items")
async def list_input_items(request: Request, response_id: str, limit: int = Query(20, ge=1, le=100),
                           order: Literal["asc", "desc"] = "desc", after: str | None = None):
    """This response's own input items (not those of the responses it continued), as OpenAI lists them."""
    items = list(_stored(request, response_id).input_items)
    if order == "desc":
        items.reverse()
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise bad_request(f"no input item with id '{after}' in response '{response_id}'", "after")
        items = items[ids.index(after) + 1:]
    page = items[:limit]
    return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}
