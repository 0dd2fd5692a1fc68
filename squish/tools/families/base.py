"""What a model family is to the tool layer, and the shared parsing helpers.

A family says how calls look in the model's output (markers around a JSON
call or a JSON list of calls), how to parse them back into OpenAI
``tool_calls``, how to write calls back into a prompt, and the Lark grammar
(llguidance dialect) that constrains a call block. Adding a family is one
``TaggedFamily`` (a module of its own, or beside its kin in ``hermes``), listed in
``registry.FAMILIES``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable

from squish.tools.spec import ToolSpec, call_schema

# Compact-but-natural JSON the grammar admits: ", " and ": " as models write
# them, no free whitespace (a weak model would otherwise pad with newlines).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass
class ParsedCall:
    """One call as the model wrote it. ``arguments`` is a JSON string when
    ``error`` is None; otherwise ``error`` says what was wrong."""

    name: str
    arguments: str
    error: str | None = None


@dataclass
class ParseResult:
    content: str
    calls: list[ParsedCall] = field(default_factory=list)


def call_from_json(obj, args_keys: tuple[str, ...] = ("arguments", "parameters")) -> ParsedCall:
    """``{"name": ..., "arguments": {...}}`` (or a stringified arguments object)."""
    if not isinstance(obj, dict):
        return ParsedCall("", "", f"a call must be a JSON object, got {type(obj).__name__}")
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return ParsedCall("", "", "the call has no \"name\" string")
    key = next((k for k in args_keys if k in obj), None)
    if key is None:
        return ParsedCall(name, "", f"the call to {name!r} has no \"{args_keys[0]}\" object")
    args = obj[key]
    if isinstance(args, str):  # some models stringify the arguments object
        try:
            args = json.loads(args)
        except json.JSONDecodeError as exc:
            return ParsedCall(name, "", f"the arguments of {name!r} are not valid JSON: {exc.msg}")
    if not isinstance(args, dict):
        return ParsedCall(name, "", f"the arguments of {name!r} must be a JSON object")
    return ParsedCall(name, json.dumps(args, ensure_ascii=False))


def find_end(text: str, marker: str, start: int = 0) -> int:
    """Index of the first ``marker`` at or after ``start`` that is not inside a JSON string,
    or -1. The grammar lets a model write the marker's characters inside a string value
    (SmolLM2: ``"capital": "USA}}</tool_call>`` with the string still open); only the marker
    after the JSON ends the call."""
    in_string = escaped = False
    for i in range(start, len(text)):
        c = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
        elif c == '"':
            in_string = True
        elif text.startswith(marker, i):
            return i
    return -1


def calls_from_json_text(text: str, args_keys=("arguments", "parameters")) -> list[ParsedCall]:
    """A JSON call object or a JSON list of them; a parse error becomes one failed call."""
    text = text.strip()
    try:
        obj, end = json.JSONDecoder().raw_decode(text)
    except json.JSONDecodeError as exc:
        return [ParsedCall("", "", f"the tool call is not valid JSON: {exc.msg} at character {exc.pos}")]
    if text[end:].strip():
        return [ParsedCall("", "", f"unexpected text after the tool call JSON: {text[end:end + 40]!r}")]
    objs = obj if isinstance(obj, list) else [obj]
    if not objs:
        return [ParsedCall("", "", "the tool call list is empty")]
    return [call_from_json(o, args_keys) for o in objs]


def json_lit(text: str) -> str:
    """A Lark string literal (JSON string syntax is a valid Lark string)."""
    return json.dumps(text)


def json_rule(schema: dict, lenient: bool = False) -> str:
    """A Lark ``%json`` body constrained to ``schema`` in ``JSON_STYLE``.

    ``lenient`` makes the grammar engine skip keywords it does not implement
    (the output is then still checked by ``validate``)."""
    return "%json " + json.dumps({**schema, "x-guidance": {**JSON_STYLE, "lenient": lenient}})


@dataclass(frozen=True)
class TaggedFamily:
    """Calls as ``START <json call> END``, one block per call (Hermes / Qwen style).

    The block may also hold a JSON list of calls. Text outside blocks is content.
    """

    name: str
    start: str = "<tool_call>"
    end: str = "</tool_call>"
    args_key: str = "arguments"
    separator: str = "\n"
    # Substrings of a chat template that identify this family's native format.
    template_markers: tuple[str, ...] = ()

    def matches(self, model_type: str, template: str) -> bool:
        return bool(self.template_markers) and all(m in template for m in self.template_markers)

    # -- output -> calls ----------------------------------------------------
    def find_start(self, text: str) -> int:
        """Index where a call block starts in ``text``, or -1."""
        return text.find(self.start)

    def parse(self, text: str) -> ParseResult:
        content: list[str] = []
        calls: list[ParsedCall] = []
        pos = 0
        while True:
            i = text.find(self.start, pos)
            if i < 0:
                content.append(text[pos:])
                break
            content.append(text[pos:i])
            body_at = i + len(self.start)
            j = find_end(text, self.end, body_at) if self.end else -1
            if j < 0:
                calls.extend(self.parse_block(text[body_at:], closed=not self.end))
                break
            calls.extend(self.parse_block(text[body_at:j], closed=True))
            pos = j + len(self.end)
        return ParseResult("".join(content).strip(), calls)

    def parse_block(self, block: str, closed: bool) -> list[ParsedCall]:
        calls = calls_from_json_text(block, (self.args_key, "arguments", "parameters"))
        if not closed:
            for c in calls:
                c.error = c.error or f"the tool call was not closed with {self.end}"
        return calls

    # -- calls -> prompt text -------------------------------------------------
    def format_call(self, name: str, arguments: dict) -> str:
        body = json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)
        return f"{self.start}\n{body}\n{self.end}"

    # -- grammar ----------------------------------------------------------
    def grammar(self, tools: list[ToolSpec], parallel: bool, lit: Callable[[str], str] = json_lit,
                lenient: bool = False) -> str:
        """Lark grammar of the whole output: one call block, or several if ``parallel``."""
        any_call = {"anyOf": [call_schema(t, self.args_key) for t in tools]}
        rep = f" ({json_lit(self.separator)} call)*" if parallel else ""
        return (
            f"start: call{rep}\n"
            f"call: {lit(self.start)} \"\\n\" obj \"\\n\" {lit(self.end)}\n"
            f"obj: {json_rule(any_call, lenient)}\n"
        )
