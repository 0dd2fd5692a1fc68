"""End to end: a real ``squish serve`` subprocess with the SmolLM2 INT4 artifact,
driven by the official ``openai`` client. Every test ends by checking that the
server is still healthy."""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import KEY, REQUEST_TIMEOUT_S, Server  # noqa: E402

FRUITS = [{"role": "user", "content": "List three fruits."}]

@pytest.fixture(scope="module")
def artifact(smollm2_artifact) -> Path:
    """The shared SmolLM2 INT4 artifact (SQUISH_TEST_ARTIFACT=PATH reuses a build: conftest.py)."""
    return smollm2_artifact


@pytest.fixture(scope="module")
def server(artifact):
    s = Server(artifact, "--rate-limit", "600", "--rate-burst", "60")
    yield s
    assert s.stop() == 0
    out = Path(s.log.name).read_text()
    s.cleanup()
    assert "List three fruits" not in out  # prompts never reach the log


def test_models(server):
    ids = [m.id for m in server.client().models.list().data]
    assert ids == [server.model]
    server.healthy()


def test_chat_non_stream_and_stream_agree(server):
    c = server.client()
    full = c.chat.completions.create(model=server.model, messages=FRUITS, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length")
    assert sum(f in text.lower() for f in ("apple", "banana", "orange", "grape", "strawberr", "mango")) >= 2, text
    chunks = list(c.chat.completions.create(model=server.model, messages=FRUITS, max_tokens=40,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    server.healthy()


def test_completions(server):
    r = server.client().completions.create(model=server.model, prompt="The capital of France is",
                                           max_tokens=8, temperature=0)
    assert r.choices[0].text.strip() and r.usage.completion_tokens <= 8
    server.healthy()


def test_stop_strings(server):
    c = server.client()
    base = c.chat.completions.create(model=server.model, messages=FRUITS, max_tokens=40,
                                     temperature=0).choices[0].message.content
    word = next(w for w in re.findall(r"[A-Za-z]{4,}", base)[1:])
    r = c.chat.completions.create(model=server.model, messages=FRUITS, max_tokens=40, temperature=0,
                                  stop=[word, "zzzz-never"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == base[: base.index(word)]
    server.healthy()


def test_seed_determinism_and_prefix_cache(server):
    c = server.client()
    kw = dict(model=server.model, messages=FRUITS, max_tokens=24, temperature=1.0, top_p=0.95)
    a = c.chat.completions.create(seed=1234, **kw)
    b = c.chat.completions.create(seed=1234, **kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert b.usage.prompt_tokens_details.cached_tokens > 0  # same prompt: prefix reused
    server.healthy()


def test_eight_concurrent_streams(server):
    c = server.client()

    def one(i):
        chunks = list(c.chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": f"Count from {i} to {i + 5}."}],
            max_tokens=16, temperature=0, stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")
        assert len({ch.id for ch in chunks}) == 1
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        return text, chunks[-1].usage

    with cf.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    ref = c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": "Count from 3 to 8."}],
                                    max_tokens=16, temperature=0)
    for text, usage in results:
        assert text.strip() and 1 <= usage.completion_tokens <= 16
    assert results[3][0] == ref.choices[0].message.content
    metrics = server.metrics()
    assert server.metric(text=metrics, name="squish_batch_size") >= 0
    # the model's weights alone are ~98 MB of MLX memory; the peak includes a batch of 8
    weights = sum(f.stat().st_size for f in server.artifact.glob("*.safetensors"))
    assert server.metric(text=metrics, name="squish_mlx_peak_memory_bytes") > server.metric(text=metrics, name="squish_mlx_active_memory_bytes") \
        >= 0.9 * weights
    server.healthy()


def test_disconnect_cancels(server):
    before = server.cancelled()
    body = {"model": server.model, "messages": FRUITS, "max_tokens": 2000, "stream": True,
            "temperature": 1.0, "logit_bias": {"2": -100}}
    server.leave_stream("/v1/chat/completions", body, lambda i, _: i > 4)
    server.wait_cancelled(before)
    server.healthy()


def test_whole_reply_is_cancelled_when_its_client_gives_up(server):
    # Issue 15: a non-streamed request used to run on after its client left (48 of 48 tokens).
    before = server.cancelled()
    body = {"model": server.model, "messages": FRUITS, "max_tokens": 2000, "temperature": 1.0,
            "logit_bias": {"2": -100}}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/chat/completions", json=body,
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=3)
    server.wait_cancelled(before, within_s=5, what="the whole reply ran on after its client left")
    assert 'squish_requests_total{route="/v1/chat/completions",status="499"}' in server.metrics()
    server.healthy()


def test_timeout_fires(artifact):
    short = Server(artifact, timeout=3)
    try:
        start = time.monotonic()
        with pytest.raises(openai.APIStatusError) as exc:
            short.client().chat.completions.create(
                model=short.model, messages=FRUITS, max_tokens=4000, temperature=1.2, seed=7,
                frequency_penalty=0.5, logit_bias={"2": -100})
        assert exc.value.status_code == 504 and "timed out" in exc.value.message
        assert time.monotonic() - start < 3 + 10
        short.healthy()
    finally:
        assert short.stop() == 0
        short.cleanup()


def test_bad_input(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="n > 1"):
        c.chat.completions.create(model=server.model, messages=FRUITS, n=2)
    with pytest.raises(openai.UnprocessableEntityError):
        c.chat.completions.create(model=server.model, messages=FRUITS, temperature=5)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=FRUITS)
    big = json.dumps({"model": server.model, "messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = httpx.post(server.url + "/v1/chat/completions", content=big,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413
    server.healthy()


def test_401_without_key(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    server.healthy()


def test_memory_does_not_grow(server):
    import psutil

    proc = psutil.Process(server.proc.pid)
    c = server.client()
    rss = []
    for i in range(16):
        c.chat.completions.create(model=server.model, max_tokens=8, temperature=0,
                                  messages=[{"role": "user", "content": "Say one word."}])
        rss.append(proc.memory_info().rss)
    growth = rss[-1] - rss[3]
    assert not all(b > a for a, b in zip(rss[3:], rss[4:])), rss  # not monotonic
    assert growth < 64 << 20, f"RSS grew {growth / 2**20:.1f} MiB over 12 requests"
    server.healthy()


def test_429_under_flood(server):
    c = httpx.Client(headers={"Authorization": f"Bearer {KEY}"})
    codes = [c.get(server.url + "/v1/models") for _ in range(120)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited, "no 429 under a flood"
    assert int(limited[0].headers["retry-after"]) >= 1
    server.healthy()  # /health is never rate limited
    time.sleep(60 * 60 / 600)  # let the bucket (burst 60 at 600/min) refill for the tests after this one


# ---- tools and structured outputs (issue 5) -------------------------------------------------
# Same server as above (one start per run). SmolLM2-135M through the fallback tool prompt;
# short outputs: a call is ~35 tokens.

WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
                                            "parameters": WEATHER_ARGS}}
ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"], "additionalProperties": False}}}
TOOL_SCHEMAS = {"get_weather": WEATHER_ARGS, "add": ADD["function"]["parameters"]}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]


def _tools_client(server):
    return server.client(timeout=REQUEST_TIMEOUT_S)


def _valid_calls(calls, names=("get_weather", "add")):
    import jsonschema

    assert calls
    for c in calls:
        assert c.id.startswith("call_") and c.type == "function" and c.function.name in names
        jsonschema.validate(json.loads(c.function.arguments), TOOL_SCHEMAS[c.function.name])
    return calls


def test_tool_agent_loop(server):
    c = _tools_client(server)
    r = c.chat.completions.create(model=server.model, messages=PARIS, tools=[WEATHER, ADD], tool_choice="required",
                                  max_tokens=48, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = _valid_calls(choice.message.tool_calls)
    assert calls[0].function.name == "get_weather"
    assert "paris" in json.loads(calls[0].function.arguments)["city"].lower()
    assert len({(x.function.name, x.function.arguments) for x in calls}) == len(calls)  # no repeated call
    history = PARIS + [choice.message.model_dump(exclude_none=True)] + [
        {"role": "tool", "tool_call_id": x.id, "content": "18 degrees celsius, sunny"} for x in calls]
    final = c.chat.completions.create(model=server.model, messages=history, tools=[WEATHER, ADD],
                                      max_tokens=24, temperature=0)
    answer = final.choices[0]
    assert answer.finish_reason in ("stop", "length") and not answer.message.tool_calls
    assert answer.message.content and "<tool_call>" not in answer.message.content
    assert "18" in answer.message.content or "sunny" in answer.message.content.lower(), answer.message.content
    server.healthy()


def test_tool_choice_named_none_and_one_call(server):
    c = _tools_client(server)
    named = c.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "What is 17 plus 25?"}], tools=[WEATHER, ADD],
        tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False,
        max_tokens=40, temperature=0)
    calls = _valid_calls(named.choices[0].message.tool_calls, names=("add",))
    assert len(calls) == 1 and json.loads(calls[0].function.arguments) == {"a": 17, "b": 25}
    none = c.chat.completions.create(model=server.model, messages=PARIS, tools=[WEATHER, ADD], tool_choice="none",
                                     max_tokens=12, temperature=0)
    assert not none.choices[0].message.tool_calls and none.choices[0].finish_reason in ("stop", "length")
    assert none.choices[0].message.content and "<tool_call>" not in none.choices[0].message.content
    server.healthy()


def test_parallel_calls_stream_as_tool_call_deltas(server):
    c = _tools_client(server)
    chunks = list(c.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "What's the weather in Paris and in Tokyo?"}],
        tools=[WEATHER], tool_choice="required", max_tokens=80, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    deltas = [ch.choices[0].delta for ch in chunks if ch.choices]
    assert not "".join(d.content or "" for d in deltas).strip()  # no raw call text as content
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.tool_calls or ():
            entry = calls.setdefault(tc.index, {"id": tc.id, "name": tc.function.name, "arguments": ""})
            entry["arguments"] += tc.function.arguments or ""
    cities = [json.loads(v["arguments"])["city"].lower() for v in calls.values()]
    assert [v["name"] for v in calls.values()] == ["get_weather"] * len(calls)
    assert len(calls) >= 2 and "paris" in cities[0], calls  # which cities is up to a 135M model
    assert len({v["id"] for v in calls.values()}) == len({v["arguments"] for v in calls.values()}) == len(calls)
    assert chunks[-2].choices[0].finish_reason == "tool_calls" and chunks[-1].usage.completion_tokens > 0
    server.healthy()


def test_json_object_and_json_schema_outputs_validate(server):
    import jsonschema

    c = _tools_client(server)
    ask = "Return a JSON object with the key \"city\" set to the capital of France."
    obj = c.chat.completions.create(model=server.model, response_format={"type": "json_object"}, max_tokens=32,
                                    temperature=0, messages=[{"role": "user", "content": ask}])
    assert json.loads(obj.choices[0].message.content)["city"] == "Paris"
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age", "colors"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0},
                             "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                        "maxItems": 3}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}
    r = c.chat.completions.create(model=server.model, response_format=fmt, max_tokens=48, temperature=0,
                                  messages=[{"role": "user", "content": "Describe a person as JSON."}])
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    server.healthy()


def test_invalid_tool_requests_are_400(server):
    c = _tools_client(server)
    bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"x": {"type": 7}}}}}
    with pytest.raises(openai.BadRequestError, match="not a valid JSON Schema") as exc:
        c.chat.completions.create(model=server.model, messages=PARIS, tools=[bad_schema])
    assert exc.value.body["param"] == "tools[0].function.parameters"
    with pytest.raises(openai.BadRequestError, match="nope") as exc:
        c.chat.completions.create(model=server.model, messages=PARIS, tools=[WEATHER],
                                  tool_choice={"type": "function", "function": {"name": "nope"}})
    assert exc.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError, match="JSON Schema"):
        c.chat.completions.create(model=server.model, messages=PARIS, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": 3}}})
    server.healthy()


# No reply can satisfy this schema: the grammar engine skips "not", jsonschema does not.
IMPOSSIBLE = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "required": ["unit"], "additionalProperties": False,
    "properties": {"unit": {"enum": ["celsius", "fahrenheit"], "not": {"enum": ["celsius", "fahrenheit"]}}}}}}


