"""Mistral: ``[TOOL_CALLS]`` then a JSON list of calls (v3 templates), or
``[TOOL_CALLS]name[ARGS]{...}`` per call (v11+ templates). Parsing accepts
both; the grammar produces the list form.
"""

from __future__ import annotations

import json

from squish.tools.families.base import (
    ParsedCall,
    ParseResult,
    TaggedFamily,
    call_from_json,
    calls_from_json_text,
    json_lit,
    json_rule,
)
from squish.tools.spec import call_schema

TOOL_CALLS = "[TOOL_CALLS]"
ARGS = "[ARGS]"


class _Mistral(TaggedFamily):
    def matches(self, model_type: str, template: str) -> bool:
        return TOOL_CALLS in template

    def parse(self, text: str) -> ParseResult:
        i = text.find(TOOL_CALLS)
        if i < 0:
            return ParseResult(text.strip())
        content = text[:i].strip()
        calls: list[ParsedCall] = []
        for seg in text[i:].split(TOOL_CALLS)[1:]:
            seg = seg.split("</s>", 1)[0]
            if ARGS in seg:
                name, _, args = seg.partition(ARGS)
                try:
                    calls.append(call_from_json({"name": name.strip(), "arguments": json.loads(args)}))
                except json.JSONDecodeError as exc:
                    calls.append(ParsedCall(name.strip(), "", f"the arguments are not valid JSON: {exc.msg}"))
            else:
                calls.extend(calls_from_json_text(seg))
        return ParseResult(content, calls)

    def format_call(self, name: str, arguments: dict) -> str:
        return TOOL_CALLS + json.dumps([{"name": name, "arguments": arguments}], ensure_ascii=False)

    def grammar(self, tools, parallel, lit=json_lit, lenient=False) -> str:
        arr = {"type": "array", "minItems": 1, "items": {"anyOf": [call_schema(t) for t in tools]}}
        if not parallel:
            arr["maxItems"] = 1
        return f"start: {lit(TOOL_CALLS)} arr\narr: {json_rule(arr, lenient)}\n"


FAMILY = _Mistral(name="mistral", start=TOOL_CALLS, end="")
