"""What an outside test of the server broke (issue 15), each pinned by a test that failed before.

Routing and error contracts on the tiny random model; sampling limits compare token ids
against greedy decoding, which is deterministic on any model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.api.app import create_app  # noqa: E402
from squish.api.settings import ServeSettings  # noqa: E402
from squish.runtime.engine import Engine  # noqa: E402

MSGS = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "tiny-4bit")


def _engine(path):
    def load():
        from squish.runtime.loader import load_artifact

        return load_artifact(path)

    return Engine(load, max_batch=4, max_queue=4)


@pytest.fixture(scope="module")
def client(artifact):
    engine = _engine(artifact)
    settings = ServeSettings(rate_limit_per_minute=6000, rate_limit_burst=1000, max_tokens=64,
                             max_content_chars=2000, cors_origins=["http://app.example"])
    with TestClient(create_app(settings, engine), raise_server_exceptions=False) as c:
        assert engine.ready.wait(120), engine.load_error
        yield c


def chat(client, **kw):
    return client.post("/v1/chat/completions", json={"model": "tiny-4bit", "messages": MSGS, "max_tokens": 6, **kw})


def tokens(client, **kw):
    r = client.post("/v1/completions", json={"model": "tiny-4bit", "prompt": "The quick", "max_tokens": 6,
                                              "logprobs": 0, "seed": 3, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


def metric(client, line_start: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(line_start):
            return float(line.split()[-1])
    return 0.0


def test_made_up_bearer_tokens_do_not_dodge_the_rate_limit(artifact):
    # No key configured: a fresh Authorization header per request used to get a fresh bucket.
    engine = _engine(artifact)
    with TestClient(create_app(ServeSettings(rate_limit_per_minute=60, rate_limit_burst=3), engine)) as c:
        assert engine.ready.wait(120)
        codes = [c.get("/v1/models", headers={"Authorization": f"Bearer made-up-{i}"}).status_code
                 for i in range(8)]
    assert codes[:3] == [200] * 3 and codes.count(429) == 5, codes


def test_with_a_key_only_the_valid_key_names_a_bucket(artifact):
    engine = _engine(artifact)
    settings = ServeSettings(api_key="k", rate_limit_per_minute=60, rate_limit_burst=3)
    with TestClient(create_app(settings, engine)) as c:
        assert engine.ready.wait(120)
        wrong = [c.get("/v1/models", headers={"Authorization": f"Bearer w{i}"}).status_code for i in range(5)]
        good = [c.get("/v1/models", headers={"x-api-key": "k"}).status_code for _ in range(4)]
    assert wrong == [401] * 5  # refused before the limiter: they spend no one's tokens
    assert good == [200, 200, 200, 429]


@pytest.mark.parametrize("extra, status, param", [
    ({"repetition_penalty": 1e-38}, 422, "repetition_penalty"),  # used to be 500 "numerical"
    ({"max_tokens": "8"}, 422, "max_tokens"),  # strings are not numbers
    ({"temperature": "0"}, 422, "temperature"),
    ({"stream": "true"}, 422, "stream"),
])
def test_out_of_range_or_mistyped_values_are_422(client, extra, status, param):
    r = chat(client, **extra)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"].startswith(param)


@pytest.mark.parametrize("extra", [{"temperature": 1e-39}, {"top_p": 1e-46}, {"temperature": 0.7, "top_p": 1e-30}])
def test_vanishing_temperature_or_top_p_is_greedy(client, extra):
    # 1e-39 used to overflow into random tokens ("clerosis haunted...").
    assert tokens(client, **extra) == tokens(client, temperature=0)


@pytest.mark.parametrize("extra, param, code", [
    ({"max_tokens": 65}, "max_tokens", "max_tokens_too_large"),
    ({"messages": [{"role": "user", "content": "x" * 2001}]}, "messages", "messages_too_long"),
    ({"messages": [{"role": "user", "content": "nul\x00here"}]}, "messages[0]", "invalid_characters"),
])
def test_400s_name_their_param_and_code(client, extra, param, code):
    r = chat(client, **extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == (param, code)


def test_logit_bias_cannot_raise_a_control_token(client, artifact):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    im_start = tok.token_to_id("<|im_start|>")
    r = chat(client, logit_bias={str(im_start): 100})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    assert chat(client, logit_bias={str(im_start): -100}).status_code == 200  # lowering is fine


def test_deeply_nested_schema_is_a_400_with_a_request_id(client):
    schema: dict = {"type": "string"}
    for _ in range(100):  # ~6 KB; used to be a RecursionError, a 500 and 300 KB of log
        schema = {"type": "object", "properties": {"a": schema}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    r = chat(client, response_format=fmt)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "response_format.json_schema.schema"
    assert r.headers["x-request-id"]
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    assert chat(client, tools=[tool]).status_code == 400


def test_405_has_allow_and_a_client_error_type(client):
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_405_allow_names_every_route_on_the_path(client):
    """One path, a route per method: Allow lists them all (Starlette's own 405 names one)."""
    assert client.post("/v1/responses/resp_x").headers["allow"] == "DELETE, GET"
    r = client.request("OPTIONS", "/api/tags")
    assert r.status_code == 405 and r.headers["allow"] == "GET, HEAD" and "error" in r.json()


def test_cors_preflight_with_origins(client):
    r = client.options("/v1/chat/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://app.example"
    r = client.options("/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers


def test_requests_total_counts_client_errors_and_crashes(client, monkeypatch):
    route = 'squish_requests_total{route="/v1/chat/completions",status='
    before_400 = metric(client, route + '"400"}')
    before_500 = metric(client, route + '"500"}')
    chat(client, n=2)
    core = client.app.state.core

    async def boom(*a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(core, "prepare", boom)
    r = chat(client)
    assert r.status_code == 500 and r.headers["x-request-id"]
    assert r.json()["error"]["code"] == "internal_error"
    assert metric(client, route + '"400"}') == before_400 + 1
    assert metric(client, route + '"500"}') == before_500 + 1


def test_openapi_describes_every_route(client):
    spec = client.get("/openapi.json").json()
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(spec["paths"])
    assert client.get("/docs").status_code == 200


def test_default_is_the_served_model(client):
    r = client.post("/v1/chat/completions", json={"model": "default", "messages": MSGS, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "tiny-4bit"
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS})
    assert r.status_code == 404 and "tiny-4bit" in r.json()["error"]["message"]


def test_bookkeeping_fields_are_accepted(client):
    r = chat(client, store=True, metadata={"k": "v"}, user="u", safety_identifier="s", prompt_cache_key="p",
             service_tier="auto")
    assert r.status_code == 200, r.text
    r = chat(client, service_tier="priority")
    assert r.status_code == 422 and r.json()["error"]["param"] == "service_tier"


def test_strict_tools_close_objects():
    from squish.tools import spec

    (tool,) = spec.parse_tools([{"type": "function", "function": {"name": "f", "strict": True, "parameters": {
        "type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}}}}}}])
    assert tool.parameters["additionalProperties"] is False
    assert tool.parameters["properties"]["a"]["additionalProperties"] is False
    (loose,) = spec.parse_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "string"}}}}}])
    assert "additionalProperties" not in loose.parameters
    assert json.dumps(tool.parameters)  # a plain JSON-able copy
