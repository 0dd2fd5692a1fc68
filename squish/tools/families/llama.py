"""Llama 3.x JSON tool calling.

The template asks for ``{"name": ..., "parameters": {...}}`` as the whole
reply; built-in tools use ``<|python_tag|>`` before the JSON, and the turn ends
with ``<|eom_id|>`` or ``<|eot_id|>``. Several calls are separated by ``;``.
"""

from __future__ import annotations

import json

from squish.tools.families.base import (
    ParseResult,
    TaggedFamily,
    calls_from_json_text,
    json_lit,
    json_rule,
)
from squish.tools.spec import call_schema

PYTHON_TAG = "<|python_tag|>"


class _Llama(TaggedFamily):
    def matches(self, model_type: str, template: str) -> bool:
        return "<|python_tag|>" in template or ("<|start_header_id|>" in template and "parameters" in template)

    def find_start(self, text: str) -> int:
        i = text.find(PYTHON_TAG)
        if i >= 0:
            return i
        stripped = text.lstrip()
        return len(text) - len(stripped) if stripped.startswith("{") else -1

    def parse(self, text: str) -> ParseResult:
        i = self.find_start(text)
        if i < 0:
            return ParseResult(text.strip())
        content = text[:i].strip()
        body = text[i:].removeprefix(PYTHON_TAG)
        for stop in ("<|eom_id|>", "<|eot_id|>"):
            body = body.split(stop, 1)[0]
        calls = []
        for part in _split_calls(body):
            calls.extend(calls_from_json_text(part, ("parameters", "arguments")))
        return ParseResult(content, calls)

    def format_call(self, name: str, arguments: dict) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)

    def grammar(self, tools, parallel, lit=json_lit, lenient=False) -> str:
        any_call = {"anyOf": [call_schema(t, "parameters") for t in tools]}
        rep = ' ("; " obj)*' if parallel else ""
        return f"start: obj{rep}\nobj: {json_rule(any_call, lenient)}\n"


def _split_calls(body: str) -> list[str]:
    """Split ``{...}; {...}`` at top-level semicolons (JSON strings may hold ';')."""
    parts, depth, in_str, esc, start = [], 0, False, False, 0
    for i, ch in enumerate(body):
        if in_str:
            esc = (ch == "\\") and not esc
            if ch == '"' and not esc:
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == ";" and depth == 0:
            parts.append(body[start:i])
            start = i + 1
    parts.append(body[start:])
    return [p for p in parts if p.strip()]


FAMILY = _Llama(name="llama3", start=PYTHON_TAG, end="", args_key="parameters")
