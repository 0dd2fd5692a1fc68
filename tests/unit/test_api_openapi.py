"""The served OpenAPI document says what the server answers (squish/api/openapi.py), and
the request schema's documented bounds are the validators' (squish/api/openai_schemas.py)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from squish.api.app import create_app
from squish.api.openai_schemas import ChatRequest, CompletionRequest
from squish.api.settings import ServeSettings
from squish.runtime.engine import Engine

KEY = "doc-key"


def _doc(api_key: str | None = KEY) -> dict:
    app = create_app(ServeSettings(api_key=api_key), Engine(lambda: None))
    client = TestClient(app)  # no lifespan: the engine never starts; the document needs none
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    r = client.get("/openapi.json", headers=headers)
    assert r.status_code == 200
    return r.json()


def test_error_replies_documented_in_the_protocol_shape():
    doc = _doc()
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    for status in ("400", "401", "404", "413", "422", "429", "500", "503", "504"):
        assert chat[status]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIError"}
    assert chat["429"]["headers"]["Retry-After"]["required"] is True
    assert "HTTPValidationError" not in doc["components"]["schemas"]  # FastAPI's 422 shape is never sent
    assert "detail" not in str(doc["components"]["schemas"]["OpenAIError"])
    models = doc["paths"]["/v1/models/{model_id}"]["get"]["responses"]
    assert "404" in models and "422" not in models


def test_streams_metrics_health_and_security_documented():
    doc = _doc()
    ok = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert set(ok) == {"application/json", "text/event-stream"}
    assert ok["text/event-stream"]["schema"]["required"] == ["data"]
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    health = doc["paths"]["/health"]["get"]
    assert health["security"] == [] and "503" in health["responses"] and "401" not in health["responses"]
    assert doc["security"] == [{"bearer": []}, {"apiKey": []}]
    assert doc["components"]["securitySchemes"]["apiKey"]["name"] == "x-api-key"
    open_doc = _doc(api_key=None)  # no key: no schemes, no 401
    assert "security" not in open_doc
    assert "401" not in open_doc["paths"]["/v1/chat/completions"]["post"]["responses"]


def test_integer_bounds_stay_integers():
    seed = _doc()["components"]["schemas"]["ChatRequest"]["properties"]["seed"]["anyOf"][0]
    assert seed["exclusiveMaximum"] == 2**63 and isinstance(seed["exclusiveMaximum"], int)


def _accepts(cls, **fields) -> bool:
    from pydantic import ValidationError

    try:
        cls(**fields)
        return True
    except ValidationError:
        return False


@pytest.mark.parametrize("stop,ok", [("a", True), (["a", "b"], True), ("", False), ("a" * 257, False),
                                     (["a"] * 5, False), ("a\x01", False), ("a\nb", True)])
def test_documented_stop_matches_the_validator(stop, ok):
    import jsonschema

    schema = ChatRequest.model_json_schema()["properties"]["stop"]
    assert jsonschema.Draft202012Validator(schema).is_valid(stop) is ok
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert _accepts(ChatRequest, **body, stop=stop) is ok


@pytest.mark.parametrize("prompt,ok", [("hi", True), ([1, 2], True), ([], False), (["a"], True), (["a", "b"], False)])
def test_documented_prompt_matches_the_validator(prompt, ok):
    import jsonschema

    schema = CompletionRequest.model_json_schema()["properties"]["prompt"]
    assert jsonschema.Draft202012Validator(schema).is_valid(prompt) is ok
    assert _accepts(CompletionRequest, model="m", prompt=prompt) is ok


@pytest.mark.parametrize("key", ["--5", "²", "٣", "1_0", " 7"])
def test_logit_bias_keys_that_are_not_ascii_token_ids_are_422_not_500(key):
    """Keys passed ``str.isdigit`` (Unicode digits, "--5") and then crashed ``int()``: a 500."""
    app = create_app(ServeSettings(), Engine(lambda: None))
    client = TestClient(app, raise_server_exceptions=False)
    r = client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                  "logit_bias": {key: 1}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["param"] == "logit_bias"


ROUTES = {  # route -> a body with the integer under test in place of None
    "/v1/chat/completions": lambda v: {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": v},
    "/v1/completions": lambda v: {"model": "m", "prompt": [1, v]},
    "/v1/responses": lambda v: {"model": "m", "input": "hi", "max_output_tokens": v},
    "/v1/messages": lambda v: {"model": "m", "max_tokens": v, "messages": [{"role": "user", "content": "hi"}]},
    "/api/chat": lambda v: {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                            "options": {"num_predict": v}},
}


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("value,ok", [("8", True), ("8.0", True), ("8e0", True), ('"8"', False), ("8.5", False),
                                      ("true", False)])
def test_integers_are_json_schema_integers(route, value, ok):
    """JSON Schema's integer (what the document says) includes 8.0, on every protocol's
    route; strings, bools and fractions never. With no model loaded a valid body gets as far
    as the engine (503), an invalid one stops at validation (422; 400 on Anthropic/Ollama)."""
    import json

    client = TestClient(create_app(ServeSettings(), Engine(lambda: None)))
    body = json.dumps(ROUTES[route]("@")).replace('"@"', value)  # the number as the client wrote it
    r = client.post(route, content=body, headers={"Content-Type": "application/json"})
    assert (r.status_code == 503) is ok, (r.status_code, r.text)
    if not ok:
        assert r.status_code in (400, 422)


def test_documented_responses_input_is_what_the_validator_takes():
    """An input item without ``type`` is a message (the validator's default), so the document
    must not call an incomplete one valid through the catch-all item (the fuzz found a 422 for
    ``{"role": "user"}``, which the document accepted as an unknown item)."""
    import jsonschema

    doc = _doc()
    schema = {"$ref": "#/components/schemas/ResponseRequest", "components": doc["components"]}
    valid = jsonschema.Draft202012Validator(schema).is_valid
    assert valid({"model": "m", "input": [{"role": "user", "content": "hi"}]})
    assert not valid({"model": "m", "input": [{"role": "user"}]})
    assert not valid({"model": "m", "input": [{"type": "message", "role": "user"}]})
    assert valid({"model": "m", "input": [{"type": "item_reference", "id": "x"}]})  # documented, then a 400
    client = TestClient(create_app(ServeSettings(), Engine(lambda: None)))
    r = client.post("/v1/responses", json={"model": "m", "input": [{"role": "user"}]})
    assert r.status_code == 422
