"""The Anthropic Messages adapter: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

A thin layer over the serving core (``squish.serving``): the pydantic body
(``anthropic_schemas``) becomes a ``Job``; the core's events become one
``message`` object or Anthropic's server-sent events (``MessageShapes``).
Errors are ``ServeError``, shaped as Anthropic's ``{"type": "error", "error":
{...}}`` by the app's handlers (``squish.api.errors``, by path). Auth by
``x-api-key`` or Bearer comes from the app's middleware; the
``anthropic-version`` and ``anthropic-beta`` headers are accepted and change
nothing.

A reply's content blocks, in order: ``thinking`` (the reasoning section of a
model that writes one), ``text``, ``tool_use`` (``input`` is the validated
arguments object). A thinking block's ``signature``, which Anthropic's SDKs
require, is ``"squish-sha256:"`` + the SHA-256 of the thinking text: a checksum,
not a proof of origin, and never checked when the block comes back.

Stream events: ``message_start`` (usage: the prompt's tokens), ``ping``, then
per block ``content_block_start`` / ``content_block_delta`` (``thinking_delta``
then one ``signature_delta``, ``text_delta``, or one ``input_json_delta`` with
the whole validated arguments) / ``content_block_stop``, then ``message_delta``
(stop_reason, stop_sequence, usage) and ``message_stop``. After a corrective
retry (the core's ``Restart``) the retry's output opens new blocks: what was
sent stays sent. An error after the stream started is ``event: error`` with
Anthropic's error body, and the stream ends there.
"""

from __future__ import annotations

import hashlib
import json
import secrets

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from squish.api.anthropic_schemas import CountTokensRequest, MessagesRequest
from squish.api.common import JSONRoute, core, reply_headers, request_id, sse, stream_reply, whole_reply
from squish.api.errors import anthropic_body
from squish.serving.events import Done, ReasoningDelta, Reply, Restart, TextDelta, ToolCall, Usage

router = APIRouter(route_class=JSONRoute)

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


@router.post("/v1/messages")
async def messages(request: Request, body: MessagesRequest):
    c = core(request)
    plan = await c.prepare(body.to_job(), request_id(request))
    shapes = MessageShapes(c.model().name, len(plan.ids), omit_thinking=body.omits_thinking())
    if body.stream:
        return stream_reply(request, plan, shapes)
    reply = await whole_reply(request, plan)
    if reply is None:
        return Response(status_code=499)
    return JSONResponse(shapes.whole(reply), headers=reply_headers(reply))


@router.post("/v1/messages/count_tokens")
async def count_tokens(request: Request, body: CountTokensRequest):
    return {"input_tokens": await core(request).count_tokens(body.to_job())}


def signature(thinking: str) -> str:
    return "squish-sha256:" + hashlib.sha256(thinking.encode("utf-8")).hexdigest()


def tool_use_id(call_id: str) -> str:
    """The core's call id in Anthropic's form (``toolu_...``)."""
    return "toolu_" + call_id.removeprefix("call_")


def stop_reason(done: Done | None) -> str:
    if done is None:
        return "end_turn"
    if done.finish_reason == "stop" and done.stop_sequence is not None:
        return "stop_sequence"
    return STOP_REASONS.get(done.finish_reason, "end_turn")


def usage(u: Usage) -> dict:
    """Anthropic's usage: ``input_tokens`` excludes the prompt tokens read from the prefix
    cache (``cache_read_input_tokens``); Squish's cache is filled as a side effect of every
    request, so nothing counts as ``cache_creation_input_tokens``."""
    return {"input_tokens": u.prompt_tokens - u.cached_tokens, "output_tokens": u.completion_tokens,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": u.cached_tokens,
            "output_tokens_details": {"thinking_tokens": u.reasoning_tokens}}


class MessageShapes:
    """One message: the whole body, or a ``StreamEncoder`` of its events."""

    def __init__(self, model: str, prompt_tokens: int, omit_thinking: bool = False):
        self.id = "msg_" + secrets.token_hex(12)
        self.model, self.prompt_tokens, self.omit = model, prompt_tokens, omit_thinking
        self.index = -1  # the newest block's index
        self.open: str | None = None  # the kind of the block still open: "thinking" | "text"
        self.thought: list[str] = []  # the open thinking block's text (for its signature)

    def _message(self, content: list, reason: str | None, sequence: str | None, u: dict) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": reason, "stop_sequence": sequence, "usage": u}

    # StreamEncoder
    @staticmethod
    def _sse(kind: str, **data) -> bytes:
        return sse({"type": kind, **data}, event=kind)

    def _delta(self, delta: dict) -> bytes:
        return self._sse("content_block_delta", index=self.index, delta=delta)

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        out = []
        if self.open == "thinking":
            out.append(self._delta({"type": "signature_delta", "signature": signature("".join(self.thought))}))
            self.thought = []
        out.append(self._sse("content_block_stop", index=self.index))
        self.open = None
        return out

    def _start(self, block: dict) -> list[bytes]:
        out = self._close()
        self.index += 1
        out.append(self._sse("content_block_start", index=self.index, content_block=block))
        return out

    def start(self):
        u = {"input_tokens": self.prompt_tokens, "output_tokens": 0, "cache_creation_input_tokens": 0,
             "cache_read_input_tokens": 0}
        return [self._sse("message_start", message=self._message([], None, None, u)), self._sse("ping")]

    def event(self, ev):
        if isinstance(ev, ReasoningDelta):
            out = []
            if self.open != "thinking":
                out = self._start({"type": "thinking", "thinking": "", "signature": ""})
                self.open = "thinking"
            self.thought.append(ev.text)
            if not self.omit:
                out.append(self._delta({"type": "thinking_delta", "thinking": ev.text}))
            return out
        if isinstance(ev, TextDelta):
            if ev.replay or not ev.text:
                return []
            out = []
            if self.open != "text":
                out = self._start({"type": "text", "text": ""})
                self.open = "text"
            out.append(self._delta({"type": "text_delta", "text": ev.text}))
            return out
        if isinstance(ev, ToolCall):
            out = self._start({"type": "tool_use", "id": tool_use_id(ev.id), "name": ev.name, "input": {}})
            out.append(self._delta({"type": "input_json_delta", "partial_json": ev.arguments}))
            out.append(self._sse("content_block_stop", index=self.index))
            return out
        if isinstance(ev, Restart):  # the retry's output opens new blocks
            return self._close()
        if isinstance(ev, Done):
            out = self._close()
            out.append(self._sse("message_delta", delta={"stop_reason": stop_reason(ev),
                                                         "stop_sequence": ev.stop_sequence},
                                 usage=usage(ev.usage)))
            out.append(self._sse("message_stop"))
            return out
        return []

    def error(self, exc):
        return [sse(anthropic_body(exc.status, exc.message), event="error")]

    # whole reply
    def whole(self, reply: Reply) -> dict:
        content: list[dict] = []
        if reply.reasoning:
            content.append({"type": "thinking", "thinking": "" if self.omit else reply.reasoning,
                            "signature": signature(reply.reasoning)})
        if reply.content:
            content.append({"type": "text", "text": reply.content})
        for c in reply.tool_calls:
            content.append({"type": "tool_use", "id": tool_use_id(c.id), "name": c.name,
                            "input": json.loads(c.arguments)})
        sequence = reply.done.stop_sequence if reply.done is not None else None
        return self._message(content, stop_reason(reply.done), sequence, usage(reply.usage))
