"""OpenAI Chat Completions / Completions bodies, whole and streamed, from the core's events.

SSE framing: each event is ``data: <json>\\n\\n``; a successful stream ends with
``data: [DONE]\\n\\n``. A stream that fails after it started sends one
``data: {"error": {...}}`` event (OpenAI clients raise on it) and ends without
``[DONE]``. Reasoning (models with a thinking section) goes to
``message.reasoning_content`` / ``delta.reasoning_content``, as the
DeepSeek-style OpenAI servers send it. Tool calls stream as two fragments
each: ``{"index", "id", "type", "function": {"name", "arguments": ""}}``, then
``{"index", "function": {"arguments": "<the whole JSON>"}}``.
"""

from __future__ import annotations

import secrets
import time

from squish.api.common import SSE_DONE, sse
from squish.api.errors import openai_body
from squish.runtime.sampling import TokenLogprob
from squish.serving.events import Done, ReasoningDelta, Reply, TextDelta, ToolCall, Usage

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI uses this floor as well


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _lp(v: float) -> float:
    return v if v > MIN_LOGPROB else MIN_LOGPROB


def usage(u: Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.total_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
    }


def chat_logprobs(items: list[TokenLogprob]) -> dict:
    def entry(tok: str, lp: float) -> dict:
        return {"token": tok, "logprob": _lp(lp), "bytes": list(tok.encode("utf-8"))}

    return {"content": [
        {**entry(i.token, i.logprob), "top_logprobs": [entry(t, v) for t, v in i.top]} for i in items
    ]}


class CompletionLogprobs:
    """Accumulates the legacy ``/v1/completions`` logprobs object."""

    def __init__(self):
        self.offset = 0

    def build(self, items: list[TokenLogprob]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i in items:
            out["tokens"].append(i.token)
            out["token_logprobs"].append(_lp(i.logprob))
            out["top_logprobs"].append({t: _lp(v) for t, v in i.top})
            out["text_offset"].append(self.offset)
            self.offset += len(i.token)
        return out


def tool_call_dict(c: ToolCall) -> dict:
    return {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}


class ChatShapes:
    """One chat completion: the whole body, or a ``StreamEncoder`` of its chunks."""

    def __init__(self, model: str, include_usage: bool = False, logprobs: bool = False):
        self.id, self.created, self.model = new_id("chatcmpl"), int(time.time()), model
        self.include_usage, self.logprobs = include_usage, logprobs

    def _chunk(self, choices: list, **extra) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
             "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        c.update(extra)
        return c

    def _delta(self, delta: dict, logprobs=None, finish=None) -> bytes:
        return sse(self._chunk([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]))

    # StreamEncoder
    def start(self):
        return [self._delta({"role": "assistant", "content": ""})]

    def event(self, ev):
        if isinstance(ev, TextDelta):
            if ev.replay or not (ev.text or ev.logprobs):
                return []
            lp = chat_logprobs(ev.logprobs) if self.logprobs and ev.logprobs else None
            return [self._delta({"content": ev.text}, lp)]
        if isinstance(ev, ReasoningDelta):
            return [self._delta({"reasoning_content": ev.text})]
        if isinstance(ev, ToolCall):
            head = {"index": ev.index, "id": ev.id, "type": "function",
                    "function": {"name": ev.name, "arguments": ""}}
            return [self._delta({"tool_calls": [head]}),
                    self._delta({"tool_calls": [{"index": ev.index, "function": {"arguments": ev.arguments}}]})]
        if isinstance(ev, Done):
            out = [self._delta({}, finish=ev.finish_reason)]
            if self.include_usage:
                out.append(sse(self._chunk([], usage=usage(ev.usage))))
            out.append(SSE_DONE)
            return out
        return []  # Restart: what was sent stays sent; the retry follows

    def error(self, exc):
        return [sse(openai_body(exc.status, exc.message, exc.param, exc.code))]

    # whole reply
    def whole(self, reply: Reply) -> dict:
        msg: dict = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            msg["content"] = reply.content or None
            msg["tool_calls"] = [tool_call_dict(c) for c in reply.tool_calls]
        if reply.reasoning:
            msg["reasoning_content"] = reply.reasoning
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": msg,
                             "logprobs": chat_logprobs(reply.logprobs) if self.logprobs else None,
                             "finish_reason": reply.finish_reason}],
                "usage": usage(reply.usage)}


class CompletionShapes:
    """One legacy text completion: the whole body, or a ``StreamEncoder`` of its chunks."""

    def __init__(self, model: str, include_usage: bool = False, logprobs: bool = False):
        self.id, self.created, self.model = new_id("cmpl"), int(time.time()), model
        self.include_usage, self.logprobs = include_usage, logprobs
        self._lp = CompletionLogprobs()

    def _chunk(self, choices: list, **extra) -> dict:
        c = {"id": self.id, "object": "text_completion", "created": self.created,
             "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        c.update(extra)
        return c

    def start(self):
        return []

    def event(self, ev):
        if isinstance(ev, TextDelta) and (ev.text or ev.logprobs):
            lp = self._lp.build(ev.logprobs) if self.logprobs and ev.logprobs else None
            return [sse(self._chunk([{"index": 0, "text": ev.text, "logprobs": lp, "finish_reason": None}]))]
        if isinstance(ev, Done):
            out = [sse(self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": ev.finish_reason}]))]
            if self.include_usage:
                out.append(sse(self._chunk([], usage=usage(ev.usage))))
            out.append(SSE_DONE)
            return out
        return []

    def error(self, exc):
        return [sse(openai_body(exc.status, exc.message, exc.param, exc.code))]

    def whole(self, reply: Reply) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": 0, "text": reply.content,
                             "logprobs": self._lp.build(reply.logprobs) if self.logprobs else None,
                             "finish_reason": reply.finish_reason}],
                "usage": usage(reply.usage)}
