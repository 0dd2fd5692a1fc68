"""OpenAI Responses objects, whole and streamed, from the core's events.

A response's ``output`` holds, in order: a ``reasoning`` item when the model
wrote a thinking section (its text in ``content`` as ``reasoning_text``; also
as the one ``summary_text`` part when the request set ``reasoning.summary``,
since a served model writes no separate summary; and as ``encrypted_content``
when ``include`` asks for it), a ``message`` item with one ``output_text`` part
(present when there is text, or when there are no calls), and one
``function_call`` item per call. A reply cut by ``max_output_tokens`` is
``status: "incomplete"`` with ``incomplete_details.reason "max_output_tokens"``,
and the item it cut is ``incomplete`` too.

Streams (SSE, ``event: <type>``, every event with a ``sequence_number``; no
``[DONE]``): ``response.created``, ``response.in_progress``; per item
``response.output_item.added`` … ``response.output_item.done``, with, for a
message, ``response.content_part.added``, ``response.output_text.delta``…,
``response.output_text.done``, ``response.content_part.done``; for reasoning
the same with ``reasoning_text`` parts and ``response.reasoning_text.delta`` /
``.done`` (plus ``response.reasoning_summary_part.added`` /
``response.reasoning_summary_text.delta`` / ``.done`` /
``response.reasoning_summary_part.done`` with ``reasoning.summary``); for a
call ``response.function_call_arguments.delta`` (the whole arguments: calls
are sent once validated) and ``.done``; then ``response.completed`` or
``response.incomplete`` with the whole response. An error after the start
sends an ``error`` event, then ``response.failed``. A corrective retry
(``Restart``) closes the open item; what was sent stays in the output.
"""

from __future__ import annotations

import copy
import secrets
import time
from typing import Callable

from squish.api.common import sse
from squish.api.openai_responses_items import encrypt, new_item_id
from squish.api.openai_responses_schemas import FormatText, ResponseRequest
from squish.api.openai_shapes import chat_logprobs
from squish.serving.errors import ServeError
from squish.serving.events import Done, ReasoningDelta, Reply, Restart, TextDelta, ToolCall, Usage


def new_response_id() -> str:
    return f"resp_{secrets.token_hex(24)}"


def usage(u: Usage) -> dict:
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
            "total_tokens": u.total_tokens}


def error_code(status: int) -> str:
    """A ``response.error.code`` of OpenAI's set for an HTTP status."""
    return "rate_limit_exceeded" if status == 429 else "invalid_prompt" if 400 <= status < 500 else "server_error"


def echo(body: ResponseRequest, rid: str, created: int, model: str) -> dict:
    """The response object's fields that echo the request (status ``in_progress``, no output yet)."""
    fmt = body.text.format if body.text is not None and body.text.format is not None else FormatText(type="text")
    r = body.reasoning
    return {
        "id": rid, "object": "response", "created_at": created, "status": "in_progress", "background": False,
        "error": None, "incomplete_details": None, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "max_tool_calls": None, "model": model, "output": [],
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id, "prompt_cache_key": body.prompt_cache_key,
        "reasoning": {"effort": r.effort if r else None, "summary": body.summary},
        "safety_identifier": body.safety_identifier, "service_tier": "default", "store": body.store is not False,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": fmt.model_dump(by_alias=True, exclude_none=True), "verbosity": "medium"},
        "tool_choice": "auto" if body.tool_choice is None else body.tool_choice,
        "tools": [t.echo() for t in body.function_tools()], "top_logprobs": body.top_logprobs or 0,
        "top_p": 1.0 if body.top_p is None else body.top_p, "truncation": "disabled", "usage": None,
        "user": body.user, "metadata": body.metadata or {},
    }


