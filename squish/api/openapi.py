"""The served OpenAPI document (``GET /openapi.json``) says what the server really answers.

FastAPI derives each route's request body from the adapter's pydantic model, but on its
own it documents a ``200 application/json`` and a ``422`` in FastAPI's ``{"detail": [...]}``
shape for every route. This server answers otherwise: errors in each protocol's own shape
(``squish.api.errors``: OpenAI, Anthropic, Ollama) with more statuses, streamed replies as
server-sent events (Ollama: NDJSON), and every route but ``/health`` needs the API key when
one is set. ``install(app, keyed)`` rewrites FastAPI's document once, for every route the
app mounts, so a new adapter's routes are documented without being listed here:

- every operation: ``500`` (an unhandled error, in the protocol's shape), ``401`` with a key
  (except ``/health``), ``429`` with ``Retry-After`` where the rate limit applies;
- an operation with a request body: ``400`` (unsupported parameter, bad value, a rule the
  schema cannot express), ``404`` (model not served), ``413``, ``422`` (wrong type or range,
  in place of FastAPI's shape), ``503`` (busy or loading; ``Retry-After``), ``504`` (timeout);
- a path with parameters: ``404``; ``/health``: ``503`` while the model loads;
- a request body with a ``stream`` field: the ``200`` in the protocol's stream media type too;
- with a key: the ``Authorization: Bearer`` and ``x-api-key`` schemes;
- integer bounds as integers (FastAPI's document model makes them floats).

A route that documents a status itself keeps its own entry. ``benchmarks/reliability.py``
(the fuzz part) checks every reply the server gives against this document.
"""

from __future__ import annotations

from typing import Any

from squish.api.errors import protocol
from squish.api.middleware import OPEN_PATHS, UNLIMITED_PATHS

ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "OpenAIError": {
        "type": "object", "required": ["error"],
        "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"],
            "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                           "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
    },
    "AnthropicError": {
        "type": "object", "required": ["type", "error"],
        "properties": {"type": {"const": "error"}, "error": {
            "type": "object", "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}}}},
    },
    "OllamaError": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
}
_SCHEMA_OF = {"openai": "OpenAIError", "anthropic": "AnthropicError", "ollama": "OllamaError"}
STREAM_MEDIA = {"openai": "text/event-stream", "anthropic": "text/event-stream", "ollama": "application/x-ndjson"}
# schemathesis (and OpenAPI 3.2's itemSchema) check a stream item by item: an SSE event
# ({"event", "data", ...}) or one NDJSON line.
STREAM_ITEM = {
    "text/event-stream": {"type": "object", "required": ["data"],
                          "properties": {"event": {"type": "string"}, "data": {"type": "string"},
                                         "id": {"type": "string"}, "retry": {"type": "integer"}}},
    "application/x-ndjson": {"type": "object"},
}
HEALTH = {"type": "object", "required": ["status"],
          "properties": {"status": {"type": "string"}, "model": {"type": "string"},
                         "inflight": {"type": "integer"}, "error": {"type": "string"}}}
_RETRY_AFTER = {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 1}}
WHY = {
    400: "unsupported parameter, invalid value or a rule the schema cannot express (the message names it)",
    401: "missing or invalid API key",
    404: "not found (a model this server does not serve, or no such route)",
    413: "request body too large",
    422: "a field of the wrong type or out of range",
    429: "rate limit exceeded",
    501: "not supported by this server (the message says what to use instead)",
    500: "internal error (see the server log; the reply carries x-request-id)",
    503: "the server is busy or the model is loading",
    504: "the request ran past the server's request timeout",
}


def install(app, keyed: bool) -> None:
    """Serve the rewritten document from ``app.openapi()`` (built once, on first use)."""
    build = app.openapi

    def openapi() -> dict:
        if not getattr(app.state, "openapi_rewritten", False):
            app.openapi_schema = document(build(), keyed)
            app.state.openapi_rewritten = True
        return app.openapi_schema

    app.openapi = openapi


def document(doc: dict, keyed: bool) -> dict:
    """``doc`` (FastAPI's document) rewritten in place as described above; returns it."""
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    _integer_bounds(schemas)
    schemas.update(ERROR_SCHEMAS)
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 shape, never sent
        schemas.pop(name, None)
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            if isinstance(op, dict) and "responses" in op:
                _operation(doc, path, method, op, keyed)
    if keyed:
        components["securitySchemes"] = {
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
        }
        doc["security"] = [{"bearer": []}, {"apiKey": []}]
    return doc


def _operation(doc: dict, path: str, method: str, op: dict, keyed: bool) -> None:
    kind = protocol(path)
    responses = op["responses"]
    if responses.get("422", {}).get("description") == "Validation Error":  # FastAPI's, never sent
        del responses["422"]
    statuses = [500]
    if path in OPEN_PATHS:
        op["security"] = []
        if path == "/health":
            responses["200"] = {"description": "the server is ready",
                                "content": {"application/json": {"schema": HEALTH}}}
            responses.setdefault("503", {"description": "the model is loading or failed to load",
                                         "content": {"application/json": {"schema": HEALTH}}})
            return
    elif keyed:
        statuses.append(401)
    if path not in UNLIMITED_PATHS:
        statuses.append(429)
    body = _body_schema(doc, op)
    if "501" in responses:  # a route refused on purpose documents only that
        statuses.append(501)
        del responses["501"]
        responses.pop("200", None)
    elif body is not None:
        statuses += [400, 404, 413, 422, 503, 504]
    else:
        if "{" in path:
            statuses.append(404)
        if any(p.get("in") == "query" for p in op.get("parameters", ())):
            statuses += [400, 422]
    for status in sorted(set(statuses)):
        entry = {"description": WHY[status],
                 "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{_SCHEMA_OF[kind]}"}}}}
        if status == 429:
            entry["headers"] = {"Retry-After": {**_RETRY_AFTER, "required": True}}
        elif status == 503:
            entry["headers"] = {"Retry-After": _RETRY_AFTER}
        responses.setdefault(str(status), entry)
    ok = responses.get("200")
    if body is not None and ok is not None and "stream" in body.get("properties", {}):
        media = STREAM_MEDIA[kind]
        ok.setdefault("content", {}).setdefault(media, {"schema": STREAM_ITEM[media]})


def _integer_bounds(node) -> None:
    """FastAPI's document model stores numeric bounds as floats (``2**63`` becomes
    ``9.223372036854776e+18``); an integer's bound is an integer again, so a client or a
    fuzzer comparing exactly sees the bound the validator uses."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
                v = node.get(k)
                if isinstance(v, float) and v.is_integer():
                    node[k] = int(v)
        for v in node.values():
            _integer_bounds(v)
    elif isinstance(node, list):
        for v in node:
            _integer_bounds(v)


def _body_schema(doc: dict, op: dict) -> dict | None:
    """The JSON request body's schema (``$ref`` resolved), or None."""
    content = op.get("requestBody", {}).get("content", {})
    schema = content.get("application/json", {}).get("schema")
    if schema is None:
        return None
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        return doc.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
    return schema
