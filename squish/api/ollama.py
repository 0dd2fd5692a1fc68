"""The Ollama API adapter: ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/show``,
``/api/ps``, ``/api/version`` and ``/`` (the probe), as Ollama's docs/api.md defines them.

A thin layer over the serving core (``squish.serving``): the pydantic body
(``ollama_schemas``) becomes a ``Job``; the core's events become NDJSON lines
(``application/x-ndjson``; streaming is on unless ``"stream": false``) or one
JSON object. A chat chunk is ``{"model", "created_at", "message": {"role":
"assistant", "content", "thinking"?, "tool_calls"?}, "done": false}``; the
last one has ``"done": true``, ``done_reason`` and the counts and durations
(nanoseconds, measured: ``total_duration`` from the request reaching its route,
``load_duration`` until the job reached the engine, ``prompt_eval_duration``
until its first token, ``eval_duration`` from there to the end).
``/api/generate`` sends ``response`` (and ``thinking``) instead of ``message``.
Tool calls come whole, one line each, with their arguments as an object.
A stream that fails after it started ends with one ``{"error": "..."}`` line,
as Ollama's do. Model names in Ollama's ``name:tag`` form map to the served
model (``:latest`` stripped; ``default`` and the catalog name work too).
Model management (pull, push, create, copy, delete, blobs) and embeddings are
501 with what to use instead (docs/api-ollama.md).
"""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, PlainTextResponse, Response

from squish.api import ollama_models as om
from squish.api.common import JSONRoute, UnsupportedParameter, core, ndjson, reply_headers, request_id, stream_reply, \
    whole_reply
from squish.api.errors import validation_error
from squish.api.ollama_schemas import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, DEFAULT_TOP_P, OllamaChatRequest, \
    OllamaGenerateRequest, OllamaShowRequest
from squish.runtime.sampling import TokenLogprob
from squish.serving.errors import ServeError, bad_request
from squish.serving.events import Done, ReasoningDelta, Reply, TextDelta, ToolCall
from squish.tools.errors import ToolRequestError

# The Ollama release whose API (docs/api.md: think levels up to "max", logprobs, tool_name)
# this adapter follows; clients compare it to gate features. Squish's own is "squish".
OLLAMA_API_VERSION = "0.30.11"
NDJSON = "application/x-ndjson"
MIN_LOGPROB = -9999.0  # JSON has no -inf
DONE_REASON = {"stop": "stop", "length": "length", "tool_calls": "stop"}  # Ollama ends tool calls with "stop"
SAMPLING_DEFAULTS = {"temperature": DEFAULT_TEMPERATURE, "top_k": DEFAULT_TOP_K, "top_p": DEFAULT_TOP_P}


