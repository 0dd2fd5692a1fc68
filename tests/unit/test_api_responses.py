"""The OpenAI Responses adapter (/v1/responses) on tiny models: shapes, events, store, errors.

Routing and contracts only: the tiny random-weight model's text is noise, but the object and
event shapes, the store, the validation and the constraints (tool calls, JSON) are not. Every
body and event is also checked against the official SDK's types (``openai.types.responses``),
and the official async client is driven through the app in process (httpx2's ASGI transport).
The reasoning fixture (tests/tiny_reasoning.py) checks the thinking split into reasoning items.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import httpx2
import jsonschema
import openai
import pytest
from fastapi.testclient import TestClient
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402
from tiny_reasoning import ANSWER, THOUGHT, make_reasoning_model  # noqa: E402

from squish.api.app import create_app  # noqa: E402
from squish.api.settings import ServeSettings  # noqa: E402
from squish.runtime.engine import Engine  # noqa: E402

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
UNIT = {"type": "object", "required": ["unit"], "additionalProperties": False,
        "properties": {"unit": {"enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "name": "weather", "description": "Weather", "parameters": UNIT},
         {"type": "function", "name": "now", "parameters": None, "strict": False}]
# Squish does not count prompt-cache writes, so usage.input_tokens_details.cache_write_tokens
# (required in the newest SDK types; the SDK's own parsing reads it as None) is left out.
OMITTED = ("cache_write_tokens",)


def _event_classes() -> dict:
    import typing

    union = typing.get_args(ResponseStreamEvent)[0]
    return {v: cls for cls in typing.get_args(union) for v in typing.get_args(cls.model_fields["type"].annotation)}


EVENT_CLASSES = _event_classes()


def sdk_check(obj: dict, cls=SdkResponse) -> None:
    """``obj`` validates against the SDK's pydantic type (an event: its own member of the
    event union), but for the fields Squish omits."""
    if cls is None:
        assert obj["type"] in EVENT_CLASSES, f"the SDK knows no event {obj['type']!r}"
        cls = EVENT_CLASSES[obj["type"]]
    try:
        cls.model_validate(obj)
    except ValidationError as exc:
        errors = [e for e in exc.errors() if e["loc"][-1] not in OMITTED]
        assert not errors, (obj.get("type"), errors[:3])


def _engine(load_path):
    def load():
        from squish.runtime.loader import load_artifact

        return load_artifact(load_path)

    return Engine(load, max_batch=4, max_queue=4)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    art = make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "tiny-4bit")
    settings = ServeSettings(api_key=KEY, rate_limit_per_minute=6000, rate_limit_burst=1000, max_tokens=256)
    engine = _engine(art)
    app = create_app(settings, engine)
    with TestClient(app) as c:
        assert engine.ready.wait(120), engine.load_error
        # The tiny byte-level tokenizer spends ~500 tokens on the fallback tool prompt (test_api_tools).
        app.state.context_length = 4096
        c.app_ = app
        yield c


def create(client, **kw):
    body = {"model": "tiny-4bit", "input": "hi", "max_output_tokens": 8, "temperature": 0, **kw}
    return client.post("/v1/responses", json=body, headers=AUTH)


def ok(r) -> dict:
    assert r.status_code == 200, r.text
    body = r.json()
    sdk_check(body)
    return body


def events(client, model="tiny-4bit", **kw) -> list[dict]:
    body = {"model": model, "input": "hi", "max_output_tokens": 8, "temperature": 0, "stream": True, **kw}
    with client.stream("POST", "/v1/responses", json=body, headers=AUTH) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = "".join(r.iter_text())
    out = []
    for block in [b for b in raw.split("\n\n") if b]:
        head, data = block.split("\n", 1)
        ev = json.loads(data.removeprefix("data: "))
        assert head == f"event: {ev['type']}"
        sdk_check(ev, None)
        out.append(ev)
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    return out


def text_of(evs, kind="response.output_text.delta") -> str:
    return "".join(e["delta"] for e in evs if e["type"] == kind)


def run_sdk(app, fn):
    """``fn(client)`` with the official async client talking to ``app`` in process."""
    async def main():
        http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app), base_url="http://squish/v1")
        async with openai.AsyncOpenAI(base_url="http://squish/v1", api_key=KEY, max_retries=0,
                                      http_client=http) as oc:
            return await fn(oc)

    return asyncio.run(main())


# ---- shapes and events ----------------------------------------------------------------------------
def test_whole_response_shape_and_echo(client):
    body = ok(create(client, instructions="Be brief.", metadata={"k": "v"}, user="u1", top_p=0.9,
                     safety_identifier="s", prompt_cache_key="p", service_tier="auto", truncation="disabled",
                     client_metadata={"session": "1"}))
    assert body["id"].startswith("resp_") and body["object"] == "response" and body["model"] == "tiny-4bit"
    assert body["status"] in ("completed", "incomplete")
    if body["status"] == "incomplete":
        assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    (msg,) = body["output"]
    assert msg["type"] == "message" and msg["role"] == "assistant" and msg["id"].startswith("msg_")
    assert msg["content"][0]["type"] == "output_text" and msg["content"][0]["annotations"] == []
    u = body["usage"]
    assert u["total_tokens"] == u["input_tokens"] + u["output_tokens"] and 1 <= u["output_tokens"] <= 8
    assert "cached_tokens" in u["input_tokens_details"] and "reasoning_tokens" in u["output_tokens_details"]
    assert (body["instructions"], body["metadata"], body["user"], body["top_p"], body["temperature"]) == \
        ("Be brief.", {"k": "v"}, "u1", 0.9, 0)
    assert (body["store"], body["tools"], body["tool_choice"], body["parallel_tool_calls"]) == (True, [], "auto", True)
    assert body["text"] == {"format": {"type": "text"}, "verbosity": "medium"} and body["max_output_tokens"] == 8


def test_stream_event_sequence(client):
    evs = events(client)
    kinds = [e["type"] for e in evs]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    final = evs[-1]["response"]
    assert evs[0]["response"]["id"] == final["id"] and evs[0]["response"]["status"] == "in_progress"
    assert final["output"][0]["content"][0]["text"] == text_of(evs) == evs[-4]["text"]
    assert final["usage"]["output_tokens"] >= 1
    stored = client.get(f"/v1/responses/{final['id']}", headers=AUTH).json()
    assert stored == final


def test_the_official_client_parses_create_stream_and_the_store(client):
    async def go(oc):
        r = await oc.responses.create(model="tiny-4bit", input="hi", max_output_tokens=8, temperature=0)
        seen, text = [], ""
        async for ev in await oc.responses.create(model="tiny-4bit", input="hi", max_output_tokens=8,
                                                  temperature=0, stream=True):
            seen.append(ev.type)
            text += getattr(ev, "delta", "") if ev.type == "response.output_text.delta" else ""
        async with oc.responses.stream(model="tiny-4bit", input="hi", max_output_tokens=8, temperature=0) as s:
            async for _ in s:
                pass
        got = await oc.responses.retrieve(r.id)
        items = await oc.responses.input_items.list(r.id)
        await oc.responses.delete(r.id)
        with pytest.raises(openai.NotFoundError):
            await oc.responses.retrieve(r.id)
        return r, seen, text, got, items

    r, seen, text, got, items = run_sdk(client.app_, go)
    assert r.output_text and got.id == r.id and got.output_text == r.output_text
    assert seen[0] == "response.created" and seen[-1] in ("response.completed", "response.incomplete")
    assert text == r.output_text  # greedy: the same text streamed
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "hi"


def test_input_items_and_delete(client):
    first = ok(create(client, input="one"))
    second = ok(create(client, input=[{"role": "user", "content": "two"},
                                      {"type": "message", "role": "user", "content": [{"type": "input_text",
                                                                                       "text": "three"}]}],
                       previous_response_id=first["id"]))
    url = f"/v1/responses/{second['id']}/input_items"
    page = client.get(url, headers=AUTH).json()
    assert page["object"] == "list" and not page["has_more"]
    assert [d["content"][0]["text"] for d in page["data"]] == ["three", "two"]  # newest first, own items only
    asc = client.get(url + "?order=asc&limit=1", headers=AUTH).json()
    assert [d["content"][0]["text"] for d in asc["data"]] == ["two"] and asc["has_more"]
    nxt = client.get(url + f"?order=asc&after={asc['last_id']}", headers=AUTH).json()
    assert [d["content"][0]["text"] for d in nxt["data"]] == ["three"]
    r = client.delete(f"/v1/responses/{second['id']}", headers=AUTH)
    assert r.json() == {"id": second["id"], "object": "response", "deleted": True}
    for method in (client.get, client.delete):
        r = method(f"/v1/responses/{second['id']}", headers=AUTH)
        assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_store_false_keeps_nothing(client):
    body = ok(create(client, store=False))
    assert body["store"] is False
    assert client.get(f"/v1/responses/{body['id']}", headers=AUTH).status_code == 404
    r = create(client, previous_response_id=body["id"])
    assert r.status_code == 400 and r.json()["error"]["code"] == "previous_response_not_found"


def test_previous_response_id_continues_the_conversation(client):
    first = ok(create(client, input="Tell me a story.", instructions="Only in the first turn."))
    again = ok(create(client, input="And then?", previous_response_id=first["id"]))
    alone = ok(create(client, input="And then?"))
    grown = again["usage"]["input_tokens"] - alone["usage"]["input_tokens"]
    # the earlier input and output are in the prompt
    assert grown >= first["usage"]["output_tokens"] + 4
    assert again["previous_response_id"] == first["id"] and again["instructions"] is None
    r = create(client, previous_response_id="resp_nope")
    err = r.json()["error"]
    assert r.status_code == 400 and (err["param"], err["code"]) == ("previous_response_id", "previous_response_not_found")


@pytest.mark.parametrize("extra,status,param", [
    ({"frobnicate": 1}, 400, "frobnicate"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/a.png"}]}]}, 400, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input"),
    ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]}, 400, "input"),
    ({"input": [{"role": "user", "content": "x", "extra": 1}]}, 400, "input.0.message.extra"),
    ({"input": [{"type": "function_call_output", "call_id": "call_9", "output": "r"}]}, 400, "input[0].call_id"),
    ({"input": [{"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-openai"}]}, 400,
     "input[0].encrypted_content"),
    ({"tools": [{"type": "web_search"}]}, 400, "tools"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {"type": 5}}]}, 400, "tools[0].parameters"),
    ({"tools": [{"type": "function", "name": "bad name!"}]}, 400, "tools[0].name"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "file_search"}}, 400, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [
        {"type": "function", "name": "nope"}]}}, 400, "tool_choice.tools[0]"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"tools": TOOLS, "text": {"format": {"type": "json_object"}}}, 400, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, 400,
     "text.format.schema"),
    ({"text": {"verbosity": "low"}}, 400, "text.verbosity"),
    ({"background": True}, 400, "background"),
    ({"truncation": "auto"}, 400, "truncation"),
    ({"include": ["file_search_call.results"]}, 400, "include[0]"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"service_tier": "flex"}, 422, "service_tier"),
    ({"temperature": 3}, 422, "temperature"),
    ({"max_output_tokens": 0}, 422, "max_output_tokens"),
    ({"max_output_tokens": 257}, 400, "max_output_tokens"),  # over the server cap
    ({"input": []}, 422, "input"),
    ({"input": "bad\x00char"}, 400, None),
    ({"model": "gpt-5"}, 404, "model"),
    ({"reasoning": {"effort": "high"}}, 400, "reasoning.effort"),  # this model has no reasoning section
])
def test_bad_input_is_rejected_in_openai_shape(client, extra, status, param):
    r = create(client, **extra)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] in ("invalid_request_error", "not_found_error")
    if param:
        assert err["param"] and err["param"].startswith(param), err
    assert client.get("/health").status_code == 200


def test_wrong_key_is_401_in_openai_shape(client):
    r = client.post("/v1/responses", json={"model": "tiny-4bit", "input": "hi"},
                    headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/responses/resp_x").status_code == 401


# ---- tools, JSON, logprobs ----------------------------------------------------------------------
def _valid_call(item: dict, names=("weather", "now")) -> dict:
    assert item["type"] == "function_call" and item["status"] == "completed" and item["id"].startswith("fc_")
    assert item["call_id"].startswith("call_") and item["name"] in names
    args = json.loads(item["arguments"])
    if item["name"] == "weather":
        jsonschema.validate(args, UNIT)
    return args


@pytest.mark.parametrize("choice,names", [
    ("required", ("weather", "now")),
    ({"type": "function", "name": "weather"}, ("weather",)),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "weather"}]}, ("weather",)),
])
def test_a_forced_call_is_a_function_call_item(client, choice, names):
    body = ok(create(client, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False, max_output_tokens=160))
    calls = [i for i in body["output"] if i["type"] == "function_call"]
    assert len(calls) == 1 and body["status"] == "completed"
    _valid_call(calls[0], names)
    assert body["tools"][0] == {"type": "function", "name": "weather", "description": "Weather",
                                "parameters": UNIT, "strict": True}
    assert body["tool_choice"] == choice and body["parallel_tool_calls"] is False


def test_a_streamed_call_and_its_result_round_trip(client):
    evs = events(client, tools=TOOLS, tool_choice={"type": "function", "name": "weather"}, parallel_tool_calls=False,
                 max_output_tokens=160)
    final = evs[-1]["response"]
    assert evs[-1]["type"] == "response.completed"
    (call,) = [i for i in final["output"] if i["type"] == "function_call"]
    _valid_call(call, ("weather",))
    (delta,) = [e for e in evs if e["type"] == "response.function_call_arguments.delta"]
    (done,) = [e for e in evs if e["type"] == "response.function_call_arguments.done"]
    assert delta["delta"] == done["arguments"] == call["arguments"] and done["item_id"] == call["id"]
    # the result, continuing the stored response
    result = {"type": "function_call_output", "call_id": call["call_id"], "output": "21 degrees"}
    r = create(client, tools=TOOLS, tool_choice="none", previous_response_id=final["id"], input=[result])
    after = ok(r)
    assert [i["type"] for i in after["output"]] == ["message"]
    # the same, with the whole history sent back (store: false)
    history = [{"role": "user", "content": "hi"}, call, result]
    ok(create(client, tools=TOOLS, tool_choice="none", input=history, store=False))


def test_json_schema_output_validates(client):
    schema = {"type": "object", "required": ["ok", "size"], "additionalProperties": False,
              "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["s", "m", "l"]}}}
    fmt = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
    body = ok(create(client, text={"format": fmt}, max_output_tokens=160))
    jsonschema.validate(json.loads(body["output"][0]["content"][0]["text"]), schema)
    assert body["text"]["format"] == fmt
    evs = events(client, text={"format": fmt}, max_output_tokens=160)
    jsonschema.validate(json.loads(text_of(evs)), schema)
    body = ok(create(client, text={"format": {"type": "json_object"}}, max_output_tokens=160))
    assert isinstance(json.loads(body["output"][0]["content"][0]["text"]), dict)


IMPOSSIBLE = [{"type": "function", "name": "weather", "parameters": {
    "type": "object", "required": ["unit"], "additionalProperties": False,
    "properties": {"unit": {"enum": ["c", "f"], "not": {"enum": ["c", "f"]}}}}}]


def test_a_stream_that_fails_ends_with_response_failed(client):
    evs = events(client, tools=IMPOSSIBLE, tool_choice="required", parallel_tool_calls=False, max_output_tokens=160)
    assert [e["type"] for e in evs[-2:]] == ["error", "response.failed"]
    assert evs[-2]["code"] == "tool_call_failed"
    failed = evs[-1]["response"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "server_error"
    assert client.get(f"/v1/responses/{failed['id']}", headers=AUTH).status_code == 404
    r = create(client, tools=IMPOSSIBLE, tool_choice="required", parallel_tool_calls=False, max_output_tokens=160)
    assert r.status_code == 500 and r.json()["error"]["code"] == "tool_call_failed"


def test_logprobs_on_request(client):
    body = ok(create(client, include=["message.output_text.logprobs"], top_logprobs=2))
    part = body["output"][0]["content"][0]
    assert len(part["logprobs"]) == body["usage"]["output_tokens"]
    assert all(len(lp["top_logprobs"]) == 2 for lp in part["logprobs"])
    evs = events(client, include=["message.output_text.logprobs"], top_logprobs=2)
    assert sum(len(e["logprobs"]) for e in evs if e["type"] == "response.output_text.delta") == \
        evs[-1]["response"]["usage"]["output_tokens"]
    assert ok(create(client))["output"][0]["content"][0]["logprobs"] == []


# ---- the reasoning fixture ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    path = make_reasoning_model(tmp_path_factory.mktemp("reasoning") / "tiny-reasoner")
    engine = _engine(path)
    settings = ServeSettings(api_key=KEY, rate_limit_per_minute=6000, rate_limit_burst=1000, max_tokens=256)
    with TestClient(create_app(settings, engine)) as c:
        assert engine.ready.wait(120), engine.load_error
        yield c


def think(client, **kw):
    return create(client, **{"model": "tiny-reasoner", "input": "6 x 7?", "max_output_tokens": 64, **kw})


def test_thinking_is_a_reasoning_item(reasoner):
    body = ok(think(reasoner))
    rs, msg = body["output"]
    assert rs["type"] == "reasoning" and rs["id"].startswith("rs_") and rs["summary"] == []
    assert rs["content"] == [{"type": "reasoning_text", "text": THOUGHT}] and "encrypted_content" not in rs
    assert msg["content"][0]["text"] == ANSWER and body["usage"]["output_tokens_details"]["reasoning_tokens"] >= 4
    evs = events(reasoner, model="tiny-reasoner", input="6 x 7?", max_output_tokens=64)
    assert text_of(evs, "response.reasoning_text.delta") == THOUGHT and text_of(evs) == ANSWER
    kinds = [e["type"] for e in evs]
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [i["type"] for i in evs[-1]["response"]["output"]] == ["reasoning", "message"]
    assert "response.reasoning_summary_text.delta" not in kinds


@pytest.mark.parametrize("effort,on", [("none", False), ("minimal", False), ("low", True), ("high", True)])
def test_reasoning_effort_is_the_thinking_switch(reasoner, effort, on):
    body = ok(think(reasoner, reasoning={"effort": effort}))
    assert [i["type"] for i in body["output"]] == (["reasoning", "message"] if on else ["message"])
    assert body["output"][-1]["content"][0]["text"] == ANSWER and body["reasoning"]["effort"] == effort


def test_a_summary_repeats_the_thinking(reasoner):
    body = ok(think(reasoner, reasoning={"summary": "auto"}))
    assert body["output"][0]["summary"] == [{"type": "summary_text", "text": THOUGHT}]
    assert body["reasoning"]["summary"] == "auto"
    evs = events(reasoner, model="tiny-reasoner", input="6 x 7?", max_output_tokens=64,
                 reasoning={"summary": "detailed"})
    assert text_of(evs, "response.reasoning_summary_text.delta") == THOUGHT
    assert text_of(evs, "response.reasoning_text.delta") == THOUGHT


def test_a_forced_call_comes_after_the_thinking(reasoner):
    tools = [TOOLS[0]]
    body = ok(think(reasoner, tools=tools, tool_choice="required"))
    assert [i["type"] for i in body["output"]] == ["reasoning", "function_call"]
    _valid_call(body["output"][1], ("weather",))
    evs = events(reasoner, model="tiny-reasoner", input="6 x 7?", max_output_tokens=64, tools=tools,
                 tool_choice="required")
    assert text_of(evs, "response.reasoning_text.delta") == THOUGHT and text_of(evs) == ""
    assert [i["type"] for i in evs[-1]["response"]["output"]] == ["reasoning", "function_call"]
    _valid_call(evs[-1]["response"]["output"][1], ("weather",))


def test_encrypted_reasoning_round_trips_without_the_store(reasoner):
    body = ok(think(reasoner, include=["reasoning.encrypted_content"], store=False))
    rs = body["output"][0]
    assert rs["encrypted_content"].startswith("squish-reasoning-v1:")
    history = [{"role": "user", "content": "6 x 7?"}, {**rs, "content": None}, body["output"][1],
               {"role": "user", "content": "Again?"}]
    ok(think(reasoner, input=history, store=False))
    sent_back = {**rs, "encrypted_content": rs["encrypted_content"][:-4] + "!!!!", "content": None}
    r = think(reasoner, input=[history[0], sent_back, body["output"][1], history[3]])
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[1].encrypted_content"
