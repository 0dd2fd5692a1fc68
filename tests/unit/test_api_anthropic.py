"""The Anthropic Messages API (``/v1/messages``, ``/v1/messages/count_tokens``) over TestClient.

Shapes, the SSE event sequence, validation and error shapes, auth and model names on the
tiny random model (its answers are noise); thinking blocks, the switch and budget, stop
sequences, tools (forced, named, after thinking, a tool_result round trip) and JSON output
on the reasoning fixture (tests/tiny_reasoning.py), whose greedy output is known:
``<think>Let me think.</think>\\n\\nThe answer is 42!``. The official ``anthropic`` client is
driven end to end in tests/e2e/test_serve_anthropic.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402
from tiny_reasoning import ANSWER, THOUGHT, make_reasoning_model  # noqa: E402

from squish.api.anthropic import signature  # noqa: E402
from squish.api.anthropic_schemas import InputMessage, MessagesRequest, TextBlock, chat_messages  # noqa: E402
from squish.api.app import create_app  # noqa: E402
from squish.api.settings import ServeSettings  # noqa: E402
from squish.runtime.engine import Engine  # noqa: E402
from squish.tools.spec import ToolChoice  # noqa: E402

KEY = "test-key"
HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
HI = [{"role": "user", "content": "hi"}]
UNIT = {"type": "object", "required": ["unit"], "additionalProperties": False,
        "properties": {"unit": {"enum": ["c", "f"]}}}
WEATHER = {"name": "weather", "description": "Weather", "input_schema": UNIT}


def serve(path, **settings):
    def load():
        from squish.runtime.loader import load_artifact

        return load_artifact(path)

    engine = Engine(load, max_batch=4, max_queue=4)
    base = dict(api_key=KEY, rate_limit_per_minute=6000, rate_limit_burst=1000)
    return engine, TestClient(create_app(ServeSettings(**{**base, **settings}), engine))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    engine, client = serve(make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "tiny-4bit"), max_tokens=64)
    with client as c:
        assert engine.ready.wait(120), engine.load_error
        yield c


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    engine, client = serve(make_reasoning_model(tmp_path_factory.mktemp("reasoning") / "tiny-reasoner"),
                           max_tokens=256)
    with client as c:
        assert engine.ready.wait(120), engine.load_error
        yield c


def post(client, path="/v1/messages", headers=HEADERS, **kw):
    body = {"model": "default", "messages": HI, **kw}
    if path == "/v1/messages":
        body = {"max_tokens": 8, "temperature": 0, **body}
    return client.post(path, json=body, headers=headers)


def message(client, **kw) -> dict:
    r = post(client, **kw)
    assert r.status_code == 200, r.text
    return r.json()


def stream(client, **kw) -> list[tuple[str, dict]]:
    body = {"model": "default", "messages": HI, "max_tokens": 8, "temperature": 0, "stream": True, **kw}
    with client.stream("POST", "/v1/messages", json=body, headers=HEADERS) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = [e for e in "".join(r.iter_text()).split("\n\n") if e]
    out = []
    for e in raw:
        head, data = e.split("\n")
        assert head.startswith("event: ") and data.startswith("data: "), e
        kind, obj = head[7:], json.loads(data[6:])
        assert obj["type"] == kind
        out.append((kind, obj))
    return out


def blocks_of(events) -> list[dict]:
    """The content blocks a client assembles from the stream (as the SDK does)."""
    blocks: list[dict] = []
    for kind, e in events:
        if kind == "content_block_start":
            assert e["index"] == len(blocks)
            blocks.append(dict(e["content_block"]))
        elif kind == "content_block_delta":
            b, d = blocks[e["index"]], e["delta"]
            key = {"text_delta": "text", "thinking_delta": "thinking", "signature_delta": "signature",
                   "input_json_delta": "partial_json"}[d["type"]]
            b[key] = (b.get(key, "") if key != "signature" else "") + d[key]
    for b in blocks:
        if b["type"] == "tool_use":
            b["input"] = json.loads(b.pop("partial_json"))
    return blocks


def check_sequence(events) -> None:
    """message_start, ping, then blocks opened, filled and closed in order, message_delta, message_stop."""
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["message_start", "ping"] and kinds[-2:] == ["message_delta", "message_stop"]
    open_index = None
    for kind, e in events[2:-2]:
        if kind == "content_block_start":
            assert open_index is None
            open_index = e["index"]
        elif kind == "content_block_delta":
            assert e["index"] == open_index
        elif kind == "content_block_stop":
            assert e["index"] == open_index
            open_index = None
        else:
            assert kind == "ping", kind
    assert open_index is None
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["stop_reason"] is None


def anthropic_error(r, status: int, kind: str, match: str = "") -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and body["error"]["type"] == kind, body
    assert match in body["error"]["message"], body
    return body["error"]["message"]


# ---- shapes, stream, usage (tiny model) ---------------------------------------------------------

def test_message_shape_and_usage(tiny):
    body = message(tiny, max_tokens=6)
    assert body["id"].startswith("msg_") and body["type"] == "message" and body["role"] == "assistant"
    assert body["model"] == "tiny-4bit" and body["stop_sequence"] is None
    assert body["stop_reason"] in ("end_turn", "max_tokens")
    assert [b["type"] for b in body["content"]] in (["text"], [])
    u = body["usage"]
    assert u["output_tokens"] <= 6 and u["cache_creation_input_tokens"] == 0
    counted = post(tiny, "/v1/messages/count_tokens").json()["input_tokens"]
    assert u["input_tokens"] + u["cache_read_input_tokens"] == counted > 0


def test_stream_events_assemble_the_same_message(tiny):
    whole = message(tiny, max_tokens=6)
    events = stream(tiny, max_tokens=6)
    check_sequence(events)
    assert blocks_of(events) == whole["content"]
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": whole["stop_reason"], "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == whole["usage"]["output_tokens"]
    assert delta["usage"]["input_tokens"] + delta["usage"]["cache_read_input_tokens"] == \
        events[0][1]["message"]["usage"]["input_tokens"]


def test_count_tokens_includes_system_and_tools(tiny):
    def count(**kw):
        r = tiny.post("/v1/messages/count_tokens", json={"model": "default", "messages": HI, **kw}, headers=HEADERS)
        assert r.status_code == 200, r.text
        assert list(r.json()) == ["input_tokens"]
        return r.json()["input_tokens"]

    plain = count()
    assert count(system="Be brief.") > plain
    assert count(system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}]) > plain
    assert count(tools=[WEATHER]) > plain
    anthropic_error(tiny.post("/v1/messages/count_tokens", json={"model": "claude-opus-4-1", "messages": HI},
                              headers=HEADERS), 404, "not_found_error", "tiny-4bit")


def test_bookkeeping_fields_and_headers_are_accepted(tiny):
    r = post(tiny, headers={**HEADERS, "anthropic-beta": "interleaved-thinking-2025-05-14"},
             metadata={"user_id": "u-1"}, service_tier="standard_only", inference_geo="us", speed="standard",
             cache_control={"type": "ephemeral", "ttl": "1h"}, workspace_id="w", user_profile_id="p",
             output_config={"effort": "high"}, thinking={"type": "adaptive"},
             system=[{"type": "text", "text": "sys", "cache_control": {"type": "ephemeral"}}],
             messages=[{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control":
                                                     {"type": "ephemeral"}}]}])
    assert r.status_code == 200, r.text


def test_routes_are_in_the_openapi_document(tiny):
    paths = tiny.get("/openapi.json", headers=HEADERS).json()["paths"]
    assert "post" in paths["/v1/messages"] and "post" in paths["/v1/messages/count_tokens"]


def test_auth_by_x_api_key_or_bearer(tiny):
    assert post(tiny, headers={"x-api-key": KEY}).status_code == 200
    assert post(tiny, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    anthropic_error(post(tiny, headers={"x-api-key": "wrong"}), 401, "authentication_error")
    anthropic_error(post(tiny, headers={}), 401, "authentication_error")
    anthropic_error(post(tiny, "/v1/messages/count_tokens", headers={}), 401, "authentication_error")


def test_unknown_model_is_404_naming_what_is_served(tiny):
    msg = anthropic_error(post(tiny, model="claude-sonnet-4-5"), 404, "not_found_error")
    assert "tiny-4bit" in msg and "default" in msg


IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}}
CALL = {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"unit": "c"}}


@pytest.mark.parametrize("extra, match", [
    ({"max_tokens": None}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"frequency_penalty": 0.5}, "unsupported parameter 'frequency_penalty'"),
    ({"container": "c-1"}, "unsupported parameter 'container'"),
    ({"stop_sequences": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"stop_sequences": [""]}, "must not be empty"),
    ({"max_tokens": 100}, "exceeds this server's cap of 64"),
    ({"messages": [{"role": "user", "content": [IMAGE]}]}, "image blocks are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "content": [IMAGE]}]}]},
     "image blocks are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]}, "document blocks"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a", "citations": [{"x": 1}]}]}]},
     "citations"),
    ({"messages": [{"role": "user", "content": [{"type": "foo"}]}]}, "'foo'"),
    ({"messages": HI + [{"role": "assistant", "content": "The answer is ("}]}, "prefill"),
    ({"messages": [{"role": "user", "content": [CALL]}]}, "user messages may carry text / tool_result blocks"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9",
                                                  "content": "x"}]}]}, "toolu_9"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "server tools"),
    ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "server tools"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"x": {"type": 7}}}}]},
     "tools[0].input_schema is not a valid JSON Schema"),
    ({"tools": [{"name": "f", "input_schema": {"type": "string"}}]}, "\"type\": \"object\""),
    ({"tools": [{"name": "bad name", "input_schema": {"type": "object"}}]}, "tools[0].name"),
    ({"tools": [WEATHER, WEATHER]}, "duplicate"),
    ({"tools": [{**WEATHER, "defer_loading": True}]}, "defer_loading"),
    ({"tool_choice": {"type": "any"}}, "needs a non-empty 'tools'"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "'nope'"),
    ({"thinking": {"type": "enabled", "budget_tokens": 8}}, "less than max_tokens"),
    ({"thinking": {"type": "between_tools"}}, "between_tools"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2}}, "does not write a reasoning section"),
    ({"output_config": {"effort": "low"}}, "effort"),
    ({"speed": "fast"}, "speed"),
    ({"output_config": {"format": {"type": "json_schema", "schema": UNIT}}, "tools": [WEATHER]},
     "cannot be combined with tools"),
    ({"output_config": {"format": {"type": "json_schema", "schema": {"type": 3}}}},
     "output_config.format.schema is not a valid JSON Schema"),
])
def test_bad_requests_are_400_in_anthropic_shape(tiny, extra, match):
    body = {"model": "default", "messages": HI, "max_tokens": 8, **extra}
    body = {k: v for k, v in body.items() if v is not None}
    anthropic_error(tiny.post("/v1/messages", json=body, headers=HEADERS), 400, "invalid_request_error", match)


def test_malformed_json_and_method_errors_are_anthropic_shaped(tiny):
    r = tiny.post("/v1/messages", content=b"{nope", headers={**HEADERS, "content-type": "application/json"})
    anthropic_error(r, 400, "invalid_request_error", "not valid JSON")
    anthropic_error(tiny.get("/v1/messages", headers=HEADERS), 405, "invalid_request_error")


# ---- the reasoning fixture: thinking, stop sequences, tools, JSON ------------------------------

def test_thinking_block_then_text(reasoner):
    body = message(reasoner, max_tokens=64)
    thinking, text = body["content"]
    assert thinking == {"type": "thinking", "thinking": THOUGHT, "signature": signature(THOUGHT)}
    assert text == {"type": "text", "text": ANSWER} and body["stop_reason"] == "end_turn"
    assert body["usage"]["output_tokens_details"]["thinking_tokens"] >= 4
    events = stream(reasoner, max_tokens=64)
    check_sequence(events)
    assert blocks_of(events) == body["content"]
    deltas = [e["delta"]["type"] for k, e in events if k == "content_block_delta"]
    assert deltas.index("signature_delta") == deltas.index("text_delta") - 1  # closes the thinking block


@pytest.mark.parametrize("thinking", [{"type": "disabled"}, None])
def test_thinking_switch(reasoner, thinking):
    if thinking is None:  # enabled with display "omitted": the block is there, its text is not
        body = message(reasoner, max_tokens=64, thinking={"type": "enabled", "budget_tokens": 32,
                                                          "display": "omitted"})
        assert body["content"][0] == {"type": "thinking", "thinking": "", "signature": signature(THOUGHT)}
        events = stream(reasoner, max_tokens=64, thinking={"type": "enabled", "budget_tokens": 32,
                                                           "display": "omitted"})
        assert blocks_of(events)[0] == {"type": "thinking", "thinking": "", "signature": signature(THOUGHT)}
        return
    body = message(reasoner, max_tokens=64, thinking=thinking)
    assert body["content"] == [{"type": "text", "text": ANSWER}]
    assert blocks_of(stream(reasoner, max_tokens=64, thinking=thinking)) == body["content"]


def test_thinking_budget_closes_the_section(reasoner):
    r = post(reasoner, max_tokens=64, thinking={"type": "enabled", "budget_tokens": 2})
    body = r.json()
    thinking, text = body["content"]
    assert thinking["thinking"] != THOUGHT and THOUGHT.startswith(thinking["thinking"])
    assert text["text"] == ANSWER and r.headers["x-squish-reasoning-closed"] == "budget"


def test_stop_sequence_is_reported(reasoner):
    body = message(reasoner, max_tokens=64, stop_sequences=["zzz", " 42"])
    assert body["content"][-1] == {"type": "text", "text": "The answer is"}
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", " 42")
    events = stream(reasoner, max_tokens=64, stop_sequences=["zzz", " 42"])
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": " 42"}
    assert blocks_of(events) == body["content"]
    short = message(reasoner, max_tokens=3)
    assert (short["stop_reason"], short["stop_sequence"]) == ("max_tokens", None)


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "weather"}])
def test_forced_tool_call_after_thinking(reasoner, choice):
    body = message(reasoner, max_tokens=64, tools=[WEATHER], tool_choice=choice)
    assert body["stop_reason"] == "tool_use" and body["content"][0]["thinking"] == THOUGHT
    calls = [b for b in body["content"] if b["type"] == "tool_use"]
    assert calls and [c["name"] for c in calls] == ["weather"] * len(calls)
    assert not any(b["type"] == "text" and "<tool_call>" in b["text"] for b in body["content"])
    for c in calls:
        assert c["id"].startswith("toolu_")
        jsonschema.validate(c["input"], UNIT)
    events = stream(reasoner, max_tokens=64, tools=[WEATHER], tool_choice=choice)
    check_sequence(events)
    streamed = blocks_of(events)
    assert streamed[0]["thinking"] == THOUGHT and events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert [b["type"] for b in streamed[1:]] == ["tool_use"] * len(streamed[1:])
    for c in streamed[1:]:
        jsonschema.validate(c["input"], UNIT)


def test_tool_choice_maps_onto_the_core():
    def job(**kw):
        return MessagesRequest.model_validate({"model": "m", "messages": HI, "max_tokens": 8, **kw}).to_job()

    tools = [WEATHER]
    cases = [({"type": "auto"}, ToolChoice("auto"), True), ({"type": "any"}, ToolChoice("required"), True),
             ({"type": "tool", "name": "weather"}, ToolChoice("function", "weather"), True),
             ({"type": "none"}, ToolChoice("none"), True),
             ({"type": "any", "disable_parallel_tool_use": True}, ToolChoice("required"), False),
             ({"type": "auto", "disable_parallel_tool_use": True}, ToolChoice("auto"), False)]
    for choice, want, parallel in cases:
        j = job(tools=tools, tool_choice=choice)
        assert (j.tool_choice, j.parallel_tool_calls) == (want, parallel), choice
        assert j.tools[0].parameters == UNIT and j.tools[0].description == "Weather"
    assert job(tools=tools).tool_choice is None  # Anthropic's default: auto with tools
    assert job(tool_choice={"type": "none"}).tool_choice is None and not job().structured
    j = job(thinking={"type": "enabled", "budget_tokens": 5}, stop_sequences=["x"], top_k=3, temperature=0.5)
    assert (j.reasoning.enabled, j.reasoning.budget_tokens, j.reasoning.param) == (True, 5, "thinking")
    assert (j.sampling.stop, j.sampling.top_k, j.sampling.temperature, j.max_tokens) == (("x",), 3, 0.5, 8)
    assert job(thinking={"type": "disabled"}).reasoning.enabled is False
    assert job(thinking={"type": "adaptive"}).reasoning.enabled is None


def test_history_becomes_the_core_messages():
    history = [
        {"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text", "text": "b"}]},
        {"role": "assistant", "content": [
            {"type": "redacted_thinking", "data": "opaque"},
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "text", "text": "calling"}, CALL]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "21C"}]},
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "down", "is_error": True},
            {"type": "text", "text": "so?"}]}]
    msgs = chat_messages([TextBlock(type="text", text="s1"), TextBlock(type="text", text="s2")],
                         [InputMessage.model_validate(m) for m in history])
    assert [(m.role, m.content) for m in msgs] == [
        ("system", "s1\n\ns2"), ("user", "a\n\nb"), ("assistant", "calling"), ("tool", "21C"),
        ("tool", "Error: down"), ("user", "so?")]
    assistant = msgs[2]
    assert assistant.reasoning == "hmm"
    assert [(c.id, c.name, json.loads(c.arguments)) for c in assistant.tool_calls] == [("toolu_1", "weather",
                                                                                        {"unit": "c"})]
    assert (msgs[3].tool_call_id, msgs[3].name) == ("toolu_1", "weather")


def test_tool_result_round_trip(reasoner):
    first = message(reasoner, max_tokens=64, tools=[WEATHER], tool_choice={"type": "tool", "name": "weather"})
    call = next(b for b in first["content"] if b["type"] == "tool_use")
    history = HI + [{"role": "assistant", "content": first["content"]},
                    {"role": "user", "content": [
                        {"type": "tool_result", "tool_use_id": call["id"], "content": [{"type": "text", "text": "21C"}]},
                        {"type": "text", "text": "And now?"}]}]
    body = message(reasoner, max_tokens=64, tools=[WEATHER], messages=history)
    assert body["stop_reason"] == "end_turn" and body["content"][-1] == {"type": "text", "text": ANSWER}
    errored = [{**history[-1], "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "boom",
                                            "is_error": True}]}]
    assert message(reasoner, max_tokens=64, tools=[WEATHER], messages=history[:-1] + errored)["content"]
    # thinking / redacted_thinking blocks and string content in the history are accepted
    history[1]["content"] = [{"type": "redacted_thinking", "data": "opaque"}] + history[1]["content"]
    assert post(reasoner, max_tokens=64, tools=[WEATHER], messages=history).status_code == 200
    n = post(reasoner, "/v1/messages/count_tokens", messages=history, tools=[WEATHER]).json()["input_tokens"]
    assert n == body["usage"]["input_tokens"] + body["usage"]["cache_read_input_tokens"]


def test_json_output_after_thinking(reasoner):
    body = message(reasoner, max_tokens=64, output_config={"format": {"type": "json_schema", "schema": UNIT}})
    thinking, text = body["content"]
    assert thinking["thinking"] == THOUGHT and body["stop_reason"] == "end_turn"
    jsonschema.validate(json.loads(text["text"]), UNIT)
    events = stream(reasoner, max_tokens=64, output_config={"format": {"type": "json_schema", "schema": UNIT}})
    jsonschema.validate(json.loads(blocks_of(events)[-1]["text"]), UNIT)