class AnyJSONRoute(JSONRoute):
    """Reads a POST body as JSON whatever its Content-Type, as Ollama does (the ``curl -d``
    examples of its docs send ``application/x-www-form-urlencoded``), and answers every
    invalid body with 400, as Ollama does (a wrong type or range included). Notes the time the
    request reached its route (``request.state.arrived``, for ``total_duration``)."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def as_json(request: Request):
            request.state.arrived = time.monotonic()
            if request.method == "POST" and "json" not in request.headers.get("content-type", ""):
                headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                request = Request({**request.scope, "headers": [*headers, (b"content-type", b"application/json")]},
                                  request.receive)
            try:
                return await handler(request)
            except RequestValidationError as exc:
                _, message, param, code = validation_error(exc.errors())
                raise ServeError(400, message, param=param, code=code) from None

        return as_json


router = APIRouter(route_class=AnyJSONRoute)


# ---- probes and the model list ----------------------------------------------------------------

@router.get("/", response_class=PlainTextResponse)
@router.head("/", response_class=PlainTextResponse)
async def probe():
    """Ollama clients probe ``/`` for this exact text."""
    return "Ollama is running"


@router.get("/api/version")
@router.head("/api/version")
async def version():
    from squish import __version__

    return {"version": OLLAMA_API_VERSION, "squish": __version__}


async def _card(request: Request):
    info = core(request).model()
    return info, await run_in_threadpool(om.card, info.path, info.config)


@router.get("/api/tags")
@router.head("/api/tags")
async def tags(request: Request):
    if not request.app.state.engine.ready.is_set():
        return {"models": []}
    info, c = await _card(request)
    return {"models": [om.tag_entry(info, c)]}


@router.get("/api/ps")
async def ps(request: Request):
    if not request.app.state.engine.ready.is_set():
        return {"models": []}
    info, c = await _card(request)
    return {"models": [om.ps_entry(info, c, core(request).context_length())]}


@router.post("/api/show")
async def show(request: Request, body: OllamaShowRequest):
    resolve(request, body.model or body.name, "model")
    info, c = await _card(request)
    return om.show(info, c, core(request).context_length(), SAMPLING_DEFAULTS)


def resolve(request: Request, name: str, param: str = "model") -> str:
    """The served model's name for an Ollama model name, or a 404 in Ollama's wording
    (clients look for "not found")."""
    c = core(request)
    info = c.model()
    names = c.names()
    for candidate in (name, name.removesuffix(om.TAG)):
        if candidate in names:
            return info.name
    raise ServeError(404, f"model '{name}' not found; this server serves '{info.name}{om.TAG}'",
                     param=param, code="model_not_found")


# ---- chat and generate --------------------------------------------------------------------

@router.post("/api/chat")
async def chat(request: Request, body: OllamaChatRequest):
    return await _answer(request, body, "chat", empty=not body.messages)


@router.post("/api/generate")
async def generate(request: Request, body: OllamaGenerateRequest):
    return await _answer(request, body, "generate", empty=not body.prompt)


async def _answer(request: Request, body, kind: str, *, empty: bool):
    model = resolve(request, body.model)
    shapes = Shapes(body.model, kind, request.state.arrived, body.logprobs)
    if empty:  # Ollama: an empty chat or prompt loads the model (here: it always is)
        return _load_or_unload(body, shapes)
    return await _run(request, _job(body, model), shapes, body.stream)


def _job(body, model: str):
    try:
        return body.to_job(model)
    except ToolRequestError as exc:
        raise bad_request(str(exc), exc.param) from exc
    except UnsupportedParameter as exc:
        raise bad_request(str(exc), exc.param, "unsupported_parameter") from exc


def _load_or_unload(body, shapes: "Shapes") -> JSONResponse:
    if body.unload():
        raise bad_request("keep_alive 0 asks to unload the model, but this server keeps its one model loaded "
                          "for its whole life; stop `squish serve` to free the memory", "keep_alive")
    return JSONResponse(shapes.loaded())


async def _run(request: Request, job, shapes: "Shapes", stream: bool):
    plan = await core(request).prepare(job, request_id(request))
    shapes.plan = plan
    if stream:
        return stream_reply(request, plan, shapes, NDJSON)
    reply = await whole_reply(request, plan)
    if reply is None:
        return Response(status_code=499)
    return JSONResponse(shapes.whole(reply), headers=reply_headers(reply))


# ---- wire shapes --------------------------------------------------------------------------

def _lp(v: float) -> float:
    return v if v > MIN_LOGPROB else MIN_LOGPROB


def logprobs(items: list[TokenLogprob]) -> list[dict]:
    def entry(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": _lp(lp), "bytes": list(tok.encode("utf-8"))}

    return [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, v) for t, v in i.top]} for i in items]


def tool_call(c: ToolCall) -> dict:
    return {"id": c.id, "function": {"index": c.index, "name": c.name, "arguments": json.loads(c.arguments)}}


class Shapes:
    """One reply of ``/api/chat`` (``kind`` "chat") or ``/api/generate`` ("generate"): the
    whole body, or a ``StreamEncoder`` of its NDJSON lines."""

    def __init__(self, model: str, kind: str, t0: float, want_logprobs: bool):
        self.model, self.kind, self.t0, self.want_logprobs = model, kind, t0, want_logprobs
        self.plan = None

    def _obj(self, done: bool, content: str = "", thinking: str | None = None, calls: list | None = None,
             **extra) -> dict:
        obj: dict = {"model": self.model, "created_at": om.now()}
        if self.kind == "chat":
            msg: dict = {"role": "assistant", "content": content}
            if thinking:
                msg["thinking"] = thinking
            if calls:
                msg["tool_calls"] = calls
            obj["message"] = msg
        else:
            obj["response"] = content
            if thinking:
                obj["thinking"] = thinking
            if calls:
                obj["tool_calls"] = calls
        obj["done"] = done
        obj.update(extra)
        return obj

    def loaded(self) -> dict:
        return self._obj(True, done_reason="load")

    def _final(self, done: Done) -> dict:
        """done_reason, the counts and the measured durations (nanoseconds)."""
        end = time.monotonic()
        p = self.plan
        sent = p.submitted_at if p is not None and p.submitted_at is not None else end
        first = p.first_token_at if p is not None and p.first_token_at is not None else end
        ns = lambda s: max(0, int(s * 1e9))  # noqa: E731
        return {"done_reason": DONE_REASON.get(done.finish_reason, done.finish_reason),
                "total_duration": ns(end - self.t0), "load_duration": ns(sent - self.t0),
                "prompt_eval_count": done.usage.prompt_tokens, "prompt_eval_duration": ns(first - sent),
                "eval_count": done.usage.completion_tokens, "eval_duration": ns(end - first)}

    # StreamEncoder
    def start(self):
        return []

    def event(self, ev):
        if isinstance(ev, TextDelta):
            if ev.replay or not ev.text:
                return []
            extra = {"logprobs": logprobs(ev.logprobs)} if self.want_logprobs and ev.logprobs else {}
            return [ndjson(self._obj(False, ev.text, **extra))]
        if isinstance(ev, ReasoningDelta):
            return [ndjson(self._obj(False, thinking=ev.text))] if ev.text else []
        if isinstance(ev, ToolCall):
            return [ndjson(self._obj(False, calls=[tool_call(ev)]))]
        if isinstance(ev, Done):
            return [ndjson(self._obj(True, **self._final(ev)))]
        return []  # Restart: what was sent stays sent; the retry follows

    def error(self, exc: ServeError):
        return [ndjson({"error": exc.message})]

    # whole reply
    def whole(self, reply: Reply) -> dict:
        extra = {"logprobs": logprobs(reply.logprobs)} if self.want_logprobs else {}
        done = reply.done or Done("stop", reply.usage)
        return self._obj(True, reply.content, reply.reasoning or None,
                         [tool_call(c) for c in reply.tool_calls] or None, **self._final(done), **extra)


# ---- what this server does not do -----------------------------------------------------------

_MANAGE = ("squish serves the one model it was started with and does not {what} models over the API; build "
           "a model with `squish quantize SOURCE` and serve it with `squish serve PATH`")


def _refuse(what: str, message: str | None = None):
    async def handler():
        raise ServeError(501, message or _MANAGE.format(what=what), code="not_implemented")

    async def blob_handler(digest: str):
        await handler()

    return blob_handler if what == "upload" else handler


_REFUSED = {501: {"description": "not supported by this server"}}


for _path, _method, _what in (("/api/pull", "POST", "pull"), ("/api/push", "POST", "push"),
                              ("/api/create", "POST", "create"), ("/api/copy", "POST", "copy"),
                              ("/api/delete", "DELETE", "delete"), ("/api/blobs/{digest}", "POST", "upload"),
                              ("/api/blobs/{digest}", "HEAD", "upload")):
    router.add_api_route(_path, _refuse(_what), methods=[_method], summary=f"Not supported: {_what} a model",
                            responses=_REFUSED)
for _path in ("/api/embed", "/api/embeddings"):
    router.add_api_route(_path, _refuse("embed", "embeddings are not supported: squish serves text "
                                        "generation only"), methods=["POST"], summary="Not supported: embeddings",
                            responses=_REFUSED)
