"""End to end: the Anthropic Messages API of a real ``squish serve``, driven by the official
``anthropic`` client: the SmolLM2 INT4 artifact (text, stream, tools, a tool_result round trip,
JSON output, stop sequences, errors, auth, disconnect, rate limit), and the tiny reasoning
fixture served as a plain mlx_lm folder (thinking blocks, stream and not, a tool call after
thinking). Every test ends by checking that the server is still healthy.

Anthropic's SDK no longer takes ``temperature`` as a keyword (newer Claude models reject it);
Squish honours it, so tests send it in ``extra_body``."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import anthropic
import httpx
import jsonschema
import pydantic
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving import KEY, REQUEST_TIMEOUT_S, Server  # noqa: E402
from tiny_reasoning import ANSWER, THOUGHT, make_reasoning_model  # noqa: E402

FRUITS = [{"role": "user", "content": "List three fruits."}]
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
GREEDY = {"temperature": 0}
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"], "additionalProperties": False}
WEATHER = {"name": "get_weather", "description": "Current weather for a city", "input_schema": WEATHER_ARGS}


@pytest.fixture(scope="module")
def server(smollm2_artifact):
    s = Server(smollm2_artifact, "--rate-limit", "600", "--rate-burst", "60")
    yield s
    assert s.stop() == 0
    out = Path(s.log.name).read_text()
    s.cleanup()
    assert "List three fruits" not in out  # prompts never reach the log


@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    s = Server(make_reasoning_model(tmp_path_factory.mktemp("reasoning") / "tiny-reasoner"))
    yield s
    assert s.stop() == 0
    s.cleanup()


def _client(server, **kw) -> anthropic.Anthropic:
    return server.anthropic(timeout=REQUEST_TIMEOUT_S, **kw)


def _blocks(content) -> list[dict]:
    """Content blocks as plain dicts (the stream helper returns its Parsed* subclasses)."""
    return [b.model_dump(exclude={"parsed_output"}) for b in content]


def _chat(server, messages, **kw) -> dict:
    """The same conversation through Chat Completions (greedy): the protocols must agree."""
    r = httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   timeout=REQUEST_TIMEOUT_S, json={"model": "default", "messages": messages, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_text_whole_and_streamed_agree(server):
    c = _client(server)
    msg = c.messages.create(model=server.model, max_tokens=40, messages=FRUITS, extra_body=GREEDY)
    assert isinstance(msg, anthropic.types.Message) and msg.id.startswith("msg_")
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    (block,) = msg.content
    assert block.text.strip() and block.text == _chat(server, FRUITS, max_tokens=40)["message"]["content"]
    assert msg.usage.output_tokens <= 40 and msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 10
    with c.messages.stream(model="default", max_tokens=40, messages=FRUITS, extra_body=GREEDY) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == block.text and _blocks(final.content) == _blocks(msg.content)
    assert (final.stop_reason, final.usage.output_tokens) == (msg.stop_reason, msg.usage.output_tokens)
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    counted = c.messages.count_tokens(model="default", messages=FRUITS).input_tokens
    assert counted == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    server.healthy()


def test_stop_sequence(server):
    c = _client(server)
    base = c.messages.create(model="default", max_tokens=40, messages=FRUITS, extra_body=GREEDY).content[0].text
    word = next(w for w in re.findall(r"[A-Za-z]{4,}", base)[1:])
    msg = c.messages.create(model="default", max_tokens=40, messages=FRUITS, extra_body=GREEDY,
                            stop_sequences=["zzzz-never", word])
    assert (msg.stop_reason, msg.stop_sequence) == ("stop_sequence", word)
    assert msg.content[0].text == base[: base.index(word)]
    server.healthy()


def test_forced_tool_call_validates(server):
    msg = _client(server).messages.create(model="default", max_tokens=48, messages=PARIS, tools=[WEATHER],
                                          tool_choice={"type": "tool", "name": "get_weather"}, extra_body=GREEDY)
    assert msg.stop_reason == "tool_use"
    calls = [b for b in msg.content if b.type == "tool_use"]
    assert calls and all(b.name == "get_weather" and b.id.startswith("toolu_") for b in calls)
    for b in calls:
        jsonschema.validate(b.input, WEATHER_ARGS)
    server.healthy()


def test_tool_result_round_trip(server):
    c = _client(server)
    call = anthropic.types.ToolUseBlock(type="tool_use", id="toolu_01", name="get_weather", input={"city": "Paris"})
    history = PARIS + [{"role": "assistant", "content": [call]},  # an SDK object, as clients send replies back
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01",
                                                     "content": "18 degrees celsius, sunny"}]}]
    final = c.messages.create(model="default", max_tokens=24, messages=history, tools=[WEATHER], extra_body=GREEDY)
    assert final.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert all("<tool_call>" not in b.text for b in final.content if b.type == "text")
    # The same turns in Chat Completions' shape render the same prompt, so give the same reply.
    same = _chat(server, PARIS + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "toolu_01", "type": "function", "function": {"name": "get_weather",
                                                                "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "toolu_01", "content": "18 degrees celsius, sunny"}], max_tokens=24,
        tools=[{"type": "function", "function": {"name": WEATHER["name"], "description": WEATHER["description"],
                                                 "parameters": WEATHER_ARGS}}])
    text = [b.text for b in final.content if b.type == "text"]
    assert text == ([same["message"]["content"]] if same["message"]["content"] else [])
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == \
        c.messages.count_tokens(model="default", messages=history, tools=[WEATHER]).input_tokens
    server.healthy()


def test_streamed_tool_call_with_the_sdk_stream_helper(server):
    with _client(server).messages.stream(model="default", max_tokens=48, messages=PARIS, tools=[WEATHER],
                                         tool_choice={"type": "any"}, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    calls = [b for b in final.content if b.type == "tool_use"]
    assert calls and not "".join(b.text for b in final.content if b.type == "text").strip()
    for b in calls:
        jsonschema.validate(b.input, WEATHER_ARGS)
    server.healthy()


class City(pydantic.BaseModel):
    city: str


def test_json_output(server):
    c = _client(server)
    ask = [{"role": "user", "content": "Return a JSON object with the key \"city\" set to the capital of France."}]
    parsed = c.messages.parse(model="default", max_tokens=32, messages=ask, output_format=City, extra_body=GREEDY)
    assert parsed.parsed_output.city == "Paris"
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}}}
    msg = c.messages.create(model="default", max_tokens=48, extra_body=GREEDY,
                            messages=[{"role": "user", "content": "Describe a person as JSON."}],
                            output_config={"format": {"type": "json_schema", "schema": schema}})
    jsonschema.validate(json.loads(msg.content[0].text), schema)
    server.healthy()


def test_errors_are_the_sdk_classes(server):
    c = _client(server)
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        c.messages.create(model="default", max_tokens=8, messages=FRUITS, extra_body={"temperature": 5})
    with pytest.raises(anthropic.BadRequestError, match="image blocks are not supported") as exc:
        c.messages.create(model="default", max_tokens=8, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}]}])
    assert exc.value.type == "invalid_request_error"
    with pytest.raises(anthropic.BadRequestError, match="server tools"):
        c.messages.create(model="default", max_tokens=8, messages=FRUITS,
                          tools=[{"type": "web_search_20250305", "name": "web_search"}])
    with pytest.raises(anthropic.NotFoundError, match=re.escape(server.model)) as exc:
        c.messages.create(model="claude-sonnet-4-6", max_tokens=8, messages=FRUITS)
    assert exc.value.type == "not_found_error"
    with pytest.raises(anthropic.AuthenticationError):
        _client(server, api_key="wrong").messages.create(model="default", max_tokens=8, messages=FRUITS)
    bearer = anthropic.Anthropic(base_url=server.url, api_key=None, auth_token=KEY, max_retries=0, timeout=60)
    assert bearer.messages.count_tokens(model="default", messages=FRUITS).input_tokens > 0
    server.healthy()


def test_disconnect_cancels(server):
    before = server.cancelled()
    body = {"model": "default", "max_tokens": 2000, "messages": FRUITS, "stream": True}
    server.leave_stream("/v1/messages", body, lambda i, _: i > 12, headers={"x-api-key": KEY})
    server.wait_cancelled(before)
    server.healthy()


def test_rate_limit_is_a_rate_limit_error(server):
    c = _client(server)
    with pytest.raises(anthropic.RateLimitError) as exc:
        for _ in range(120):
            c.messages.count_tokens(model="default", messages=FRUITS)
    assert exc.value.type == "rate_limit_error" and int(exc.value.response.headers["retry-after"]) >= 1
    server.healthy()
    time.sleep(60 * 60 / 600)  # let the bucket (burst 60 at 600/min) refill for the tests after this one


# ---- the reasoning fixture ----------------------------------------------------------------------

def test_thinking_blocks_whole_and_streamed(reasoner):
    c = _client(reasoner)
    msg = c.messages.create(model="default", max_tokens=64, messages=FRUITS, extra_body=GREEDY)
    thinking, text = msg.content
    assert (thinking.type, thinking.thinking, text.text) == ("thinking", THOUGHT, ANSWER)
    assert thinking.signature and msg.usage.output_tokens_details.thinking_tokens >= 4
    with c.messages.stream(model="default", max_tokens=64, messages=FRUITS, extra_body=GREEDY) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_message()
    assert _blocks(final.content) == _blocks(msg.content) and "thinking" in kinds and "signature" in kinds
    off = c.messages.create(model="default", max_tokens=64, messages=FRUITS, thinking={"type": "disabled"},
                            extra_body=GREEDY)
    assert [(b.type, b.text) for b in off.content] == [("text", ANSWER)]
    reasoner.healthy()


def test_tool_call_after_thinking(reasoner):
    c = _client(reasoner)
    unit = {"type": "object", "required": ["unit"], "additionalProperties": False,
            "properties": {"unit": {"enum": ["c", "f"]}}}
    tools = [{"name": "weather", "description": "Weather", "input_schema": unit}]
    msg = c.messages.create(model="default", max_tokens=64, messages=FRUITS, tools=tools,
                            tool_choice={"type": "any"}, thinking={"type": "enabled", "budget_tokens": 32},
                            extra_body=GREEDY)
    assert msg.stop_reason == "tool_use" and msg.content[0].thinking == THOUGHT
    for b in msg.content[1:]:
        assert b.type == "tool_use"
        jsonschema.validate(b.input, unit)
    with c.messages.stream(model="default", max_tokens=64, messages=FRUITS, tools=tools,
                           tool_choice={"type": "any"}, extra_body=GREEDY) as stream:
        final = stream.get_final_message()
    assert final.content[0].thinking == THOUGHT and final.stop_reason == "tool_use"
    for b in final.content[1:]:
        jsonschema.validate(b.input, unit)
    reasoner.healthy()
