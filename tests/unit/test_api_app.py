"""HTTP behaviour of the API on a tiny random-weight model: OpenAI shapes, SSE
framing, validation codes, auth, rate limit, body limit, health states."""

from __future__ import annotations

import json
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.api.app import create_app  # noqa: E402
from squish.api.settings import ServeSettings  # noqa: E402
from squish.runtime.engine import Engine  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "tiny-4bit")


def loader(path):
    def load():
        from squish.runtime.loader import load_artifact

        return load_artifact(path)

    return load


@pytest.fixture(scope="module")
def client(artifact):
    settings = ServeSettings(api_key=KEY, rate_limit_per_minute=6000, rate_limit_burst=1000,
                             max_body_bytes=20_000, max_tokens=64)
    engine = Engine(loader(artifact), max_batch=4, max_queue=4)
    with TestClient(create_app(settings, engine)) as c:
        assert engine.ready.wait(120), engine.load_error
        yield c


def chat(client, **kw):
    body = {"model": "tiny-4bit", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **kw}
    return client.post("/v1/chat/completions", json=body, headers=AUTH)


def test_models_and_health(client):
    assert client.get("/health").json()["status"] == "ok"  # open without a key
    r = client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert [m["id"] for m in r.json()["data"]] == ["tiny-4bit"]
    assert client.get("/v1/models/tiny-4bit", headers=AUTH).json()["object"] == "model"
    assert client.get("/v1/models/nope", headers=AUTH).status_code == 404


def test_chat_non_stream_shape(client):
    r = chat(client, temperature=0)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    assert "cached_tokens" in u["prompt_tokens_details"]
    assert r.headers["x-request-id"].startswith("req-")


def test_chat_stream_framing_and_usage(client):
    body = {"model": "tiny-4bit", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_completions_with_logprobs(client):
    r = client.post("/v1/completions", headers=AUTH, json={
        "model": "tiny-4bit", "prompt": "The quick", "max_tokens": 3, "logprobs": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert len(c["logprobs"]["tokens"]) == r.json()["usage"]["completion_tokens"]
    assert all(len(t) == 2 for t in c["logprobs"]["top_logprobs"])


@pytest.mark.parametrize("extra,status,param", [
    ({"n": 2}, 400, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]}, 400,
     "tools[0].function.parameters"),
    ({"tool_choice": "required"}, 400, "tool_choice"),  # without tools
    ({"frobnicate": 1}, 400, "frobnicate"),
    ({"temperature": 3}, 422, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
    ({"max_tokens": 0}, 422, "max_tokens"),
    ({"max_tokens": 65}, 400, None),  # over the server cap
    ({"logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),  # without logprobs
    ({"model": "gpt-4"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "bad\x00char"}]}, 400, None),
    ({"messages": []}, 422, "messages"),
])
def test_bad_input_is_rejected_with_openai_error(client, extra, status, param):
    r = chat(client, **extra)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] and err["param"].startswith(param)
    assert client.get("/health").status_code == 200


def test_context_overflow_is_400(client):
    r = chat(client, messages=[{"role": "user", "content": "word " * 600}], max_tokens=64)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_malformed_json_and_body_limit(client):
    r = client.post("/v1/chat/completions", content=b"{not json", headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    big = json.dumps({"model": "tiny-4bit", "messages": [{"role": "user", "content": "x" * 30_000}]})
    r = client.post("/v1/chat/completions", content=big, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"


def test_auth(client):
    body = {"model": "tiny-4bit", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 401
    r = client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.get("/metrics").status_code == 401
    m = client.get("/metrics", headers=AUTH)
    assert m.status_code == 200 and "squish_requests_total" in m.text


def test_cors_off_by_default(client):
    r = client.get("/v1/models", headers={**AUTH, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def test_rate_limit_429_with_retry_after(artifact):
    engine = Engine(loader(artifact))
    with TestClient(create_app(ServeSettings(rate_limit_per_minute=60, rate_limit_burst=3), engine)) as c:
        assert engine.ready.wait(120), engine.load_error  # /health is 503 while loading
        codes = [c.get("/v1/models") for _ in range(5)]
        assert [r.status_code for r in codes][:3] == [200, 200, 200]
        limited = [r for r in codes if r.status_code == 429]
        assert limited and int(limited[0].headers["retry-after"]) >= 1
        assert limited[0].json()["error"]["type"] == "rate_limit_error"
        assert c.get("/health").status_code == 200  # health is never limited


def test_health_reports_loading_until_ready(artifact):
    gate = threading.Event()
    inner = loader(artifact)

    def slow():
        gate.wait(60)
        return inner()

    engine = Engine(slow)
    with TestClient(create_app(ServeSettings(), engine)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        r = c.post("/v1/chat/completions", json={"model": "tiny-4bit", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "retry-after" in r.headers
        gate.set()
        assert engine.ready.wait(60)
        assert c.get("/health").json()["status"] == "ok"


def test_settings_refuse_public_bind_without_key():
    with pytest.raises(ValueError, match="API key"):
        ServeSettings(host="0.0.0.0").check()
    ServeSettings(host="0.0.0.0", api_key="k").check()
    ServeSettings(host="0.0.0.0", allow_unauthenticated_remote=True).check()
