"""Response bodies in the OpenAI shapes, for both JSON and SSE.

SSE framing: each event is ``data: <json>\\n\\n``; a successful stream ends with
``data: [DONE]\\n\\n``. A stream that fails after it started sends one
``data: {"error": {...}}`` event (OpenAI clients raise on it) and ends without
``[DONE]``.
"""

from __future__ import annotations

import json
import secrets
import time

from squish.runtime.engine import Delta, Finish, TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf; OpenAI uses this floor as well


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def _lp(v: float) -> float:
    return v if v > MIN_LOGPROB else MIN_LOGPROB


def usage(fin: Finish) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": fin.cached_tokens},
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


class ChatShapes:
    def __init__(self, model: str, include_usage: bool, logprobs: bool):
        self.id, self.created, self.model = new_id("chatcmpl"), int(time.time()), model
        self.include_usage, self.logprobs = include_usage, logprobs

    def _chunk(self, choices: list, **extra) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
             "model": self.model, "system_fingerprint": None, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        c.update(extra)
        return c

    def first(self) -> dict:
        return self._chunk([{"index": 0, "delta": {"role": "assistant", "content": ""},
                             "logprobs": None, "finish_reason": None}])

    def delta(self, d: Delta) -> dict:
        lp = chat_logprobs(d.logprobs) if self.logprobs and d.logprobs else None
        return self._chunk([{"index": 0, "delta": {"content": d.text}, "logprobs": lp,
                             "finish_reason": None}])

    def last(self, fin: Finish) -> dict:
        return self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": fin.reason}])

    def usage_chunk(self, fin: Finish) -> dict:
        return self._chunk([], usage=usage(fin))

    def content(self, text: str) -> dict:
        return self._chunk([{"index": 0, "delta": {"content": text}, "logprobs": None, "finish_reason": None}])

    def tool_calls(self, fragments: list[dict]) -> dict:
        """``delta.tool_calls`` fragments (``squish.tools.stream.ToolCallDelta.openai()``)."""
        return self._chunk([{"index": 0, "delta": {"tool_calls": fragments}, "logprobs": None,
                             "finish_reason": None}])

    def finish(self, reason: str) -> dict:
        return self._chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": reason}])

    def message(self, content: str | None, tool_calls: list[dict], reason: str, fin: Finish) -> dict:
        """A non-streamed reply of the tool / structured-output path."""
        msg: dict = {"role": "assistant", "content": content}
        if tool_calls:
            msg["tool_calls"] = tool_calls
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": msg, "logprobs": None, "finish_reason": reason}],
                "usage": usage(fin)}

    def full(self, text: str, lps: list[TokenLogprob], fin: Finish) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": chat_logprobs(lps) if self.logprobs else None,
                             "finish_reason": fin.reason}],
                "usage": usage(fin)}


class CompletionShapes:
    def __init__(self, model: str, include_usage: bool, logprobs: bool):
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

    def first(self) -> dict | None:
        return None

    def delta(self, d: Delta) -> dict:
        lp = self._lp.build(d.logprobs) if self.logprobs and d.logprobs else None
        return self._chunk([{"index": 0, "text": d.text, "logprobs": lp, "finish_reason": None}])

    def last(self, fin: Finish) -> dict:
        return self._chunk([{"index": 0, "text": "", "logprobs": None, "finish_reason": fin.reason}])

    def usage_chunk(self, fin: Finish) -> dict:
        return self._chunk([], usage=usage(fin))

    def full(self, text: str, lps: list[TokenLogprob], fin: Finish) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created,
                "model": self.model, "system_fingerprint": None,
                "choices": [{"index": 0, "text": text,
                             "logprobs": self._lp.build(lps) if self.logprobs else None,
                             "finish_reason": fin.reason}],
                "usage": usage(fin)}