class ResponseShapes:
    """One response: the whole object, or a ``StreamEncoder`` of its events.

    ``on_final(response)`` is called with the finished object (completed or incomplete), e.g.
    to store it."""

    def __init__(self, body: ResponseRequest, model: str, on_final: Callable[[dict], None] = lambda r: None):
        self.id, self.created = new_response_id(), int(time.time())
        self.base = echo(body, self.id, self.created, model)
        self.summary = body.summary is not None
        self.encrypted = "reasoning.encrypted_content" in (body.include or ())
        self.logprobs = body.logprobs
        self.on_final = on_final
        self.seq = 0
        self.output: list[dict] = []
        self.cur: dict | None = None  # the open item: {"kind", "index", "id", "text": [...], "logprobs": [...]}

    # ---- items ---------------------------------------------------------------------------------------
    def _reasoning(self, rid: str, text: str, status: str) -> dict:
        d = {"id": rid, "type": "reasoning", "summary": [{"type": "summary_text", "text": text}] if self.summary else [],
             "content": [{"type": "reasoning_text", "text": text}], "status": status}
        if self.encrypted:
            d["encrypted_content"] = encrypt(text)
        return d

    def _message(self, mid: str, text: str, logprobs: list, status: str) -> dict:
        return {"id": mid, "type": "message", "status": status, "role": "assistant",
                "content": [self._text_part(text, logprobs)]}

    def _text_part(self, text: str, logprobs: list) -> dict:
        return {"type": "output_text", "text": text, "annotations": [],
                "logprobs": chat_logprobs(logprobs)["content"] if self.logprobs else []}

    @staticmethod
    def _call(fid: str, c: ToolCall, status: str = "completed") -> dict:
        return {"id": fid, "type": "function_call", "status": status, "arguments": c.arguments, "call_id": c.id,
                "name": c.name}

    def _final(self, output: list[dict], done: Done) -> dict:
        r = copy.deepcopy(self.base)
        incomplete = done.finish_reason == "length"
        r.update(status="incomplete" if incomplete else "completed", output=output, usage=usage(done.usage),
                 incomplete_details={"reason": "max_output_tokens"} if incomplete else None)
        if not incomplete:
            r["completed_at"] = int(time.time())
        self.on_final(r)
        return r

    # ---- whole reply ---------------------------------------------------------------------------------
    def whole(self, reply: Reply) -> dict:
        cut = reply.finish_reason == "length" and not reply.tool_calls
        out = []
        if reply.reasoning:
            out.append(self._reasoning(new_item_id("rs"), reply.reasoning,
                                       "incomplete" if cut and not reply.content else "completed"))
        if reply.content or not reply.tool_calls:
            out.append(self._message(new_item_id("msg"), reply.content, reply.logprobs,
                                     "incomplete" if cut else "completed"))
        out.extend(self._call(new_item_id("fc"), c) for c in reply.tool_calls)
        return self._final(out, reply.done or Done("stop", reply.usage))

    # ---- StreamEncoder -------------------------------------------------------------------------------
    def _ev(self, kind: str, **fields) -> bytes:
        obj = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse(obj, event=kind)

    def _lifecycle(self, kind: str, response: dict) -> bytes:
        return self._ev(kind, response=response)

    def start(self):
        return [self._lifecycle("response.created", self.base), self._lifecycle("response.in_progress", self.base)]

    def _open(self, kind: str) -> list[bytes]:
        out = self._close() if self.cur is not None and self.cur["kind"] != kind else []
        if self.cur is not None:
            return out
        index, iid = len(self.output), new_item_id("rs" if kind == "reasoning" else "msg")
        self.cur = {"kind": kind, "index": index, "id": iid, "text": [], "logprobs": []}
        self.output.append({})  # filled when the item closes
        where = {"item_id": iid, "output_index": index}
        if kind == "reasoning":
            item = self._reasoning(iid, "", "in_progress")
            item["summary"] = []
            out.append(self._ev("response.output_item.added", output_index=index, item=item))
            out.append(self._ev("response.content_part.added", **where, content_index=0,
                                part={"type": "reasoning_text", "text": ""}))
            if self.summary:
                out.append(self._ev("response.reasoning_summary_part.added", **where, summary_index=0,
                                    part={"type": "summary_text", "text": ""}))
        else:
            item = self._message(iid, "", [], "in_progress")
            item["content"] = []
            out.append(self._ev("response.output_item.added", output_index=index, item=item))
            out.append(self._ev("response.content_part.added", **where, content_index=0,
                                part=self._text_part("", [])))
        return out

    def _close(self, status: str = "completed") -> list[bytes]:
        cur, self.cur = self.cur, None
        if cur is None:
            return []
        text, where = "".join(cur["text"]), {"item_id": cur["id"], "output_index": cur["index"]}
        out = []
        if cur["kind"] == "reasoning":
            item = self._reasoning(cur["id"], text, status)
            out.append(self._ev("response.reasoning_text.done", **where, content_index=0, text=text))
            out.append(self._ev("response.content_part.done", **where, content_index=0,
                                part={"type": "reasoning_text", "text": text}))
            if self.summary:
                part = {"type": "summary_text", "text": text}
                out.append(self._ev("response.reasoning_summary_text.done", **where, summary_index=0, text=text))
                out.append(self._ev("response.reasoning_summary_part.done", **where, summary_index=0, part=part))
        else:
            item = self._message(cur["id"], text, cur["logprobs"], status)
            part = item["content"][0]
            out.append(self._ev("response.output_text.done", **where, content_index=0, text=text,
                                logprobs=part["logprobs"]))
            out.append(self._ev("response.content_part.done", **where, content_index=0, part=part))
        self.output[cur["index"]] = item
        out.append(self._ev("response.output_item.done", output_index=cur["index"], item=item))
        return out

    def event(self, ev):
        if isinstance(ev, ReasoningDelta) and ev.text:
            out = self._open("reasoning")
            self.cur["text"].append(ev.text)
            where = {"item_id": self.cur["id"], "output_index": self.cur["index"]}
            out.append(self._ev("response.reasoning_text.delta", **where, content_index=0, delta=ev.text))
            if self.summary:
                out.append(self._ev("response.reasoning_summary_text.delta", **where, summary_index=0, delta=ev.text))
            return out
        if isinstance(ev, TextDelta) and not ev.replay and (ev.text or ev.logprobs):
            out = self._open("message")
            self.cur["text"].append(ev.text)
            self.cur["logprobs"].extend(ev.logprobs)
            lp = chat_logprobs(ev.logprobs)["content"] if self.logprobs else []
            out.append(self._ev("response.output_text.delta", item_id=self.cur["id"], output_index=self.cur["index"],
                                content_index=0, delta=ev.text, logprobs=lp))
            return out
        if isinstance(ev, ToolCall):
            out = self._close()
            index, fid = len(self.output), new_item_id("fc")
            item = self._call(fid, ev)
            self.output.append(item)
            where = {"item_id": fid, "output_index": index}
            out.append(self._ev("response.output_item.added", output_index=index,
                                item={**item, "arguments": "", "status": "in_progress"}))
            out.append(self._ev("response.function_call_arguments.delta", **where, delta=ev.arguments))
            out.append(self._ev("response.function_call_arguments.done", **where, arguments=ev.arguments))
            out.append(self._ev("response.output_item.done", output_index=index, item=item))
            return out
        if isinstance(ev, Restart):
            return self._close()
        if isinstance(ev, Done):
            return self._done(ev)
        return []

    def _done(self, ev: Done) -> list[bytes]:
        cut = ev.finish_reason == "length"
        has_call = any(i.get("type") == "function_call" for i in self.output)
        out = self._close("incomplete" if cut else "completed")
        if not has_call and not any(i.get("type") == "message" for i in self.output):
            out += self._open("message")  # no text and no call: an empty message, as a whole reply has
            out += self._close("incomplete" if cut else "completed")
        response = self._final(list(self.output), ev)
        out.append(self._lifecycle("response.incomplete" if cut else "response.completed", response))
        return out

    def error(self, exc: ServeError):
        out = self._close("incomplete")
        r = copy.deepcopy(self.base)
        r.update(status="failed", output=list(self.output),
                 error={"code": error_code(exc.status), "message": exc.message})
        out.append(self._ev("error", code=exc.code, message=exc.message, param=exc.param))
        out.append(self._lifecycle("response.failed", r))
        return out