def test_all_retries_failed_is_a_clear_error(server):
    c = _tools_client(server)
    before = server.metric('squish_tool_failures_total{cause="schema_error"}')
    with pytest.raises(openai.InternalServerError) as exc:
        c.chat.completions.create(model=server.model, messages=PARIS, tools=[IMPOSSIBLE], tool_choice="required",
                                  parallel_tool_calls=False, max_tokens=60, temperature=0)
    assert exc.value.body["code"] == "tool_call_failed" and "3 attempt" in exc.value.body["message"]
    with pytest.raises(openai.APIError, match="no valid tool call"):
        list(c.chat.completions.create(model=server.model, messages=PARIS, tools=[IMPOSSIBLE],
                                       tool_choice="required", parallel_tool_calls=False, max_tokens=60,
                                       temperature=0, stream=True))
    metrics = server.metrics()
    assert server.metric(text=metrics, name='squish_tool_failures_total{cause="schema_error"}') == before + 2
    assert server.metric(text=metrics, name='squish_tool_retries_total{cause="schema_error"}') >= 4
    server.healthy()


def test_a_budget_too_small_for_any_call_is_a_400_not_three_attempts(server):
    c = _tools_client(server)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as exc:
        c.chat.completions.create(model=server.model, messages=PARIS, tools=[WEATHER], tool_choice="required",
                                  max_tokens=3, temperature=0)
    assert exc.value.body["code"] == "max_tokens_too_small" and exc.value.body["param"] == "max_tokens"
    assert "at least" in exc.value.body["message"]
    assert time.monotonic() - start < 5  # refused up front, nothing generated
    server.healthy()
