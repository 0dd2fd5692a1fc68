"""Validation of calls and JSON outputs with ``jsonschema`` (never hand-written checks).

Each check returns ``None`` when valid, else ``(cause, message)``: the cause is
a ``loop`` metric label, the message names the error and where it is (a
corrective message quotes it to the model). JSON is parsed strictly: NaN and
±Infinity literals are rejected, as JSON does not have them.
"""

from __future__ import annotations

import json
from functools import lru_cache

from squish.tools.families.base import ParsedCall
from squish.tools.spec import ToolSpec

PARSE, SCHEMA, UNKNOWN_TOOL, NO_CALL = "parse_error", "schema_error", "unknown_tool", "no_call"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str):
    return json.loads(text, parse_constant=_reject_constant)


@lru_cache(maxsize=256)
def _validator(schema_json: str):
    import jsonschema

    schema = json.loads(schema_json)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def schema_error(instance, schema: dict) -> str | None:
    """The most relevant validation error, naming its JSON path, or None."""
    import jsonschema

    v = _validator(json.dumps(schema, sort_keys=True))
    err = jsonschema.exceptions.best_match(v.iter_errors(instance))
    if err is None:
        return None
    path = "$" + "".join(f"[{p!r}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
    return f"{path}: {err.message}"


def check_call(call: ParsedCall, tools: dict[str, ToolSpec]) -> tuple[str, str] | None:
    if call.error is not None:
        return PARSE, call.error
    tool = tools.get(call.name)
    if tool is None:
        return UNKNOWN_TOOL, f"there is no function named {call.name!r} (available: {', '.join(tools)})"
    try:
        args = loads_strict(call.arguments)
    except ValueError as exc:
        return PARSE, f"the arguments of {call.name!r} are not valid JSON: {exc}"
    err = schema_error(args, tool.parameters)
    if err is not None:
        return SCHEMA, f"the arguments of {call.name!r} do not match its schema: {err}"
    return None


def check_json_output(text: str, schema: dict | None):
    """``(value, None)`` when ``text`` is one JSON object (valid against ``schema``), else ``(None, (cause, msg))``."""
    try:
        value = loads_strict(text.strip())
    except ValueError as exc:
        return None, (PARSE, f"the reply is not valid JSON: {exc}")
    if schema is None:
        if not isinstance(value, dict):
            return None, (SCHEMA, f"the reply must be a JSON object, got {type(value).__name__}")
        return value, None
    err = schema_error(value, schema)
    if err is not None:
        return None, (SCHEMA, f"the reply does not match the schema: {err}")
    return value, None
