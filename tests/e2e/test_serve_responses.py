"""End to end: the OpenAI Responses API of a real ``squish serve``, driven by the official
``openai`` client (``responses.create`` / ``.stream`` / ``.parse`` / ``.retrieve``): the SmolLM2
INT4 artifact for text, tools, JSON, the store, errors, disconnects and the rate limit, and the
tiny reasoning model (``squish serve <folder>``) for reasoning items. Every test ends by checking
that its server is still healthy."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from serving import KEY, REQUEST_TIMEOUT_S, Server  # noqa: E402
from tiny_reasoning import ANSWER, THOUGHT, make_reasoning_model  # noqa: E402

FRUITS = "List three fruits."
WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                 "unit": {"enum": ["celsius", "fahrenheit"]}},
                "required": ["city"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather for a city",
           "parameters": WEATHER_ARGS}
ADD = {"type": "function", "name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(smollm2_artifact):
    s = Server(smollm2_artifact, "--rate-limit", "600", "--rate-burst", "60")
    yield s
    assert s.stop() == 0
    out = Path(s.log.name).read_text()
    s.cleanup()
    assert FRUITS not in out  # prompts never reach the log


def test_text_whole_and_streamed_agree_with_chat_completions(server):
    c = server.client()
    r = c.responses.create(model=server.model, input=FRUITS, max_output_tokens=40, temperature=0)
    assert r.object == "response" and r.status in ("completed", "incomplete") and r.id.startswith("resp_")
    text = r.output_text
    # the same prompt as Chat Completions renders: the same greedy reply and token counts
    chat = c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": FRUITS}],
                                     max_tokens=40, temperature=0)
    assert text == chat.choices[0].message.content and text.strip()
    assert (r.usage.input_tokens, r.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    seen, deltas = [], ""
    for ev in c.responses.create(model=server.model, input=FRUITS, max_output_tokens=40, temperature=0, stream=True):
        seen.append(ev)
        if ev.type == "response.output_text.delta":
            deltas += ev.delta
    assert [e.sequence_number for e in seen] == list(range(len(seen)))
    assert seen[0].type == "response.created" and seen[-1].type == f"response.{r.status}"
    assert deltas == text and seen[-1].response.output_text == text
    assert seen[-1].response.usage.output_tokens == r.usage.output_tokens
    assert c.responses.retrieve(seen[-1].response.id).output_text == text  # stored by default
    server.healthy()


ASK = "What's the weather in Paris?"
AS_CHAT = [{"type": "function", "function": {k: v for k, v in t.items() if k != "type"}} for t in (WEATHER, ADD)]


def _forced_call(c, model):
    r = c.responses.create(model=model, input=ASK, tools=[WEATHER, ADD], max_output_tokens=48, temperature=0,
                           tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False)
    assert r.status == "completed"
    (call,) = [i for i in r.output if i.type == "function_call"]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER_ARGS)
    return r, call


def test_a_forced_call_validates_as_on_chat_completions(server):
    c = server.client(timeout=REQUEST_TIMEOUT_S)
    _, call = _forced_call(c, server.model)
    chat = c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": ASK}], tools=AS_CHAT,
                                     tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                     parallel_tool_calls=False, max_tokens=48, temperature=0)
    assert chat.choices[0].message.tool_calls[0].function.arguments == call.arguments  # the same prompt
    server.healthy()


def test_a_call_result_round_trips(server):
    c = server.client(timeout=REQUEST_TIMEOUT_S)
    r, call = _forced_call(c, server.model)
    result = "18 degrees celsius, sunny"
    final = c.responses.create(model=server.model, previous_response_id=r.id, tools=[WEATHER, ADD],
                               input=[{"type": "function_call_output", "call_id": call.call_id, "output": result}],
                               max_output_tokens=24, temperature=0)
    assert [i.type for i in final.output] == ["message"] and final.output_text.strip()
    assert "<tool_call>" not in final.output_text
    history = [{"role": "user", "content": ASK},
               {"role": "assistant", "tool_calls": [{"id": call.call_id, "type": "function", "function": {
                   "name": call.name, "arguments": call.arguments}}]},
               {"role": "tool", "tool_call_id": call.call_id, "content": result}]
    chat = c.chat.completions.create(model=server.model, messages=history, tools=AS_CHAT, max_tokens=24,
                                     temperature=0)
    assert final.output_text == chat.choices[0].message.content  # the result reached the prompt alike
    server.healthy()


def test_a_streamed_call_validates(server):
    c = server.client(timeout=REQUEST_TIMEOUT_S)
    with c.responses.stream(model=server.model, input="What is 17 plus 25?", tools=[WEATHER, ADD],
                            tool_choice={"type": "function", "name": "add"}, parallel_tool_calls=False,
                            max_output_tokens=40, temperature=0) as s:
        kinds = [ev.type for ev in s]
        final = s.get_final_response()
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    (call,) = [i for i in final.output if i.type == "function_call"]
    assert call.name == "add"
    jsonschema.validate(json.loads(call.arguments), ADD["parameters"])
    server.healthy()


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0)


def test_json_schema_output_validates_and_parses(server):
    c = server.client(timeout=REQUEST_TIMEOUT_S)
    schema = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
              "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}}}
    r = c.responses.create(model=server.model, input="Describe a person as JSON.", max_output_tokens=48,
                           temperature=0, text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                                                           "strict": True}})
    jsonschema.validate(json.loads(r.output_text), schema)
    parsed = c.responses.parse(model=server.model, input="Describe a person as JSON.", max_output_tokens=48,
                               temperature=0, text_format=Person)
    assert isinstance(parsed.output_parsed, Person)
    server.healthy()


def test_store_false_and_unknown_ids(server):
    c = server.client()
    r = c.responses.create(model=server.model, input="Say one word.", max_output_tokens=4, temperature=0, store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(r.id)
    with pytest.raises(openai.BadRequestError) as exc:
        c.responses.create(model=server.model, input="Again.", previous_response_id=r.id, max_output_tokens=4)
    assert exc.value.body["code"] == "previous_response_not_found"
    assert exc.value.body["param"] == "previous_response_id"
    server.healthy()


def test_bad_input_and_wrong_key(server):
    c = server.client()
    with pytest.raises(openai.BadRequestError, match="web_search"):
        c.responses.create(model=server.model, input="x", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="input_image"):
        c.responses.create(model=server.model, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/a.png"}]}])
    with pytest.raises(openai.UnprocessableEntityError):
        c.responses.create(model=server.model, input="x", temperature=5)
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="no-such-model", input="x")
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").responses.create(model=server.model, input="x")
    server.healthy()


def test_disconnect_cancels(server):
    before = server.cancelled()
    body = {"model": server.model, "input": "Count from 1 to 500, one number per line.", "max_output_tokens": 2000,
            "stream": True, "temperature": 0}
    server.leave_stream("/v1/responses", body, lambda _, line: "response.output_text.delta" in line)
    server.wait_cancelled(before)
    server.healthy()


def test_rate_limit_applies(server):  # last: it drains the bucket
    c = httpx.Client(headers={"Authorization": f"Bearer {KEY}"})
    codes = [c.post(server.url + "/v1/responses", json={}) for _ in range(120)]
    limited = [r for r in codes if r.status_code == 429]
    assert limited and int(limited[0].headers["retry-after"]) >= 1
    assert limited[0].json()["error"]["type"] == "rate_limit_error"
    server.healthy()


# ---- the reasoning fixture, served as a plain mlx_lm folder ---------------------------------------
@pytest.fixture(scope="module")
def reasoner(tmp_path_factory):
    s = Server(make_reasoning_model(tmp_path_factory.mktemp("reasoning") / "tiny-reasoner"))
    yield s
    assert s.stop() == 0
    s.cleanup()


def test_thinking_is_a_reasoning_item(reasoner):
    c = reasoner.client()
    r = c.responses.create(model=reasoner.model, input="6 x 7?", max_output_tokens=64, temperature=0)
    assert [i.type for i in r.output] == ["reasoning", "message"]
    assert r.output[0].content[0].text == THOUGHT and r.output_text == ANSWER
    assert r.usage.output_tokens_details.reasoning_tokens >= 4
    thought = answer = ""
    for ev in c.responses.create(model=reasoner.model, input="6 x 7?", max_output_tokens=64, temperature=0,
                                 stream=True):
        thought += ev.delta if ev.type == "response.reasoning_text.delta" else ""
        answer += ev.delta if ev.type == "response.output_text.delta" else ""
    assert (thought, answer) == (THOUGHT, ANSWER)
    off = c.responses.create(model=reasoner.model, input="6 x 7?", max_output_tokens=64, temperature=0,
                             reasoning={"effort": "none"})
    assert [i.type for i in off.output] == ["message"] and off.output_text == ANSWER
    reasoner.healthy()


def test_a_call_after_thinking(reasoner):
    unit = {"type": "object", "required": ["unit"], "additionalProperties": False,
            "properties": {"unit": {"enum": ["c", "f"]}}}
    tool = {"type": "function", "name": "weather", "parameters": unit}
    with reasoner.client().responses.stream(model=reasoner.model, input="6 x 7?", max_output_tokens=64,
                                            temperature=0, tools=[tool], tool_choice="required") as s:
        thought = "".join(ev.delta for ev in s if ev.type == "response.reasoning_text.delta")
        final = s.get_final_response()
    assert thought == THOUGHT and [i.type for i in final.output] == ["reasoning", "function_call"]
    jsonschema.validate(json.loads(final.output[1].arguments), unit)
    reasoner.healthy()
