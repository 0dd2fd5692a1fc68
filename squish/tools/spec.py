"""The request side: OpenAI ``tools``, ``tool_choice``, ``response_format``.

Pure Python (no MLX): the API calls these on the handler thread, before any
tokenization, so a bad schema or an unknown function name is a 400 up front.

Every JSON Schema is checked with ``jsonschema`` (the metaschema of the draft
it declares, 2020-12 by default); whether the grammar engine can compile it is
checked later by ``constraints`` (also a 400).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from squish.tools.errors import ToolRequestError

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_TOOLS = 128
EMPTY_PARAMETERS = {"type": "object", "properties": {}}
# Bounds on one schema, checked before anything recursive (jsonschema, the grammar compiler)
# walks it: 64 nested objects/arrays is ~30 levels of schema nesting, far beyond any tool's.
MAX_SCHEMA_DEPTH = 64
MAX_SCHEMA_NODES = 20_000


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict = field(default_factory=lambda: dict(EMPTY_PARAMETERS))
    strict: bool = False

    def openai(self) -> dict:
        """The tool in OpenAI shape, as chat templates expect it."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "none" | "auto" | "required" | "function"
    name: str | None = None


@dataclass(frozen=True)
class OutputFormat:
    """``response_format``: ``schema`` None means any JSON object (json_object)."""

    kind: str  # "json_object" | "json_schema"
    schema: dict | None = None
    name: str = "response"
    strict: bool = False


def _check_size(schema: Any, param: str) -> None:
    """Depth and node count of a JSON value, walked without recursion."""
    stack = [(schema, 1)]
    nodes = 0
    while stack:
        obj, depth = stack.pop()
        nodes += 1
        if depth > MAX_SCHEMA_DEPTH:
            raise ToolRequestError(f"{param} is nested more than {MAX_SCHEMA_DEPTH} levels deep", param)
        if nodes > MAX_SCHEMA_NODES:
            raise ToolRequestError(f"{param} has more than {MAX_SCHEMA_NODES} values; send a smaller schema", param)
        if isinstance(obj, dict):
            stack.extend((v, depth + 1) for v in obj.values())
        elif isinstance(obj, list):
            stack.extend((v, depth + 1) for v in obj)


def check_schema(schema: Any, param: str) -> dict:
    """Raise ``ToolRequestError`` unless ``schema`` is a valid JSON Schema object of bounded size."""
    import jsonschema

    if not isinstance(schema, dict):
        raise ToolRequestError(f"{param} must be a JSON Schema object, got {type(schema).__name__}", param)
    _check_size(schema, param)
    try:
        cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ToolRequestError(f"{param} is not a valid JSON Schema at {where}: {exc.message}", param) from None
    return schema


def _get(obj: Any, key: str, default: Any = None) -> Any:
    """Field access for plain dicts and pydantic models alike."""
    if isinstance(obj, dict):
        return obj.get(key, default)
    return getattr(obj, key, default)


def _plain(obj: Any) -> Any:
    if hasattr(obj, "model_dump"):
        return obj.model_dump(exclude_none=True)
    return obj


def parse_tools(tools: list | None) -> list[ToolSpec]:
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise ToolRequestError(f"at most {MAX_TOOLS} tools per request, got {len(tools)}", "tools")
    out: list[ToolSpec] = []
    seen: set[str] = set()
    for i, tool in enumerate(tools):
        tool = _plain(tool)
        param = f"tools[{i}]"
        if _get(tool, "type") != "function":
            raise ToolRequestError(f"{param}.type must be 'function', got {_get(tool, 'type')!r}", param)
        fn = _get(tool, "function")
        if not isinstance(fn, dict):
            raise ToolRequestError(f"{param}.function is required", f"{param}.function")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolRequestError(
                f"{param}.function.name must be 1-64 characters of a-z, A-Z, 0-9, _ or -, got {name!r}",
                f"{param}.function.name",
            )
        if name in seen:
            raise ToolRequestError(f"duplicate function name {name!r} in tools", f"{param}.function.name")
        seen.add(name)
        params = fn.get("parameters")
        params = dict(EMPTY_PARAMETERS) if params is None else check_schema(params, f"{param}.function.parameters")
        desc = fn.get("description") or ""
        if not isinstance(desc, str):
            raise ToolRequestError(f"{param}.function.description must be a string", f"{param}.function.description")
        strict = fn.get("strict", False)
        if not isinstance(strict, bool):
            raise ToolRequestError(f"{param}.function.strict must be a boolean", f"{param}.function.strict")
        out.append(ToolSpec(name, desc, close_objects(params) if strict else params, strict))
    return out


