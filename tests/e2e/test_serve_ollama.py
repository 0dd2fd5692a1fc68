"""End to end: the Ollama API of a real ``squish serve`` subprocess, driven by the official
``ollama`` Python client: the SmolLM2 INT4 artifact for text, streams, JSON, tools and
errors; the tiny reasoning fixture (tests/tiny_reasoning.py) for ``think``. Every test
ends by checking that the server is still healthy."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import jsonschema
import ollama
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving import KEY, REQUEST_TIMEOUT_S, Server  # noqa: E402
from tiny_reasoning import ANSWER, THOUGHT, make_reasoning_model  # noqa: E402

FRUITS = [{"role": "user", "content": "List three fruits."}]
GREEDY = {"temperature": 0, "num_predict": 40}
# What the ollama client's Tool type keeps of a schema (type, properties with type /
# description / enum, required): the server sees exactly this.
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                "required": ["city"]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": WEATHER_ARGS}}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(smollm2_artifact):
    s = Server(smollm2_artifact, "--rate-limit", "600", "--rate-burst", "60")
    yield s
    assert s.stop() == 0
    out = Path(s.log.name).read_text()
    s.cleanup()
    assert "List three fruits" not in out  # prompts never reach the log


def _client(server):
    return server.ollama(timeout=REQUEST_TIMEOUT_S)


def test_tags_show_ps_and_version(server):
    c = _client(server)
    (m,) = c.list().models
    assert m.model == f"{server.model}:latest" and m.size > 50_000_000 and len(m.digest) == 64
    assert m.details.family == "llama" and m.details.quantization_level == "INT4"
    assert m.details.parameter_size.endswith("M")  # ~135M
    s = c.show(m.model)
    assert "completion" in s.capabilities and "tools" in s.capabilities
    assert s.modelinfo["llama.context_length"] >= 2048 and s.template
    (p,) = c.ps().models
    assert p.model == m.model and p.size > 0 and p.expires_at.year == 9999
    v = httpx.get(server.url + "/api/version", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert v["version"].count(".") == 2 and v["squish"]
    server.healthy()


def test_chat_whole_and_streamed_agree(server):
    c = _client(server)
    full = c.chat(model=server.model, messages=FRUITS, options=GREEDY)
    text = full.message.content
    assert full.done and full.done_reason in ("stop", "length") and full.message.role == "assistant"
    assert sum(f in text.lower() for f in ("apple", "banana", "orange", "grape", "strawberr", "mango")) >= 2, text
    assert full.eval_count <= 40 and full.prompt_eval_count > 0 and full.total_duration > full.eval_duration > 0
    parts = list(c.chat(model=f"{server.model}:latest", messages=FRUITS, options=GREEDY, stream=True))
    assert "".join(p.message.content or "" for p in parts) == text
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == full.eval_count and parts[-1].prompt_eval_count == full.prompt_eval_count
    server.healthy()


def test_stream_is_the_default_on_the_wire(server):
    body = {"model": server.model, "messages": FRUITS, "options": {"temperature": 0, "num_predict": 8}}
    r = httpx.post(server.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    objs = [json.loads(x) for x in r.text.splitlines()]
    assert len(objs) > 2 and objs[-1]["done"] and objs[-1]["eval_count"] == 8
    server.healthy()


def test_generate_templated_and_raw(server):
    c = _client(server)
    r = c.generate(model=server.model, prompt="List three fruits.", options=GREEDY)
    assert r.done and r.response.strip() and r.eval_count <= 40
    assert r.response == c.chat(model=server.model, messages=FRUITS, options=GREEDY).message.content
    raw = c.generate(model=server.model, prompt="The capital of France is", raw=True,
                     options={"temperature": 0, "num_predict": 8})
    assert raw.response.strip() and raw.prompt_eval_count < 10  # as is: no chat template around it
    parts = list(c.generate(model=server.model, prompt="The capital of France is", raw=True, stream=True,
                            options={"temperature": 0, "num_predict": 8}))
    assert "".join(p.response for p in parts) == raw.response
    server.healthy()


def test_format_json_and_schema(server):
    c = _client(server)
    ask = [{"role": "user", "content": "Return a JSON object with the key \"city\" set to the capital of France."}]
    obj = c.chat(model=server.model, messages=ask, format="json", options={"temperature": 0, "num_predict": 32})
    assert json.loads(obj.message.content)["city"] == "Paris"
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colors"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                             "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                        "maxItems": 3}}}
    r = c.chat(model=server.model, messages=[{"role": "user", "content": "Describe a person as JSON."}],
               format=schema, options={"temperature": 0, "num_predict": 48})
    jsonschema.validate(json.loads(r.message.content), schema)
    server.healthy()


def test_tool_call_validates_whole_and_streamed(server):
    c = _client(server)
    r = c.chat(model=server.model, messages=PARIS, tools=[WEATHER], options={"temperature": 0, "num_predict": 48})
    assert r.done_reason == "stop" and r.message.tool_calls, r.message
    call = r.message.tool_calls[0]
    assert call.function.name == "get_weather" and isinstance(call.function.arguments, dict)
    jsonschema.validate(call.function.arguments, WEATHER_ARGS)
    assert "paris" in call.function.arguments["city"].lower()
    assert "<tool_call>" not in (r.message.content or "")
    streamed = list(c.chat(model=server.model, messages=PARIS, tools=[WEATHER], stream=True,
                           options={"temperature": 0, "num_predict": 48}))
    calls = [t for p in streamed for t in (p.message.tool_calls or ())]
    assert [(t.function.name, t.function.arguments) for t in calls] == \
        [(t.function.name, t.function.arguments) for t in r.message.tool_calls]
    assert streamed[-1].done and streamed[-1].done_reason == "stop"
    server.healthy()


def test_tool_result_round_trip(server):
    c = _client(server)
    call = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    history = PARIS + [{"role": "assistant", "content": "", "tool_calls": [call]},
                       {"role": "tool", "content": "18 degrees celsius, sunny", "tool_name": "get_weather"}]
    final = c.chat(model=server.model, messages=history, tools=[WEATHER], options={"temperature": 0, "num_predict": 24})
    assert not final.message.tool_calls and final.message.content, final.message
    assert "<tool_call>" not in final.message.content
    assert "18" in final.message.content or "sunny" in final.message.content.lower(), final.message.content
    server.healthy()


def test_bad_input_is_an_ollama_error(server):
    c = _client(server)
    with pytest.raises(ollama.ResponseError) as exc:
        c.chat(model=server.model, messages=FRUITS, options={"mirostat": 1})
    assert exc.value.status_code == 400 and "options.mirostat" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        c.chat(model="llama3.2", messages=FRUITS)
    assert exc.value.status_code == 404 and "model 'llama3.2' not found" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        c.generate(model=server.model, prompt="x", template="{{ .Prompt }}")
    assert exc.value.status_code == 400 and "template" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:
        c.pull("llama3.2")
    assert exc.value.status_code == 501 and "squish quantize" in exc.value.error
    with pytest.raises(ollama.ResponseError) as exc:  # the error of a stream, before it started
        list(c.chat(model=server.model, messages=FRUITS, options={"num_ctx": 10 ** 7}, stream=True))
    assert exc.value.status_code == 400 and "options.num_ctx" in exc.value.error
    server.healthy()


def test_wrong_key_is_401(server):
    with pytest.raises(ollama.ResponseError) as exc:
        server.ollama(api_key="wrong").list()
    assert exc.value.status_code == 401 and "API key" in exc.value.error
    server.healthy()


def test_disconnect_cancels(server):
    before = server.cancelled()
    body = {"model": server.model, "messages": FRUITS, "options": {"num_predict": 2000, "temperature": 1.0}}
    server.leave_stream("/api/chat", body, lambda i, _: i > 4)
    server.wait_cancelled(before)
    assert 'squish_requests_total{route="/api/chat",status="499"}' in server.metrics()
    server.healthy()


def test_429_under_flood(server):
    c = httpx.Client(headers={"Authorization": f"Bearer {KEY}"})
    codes = [c.get(server.url + "/api/tags") for _ in range(120)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, "no 429 under a flood"
    assert list(limited[0].json()) == ["error"] and int(limited[0].headers["retry-after"]) >= 1
    server.healthy()
    time.sleep(60 * 60 / 600)  # let the bucket (burst 60 at 600/min) refill for the tests after this one


# ---- think: the tiny reasoning fixture served as a plain mlx_lm folder ------------------------

@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    s = Server(make_reasoning_model(tmp_path_factory.mktemp("reasoning") / "tiny-reasoner"))
    yield s
    assert s.stop() == 0
    s.cleanup()


def test_think_splits_thinking_stream_and_not(reasoner):
    c = reasoner.ollama(timeout=60)
    opts = {"temperature": 0, "num_predict": 64}
    r = c.chat(model="tiny-reasoner", messages=[{"role": "user", "content": "6 x 7?"}], think=True, options=opts)
    assert (r.message.thinking, r.message.content) == (THOUGHT, ANSWER)
    parts = list(c.chat(model="tiny-reasoner", messages=[{"role": "user", "content": "6 x 7?"}], think=True,
                        options=opts, stream=True))
    assert "".join(p.message.thinking or "" for p in parts) == THOUGHT
    assert "".join(p.message.content or "" for p in parts) == ANSWER
    off = c.chat(model="tiny-reasoner", messages=[{"role": "user", "content": "6 x 7?"}], think=False, options=opts)
    assert off.message.thinking is None and off.message.content == ANSWER
    g = c.generate(model="tiny-reasoner", prompt="6 x 7?", think="high", options=opts)
    assert (g.thinking, g.response) == (THOUGHT, ANSWER)
    assert "thinking" in c.show("tiny-reasoner").capabilities
    reasoner.healthy()


def test_a_tool_round_trip_after_thinking(reasoner):
    c = reasoner.ollama(timeout=60)
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather", "parameters": {
        "type": "object", "properties": {"unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["unit"]}}}]
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": "", "thinking": "I should call it.",
                "tool_calls": [{"function": {"name": "weather", "arguments": {"unit": "c"}}}]},
               {"role": "tool", "content": "21 degrees", "tool_name": "weather"}]
    r = c.chat(model="tiny-reasoner", messages=history, tools=tools, options={"temperature": 0, "num_predict": 64})
    assert (r.message.thinking, r.message.content) == (THOUGHT, ANSWER) and not r.message.tool_calls
    reasoner.healthy()
