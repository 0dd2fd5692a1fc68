"""Tools and JSON outputs through the HTTP API on a tiny random-weight model.

Routing and contracts only (the model's answers are noise): requests are
accepted or refused with the right 400s, constrained replies come back in the
OpenAI shapes (message.tool_calls, delta.tool_calls, finish_reason), the
all-retries-failed path is a clear error, and /metrics counts the retries.
Whether a real model gets tool calls right is tested end to end
(tests/e2e/test_serve_openai.py) and measured (benchmarks/tool_calling.py).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.api.app import create_app  # noqa: E402
from squish.api.settings import ServeSettings  # noqa: E402
from squish.runtime.engine import Engine  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
UNIT = {"type": "object", "required": ["unit"], "additionalProperties": False,
        "properties": {"unit": {"enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather", "parameters": UNIT}},
         {"type": "function", "function": {"name": "now"}}]
CALL_MSGS = [{"role": "user", "content": "weather?"},
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"unit\": \"c\"}"}}]},
             {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees"}]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    art = make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "tiny-4bit")

    def load():
        from squish.runtime.loader import load_artifact

        return load_artifact(art)

    settings = ServeSettings(api_key=KEY, rate_limit_per_minute=6000, rate_limit_burst=1000, max_tokens=256)
    engine = Engine(load, max_batch=4, max_queue=4)
    app = create_app(settings, engine)
    with TestClient(app) as c:
        assert engine.ready.wait(120), engine.load_error
        # The tiny byte-level tokenizer spends ~500 tokens on the fallback tool prompt; its
        # 512-position config is a label only (RoPE), so give the API a larger context.
        app.state.context_length, app.state._ctx_synced = 4096, True
        c.artifact = art
        yield c


def chat(client, **kw):
    # The tiny tokenizer is nearly byte-level: one call block is ~70 tokens. With parallel calls on,
    # a random model may chain calls until max_tokens, so most tests ask for one call.
    body = {"model": "tiny-4bit", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 160,
            "temperature": 0, **kw}
    return client.post("/v1/chat/completions", json=body, headers=AUTH)


def sse_chunks(client, **kw):
    body = {"model": "tiny-4bit", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 160,
            "temperature": 0, "stream": True, **kw}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as r:
        assert r.status_code == 200
        events = [e for e in "".join(r.iter_text()).split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    done = events[-1] == "data: [DONE]"
    return [json.loads(e[6:]) for e in events[:-1] if done] or [json.loads(e[6:]) for e in events], done


def metric(client, name):
    for line in client.get("/metrics", headers=AUTH).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "weather"}}])
def test_constrained_call_comes_back_as_tool_calls(client, choice):
    r = chat(client, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["finish_reason"] == "tool_calls"
    calls = c["message"]["tool_calls"]
    assert len(calls) == 1 and all(x["id"].startswith("call_") and x["type"] == "function" for x in calls)
    for x in calls:
        assert x["function"]["name"] in ("weather", "now")
        args = json.loads(x["function"]["arguments"])
        if x["function"]["name"] == "weather":
            jsonschema.validate(args, UNIT)
    if isinstance(choice, dict):
        assert {x["function"]["name"] for x in calls} == {"weather"}
    assert "<tool_call>" not in (c["message"]["content"] or "")


def test_streamed_calls_are_tool_call_deltas(client):
    chunks, done = sse_chunks(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "weather"}},
                              parallel_tool_calls=False, stream_options={"include_usage": True})
    assert done
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    frags = [tc for ch in chunks if ch["choices"] for tc in ch["choices"][0]["delta"].get("tool_calls", [])]
    assert frags and frags[0]["id"].startswith("call_") and frags[0]["function"]["name"] == "weather"
    args = "".join(f["function"].get("arguments", "") for f in frags if f["index"] == 0)
    jsonschema.validate(json.loads(args), UNIT)
    content = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert "<tool_call>" not in content
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] >= 1


def test_json_schema_reply_validates(client):
    schema = {"type": "object", "required": ["ok", "size"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["s", "m", "l"]}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}
    r = chat(client, response_format=fmt)
    assert r.status_code == 200, r.text
    assert "x-squish-degraded" not in r.headers
    jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
    chunks, done = sse_chunks(client, response_format=fmt)
    assert done
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    jsonschema.validate(json.loads(text), schema)


def test_tool_messages_are_accepted(client):
    r = chat(client, tools=TOOLS, messages=CALL_MSGS, tool_choice="none")
    assert r.status_code in (200, 500), r.text  # none: plain text (a random model may still "call")
    r = chat(client, messages=[{"role": "user", "content": "hi", "name": "ana_1"}])
    assert r.status_code == 200, r.text


# Grammar engines skip "not" (the reply is still checked with jsonschema): no reply can satisfy this.
IMPOSSIBLE = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "required": ["unit"], "additionalProperties": False,
    "properties": {"unit": {"enum": ["c", "f"], "not": {"enum": ["c", "f"]}}}}}}
WEATHER_CHOICE = {"type": "function", "function": {"name": "weather"}}


def test_all_retries_failed_is_a_clear_error(client):
    before = metric(client, 'squish_tool_failures_total{cause="schema_error"}')
    retries = metric(client, 'squish_tool_retries_total{cause="schema_error"}')
    r = chat(client, tools=[IMPOSSIBLE], tool_choice=WEATHER_CHOICE, parallel_tool_calls=False)
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "tool_call_failed" and "3 attempt" in err["message"]
    assert r.headers["x-should-retry"] == "false"  # the server already retried
    assert metric(client, 'squish_tool_failures_total{cause="schema_error"}') == before + 1
    assert metric(client, 'squish_tool_retries_total{cause="schema_error"}') == retries + 2
    chunks, done = sse_chunks(client, tools=[IMPOSSIBLE], tool_choice="required", parallel_tool_calls=False)
    assert not done and chunks[-1]["error"]["code"] == "tool_call_failed"
    assert not any(ch.get("choices") and ch["choices"][0]["delta"].get("tool_calls") for ch in chunks)
    assert client.get("/health").json()["status"] == "ok"


def test_a_budget_below_the_shortest_call_is_400_naming_the_minimum(client):
    # Issue 15: max_tokens 4 used to burn three attempts (~18 s) and end in a 500.
    r = chat(client, tools=TOOLS, tool_choice=WEATHER_CHOICE, max_tokens=2)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("max_tokens", "max_tokens_too_small")
    need = int(re.search(r"at least (\d+)", err["message"]).group(1))
    assert need > 2
    # At the minimum the reply is a valid call or ends as "length": never a 500, one attempt.
    attempts = metric(client, "squish_tool_attempts_total")
    r = chat(client, tools=TOOLS, tool_choice=WEATHER_CHOICE, max_tokens=need, parallel_tool_calls=False)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["finish_reason"] in ("tool_calls", "length")
    for call in c["message"].get("tool_calls") or ():
        jsonschema.validate(json.loads(call["function"]["arguments"]), UNIT)
    if c["finish_reason"] == "length":
        assert metric(client, "squish_tool_attempts_total") == attempts + 1


@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                           "properties": {"x": {"type": 5}}}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": TOOLS, "logprobs": True}, "logprobs"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),  # no tool_call_id
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages"),
    ({"tools": TOOLS, "messages": [{"role": "user", "content": "x"},
                                   {"role": "tool", "tool_call_id": "call_9", "content": "r"}]},
     "messages[1].tool_call_id"),  # answers no earlier call
])
def test_bad_tool_requests_are_400(client, extra, param):
    r = chat(client, **extra)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] and err["param"].startswith(param), err
    assert client.get("/health").status_code == 200


def test_bad_message_name_is_422(client):
    r = chat(client, messages=[{"role": "user", "content": "hi", "name": "no spaces allowed"}])
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("messages")


def test_a_loop_the_constraint_closes_is_retried_then_returned_degraded(client):
    from tokenizers import Tokenizer

    # The model is pushed (logit_bias) to repeat one letter inside a JSON string: the constraint
    # closes the string after LOOP_SPAN repeated tokens, each attempt counts as a repetition
    # failure, and the last valid reply is returned instead of an error.
    tok = Tokenizer.from_file(str(client.artifact / "tokenizer.json"))
    (a_id,) = tok.encode("a").ids
    schema = {"type": "object", "required": ["s"], "additionalProperties": False,
              "properties": {"s": {"type": "string"}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    before = metric(client, 'squish_tool_requests_total{result="degraded"}')
    retries = metric(client, 'squish_tool_retries_total{cause="repetition"}')
    r = chat(client, response_format=fmt, logit_bias={str(a_id): 100})
    assert r.status_code == 200, r.text
    assert r.headers["x-squish-degraded"] == "repetition"  # the client can tell
    value = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(value["s"]) == {"a"} and len(value["s"]) < 100  # closed long before max_tokens
    assert metric(client, 'squish_tool_requests_total{result="degraded"}') == before + 1
    assert metric(client, 'squish_tool_retries_total{cause="repetition"}') == retries + 2
    chunks, done = sse_chunks(client, response_format=fmt, logit_bias={str(a_id): 100})
    assert done
    text = "".join(ch["choices"][0]["delta"].get("content") or "" for ch in chunks if ch["choices"])
    assert json.loads(text) == value
    assert metric(client, 'squish_tool_requests_total{result="degraded"}') == before + 2