def parse_tool_choice(choice: Any, tools: list[ToolSpec]) -> ToolChoice:
    """OpenAI semantics: default ``auto`` with tools, ``none`` without."""
    choice = _plain(choice)
    if choice is None:
        return ToolChoice("auto" if tools else "none")
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolRequestError(
                f"tool_choice must be 'none', 'auto', 'required' or a function object, got {choice!r}",
                "tool_choice",
            )
        if choice != "none" and not tools:
            raise ToolRequestError(f"tool_choice {choice!r} needs a non-empty 'tools' list", "tool_choice")
        return ToolChoice(choice)
    fn = _get(choice, "function")
    name = _get(fn, "name") if fn is not None else None
    if _get(choice, "type") != "function" or not isinstance(name, str):
        raise ToolRequestError(
            "tool_choice object must be {\"type\": \"function\", \"function\": {\"name\": ...}}", "tool_choice"
        )
    known = [t.name for t in tools]
    if name not in known:
        raise ToolRequestError(
            f"tool_choice names function {name!r}, which is not in tools ({', '.join(known) or 'none given'})",
            "tool_choice",
        )
    return ToolChoice("function", name)


def parse_response_format(fmt: Any) -> OutputFormat | None:
    fmt = _plain(fmt)
    if fmt is None:
        return None
    kind = _get(fmt, "type")
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat("json_object")
    if kind == "json_schema":
        js = _get(fmt, "json_schema")
        if not isinstance(js, dict):
            raise ToolRequestError("response_format.json_schema is required for type 'json_schema'",
                                   "response_format.json_schema")
        name = js.get("name", "response")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ToolRequestError("response_format.json_schema.name must be 1-64 characters of a-z, A-Z, 0-9, _ or -",
                                   "response_format.json_schema.name")
        schema = js.get("schema")
        if schema is None:
            raise ToolRequestError("response_format.json_schema.schema is required",
                                   "response_format.json_schema.schema")
        check_schema(schema, "response_format.json_schema.schema")
        strict = js.get("strict", False)
        if not isinstance(strict, bool):
            raise ToolRequestError("response_format.json_schema.strict must be a boolean",
                                   "response_format.json_schema.strict")
        return OutputFormat("json_schema", close_objects(schema) if strict else schema, name, strict)
    raise ToolRequestError(
        f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}", "response_format.type"
    )


_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalItems", "contains", "not", "if", "then", "else")


def close_objects(schema: Any) -> Any:
    """``strict`` mode, as OpenAI's: every object schema that does not say otherwise admits
    no properties beyond its ``properties`` (``additionalProperties: false``). A copy; the
    schema's size was bounded by ``check_schema``."""
    if isinstance(schema, list):
        return [close_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {k: close_objects(v) for k, v in out[key].items()}
    for key in _SUBSCHEMA_LISTS + _SUBSCHEMA_ONE:
        if key in out:
            out[key] = close_objects(out[key])
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = close_objects(out["additionalProperties"])
    is_object = out.get("type") == "object" or (isinstance(out.get("type"), list) and "object" in out["type"]) \
        or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def call_schema(tool: ToolSpec, args_key: str = "arguments") -> dict:
    """The JSON Schema of one call object ``{"name": ..., "<args_key>": {...}}``."""
    return {
        "type": "object",
        "properties": {"name": {"const": tool.name}, args_key: tool.parameters},
        "required": ["name", args_key],
        "additionalProperties": False,
    }
