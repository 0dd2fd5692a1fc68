"""The shortest reply a constraint admits, in tokens: a lower bound for ``max_tokens``.

A tool call (``required`` or a named function) or a JSON reply cannot be
shorter than its smallest valid instance: the family's call markers around
``{"name": ..., "arguments": {...}}`` with only the required keys, each at its
shortest value (``""``, ``0``, ``false``, the shortest enum member, ``minItems``
items, ``minLength`` characters), in the grammar's JSON style, plus the end of
sequence. ``min_tokens`` encodes that instance with the model's tokenizer and
takes ``SAFETY`` of its length, since the model may reach the same text in
fewer tokens than the tokenizer's own encoding. A ``max_tokens`` below it can
only end in a cut-off reply, so the core refuses it up front (400).
"""

from __future__ import annotations

import json
from typing import Any

from squish.tools.families.base import JSON_STYLE, TaggedFamily
from squish.tools.spec import OutputFormat, ToolChoice, ToolSpec

SAFETY = 0.8
MAX_DEPTH = 16
_UNKNOWN = object()


def shortest(schema: Any, depth: int = 0) -> Any:
    """A smallest instance of ``schema`` (best effort; ``_UNKNOWN`` where it cannot tell)."""
    if depth > MAX_DEPTH or not isinstance(schema, dict):
        return _UNKNOWN
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return min(schema["enum"], key=_size)
    for key in ("anyOf", "oneOf"):
        options = [shortest(s, depth + 1) for s in schema.get(key) or ()]
        options = [o for o in options if o is not _UNKNOWN]
        if options:
            return min(options, key=_size)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = "null" if "null" in kind else (kind[0] if kind else None)
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        out = {}
        for k in schema.get("required") or ():
            v = shortest(props.get(k, {}), depth + 1)
            out[k] = None if v is _UNKNOWN else v
        return out
    if kind == "array":
        n = schema.get("minItems") or 0
        item = shortest(schema.get("items", {}), depth + 1) if n else None
        return [None if item is _UNKNOWN else item] * n
    if kind == "string":
        return "x" * int(schema.get("minLength") or 0)
    if kind in ("integer", "number"):
        return 0
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return _UNKNOWN


def _size(v: Any) -> int:
    return len(_dumps(v)) if v is not _UNKNOWN else 1 << 30


def _dumps(v: Any) -> str:
    return json.dumps(v, ensure_ascii=False, separators=(JSON_STYLE["item_separator"], JSON_STYLE["key_separator"]))


def min_tokens(tokenizer, family: TaggedFamily, tools: list[ToolSpec], choice: ToolChoice,
               fmt: OutputFormat | None) -> int:
    """Tokens the shortest constrained reply needs (0 when nothing is forced: ``auto`` / ``none``)."""
    if fmt is not None:
        value = {} if fmt.schema is None else shortest(fmt.schema)
        texts = [_dumps({} if value is _UNKNOWN else value)]
    elif choice.mode in ("required", "function"):
        names = [t for t in tools if choice.mode == "required" or t.name == choice.name]
        texts = []
        for t in names:
            args = shortest(t.parameters)
            texts.append(family.format_call(t.name, {} if args is _UNKNOWN or not isinstance(args, dict) else args))
    else:
        return 0
    if not texts:
        return 0
    counts = [len(tokenizer.encode(s, add_special_tokens=False)) + 1 for s in texts]  # + end of sequence
    return max(1, int(min(counts) * SAFETY))
