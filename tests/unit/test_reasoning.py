"""Reasoning sections: the splitter alone, then the served reasoning fixture through Chat Completions.

The fixture (tests/tiny_reasoning.py) greedily writes ``<think>Let me think.</think>\\n\\nThe
answer is 42!``: the thinking text must land in ``reasoning_content`` (never in ``content``),
the switch must turn it off, a tool call or JSON reply must start after the section, and a
section over its budget is closed, not lost.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_reasoning import ANSWER, THOUGHT, make_reasoning_model  # noqa: E402

from squish.api.app import create_app  # noqa: E402
from squish.api.settings import ServeSettings  # noqa: E402
from squish.runtime.engine import Engine  # noqa: E402
from squish.serving.reasoning import ReasoningSplitter  # noqa: E402

UNIT = {"type": "object", "required": ["unit"], "additionalProperties": False,
        "properties": {"unit": {"enum": ["c", "f"]}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather", "parameters": UNIT}}]


def split_all(pieces, state="open"):
    s = ReasoningSplitter("<think>", "</think>", state)
    out = []
    for p in pieces:
        out += s.push(p)
    out += s.finish()
    kinds = {"reasoning": "", "text": ""}
    for k, t in out:
        kinds[k] += t
    return kinds, s


@pytest.mark.parametrize("pieces", [
    ["<think>\nLet me think.\n</think>\n\nThe answer."],
    list("<think>\nLet me think.\n</think>\n\nThe answer."),  # one character at a time
    ["<th", "ink>", "Let me", " think.", "</th", "ink>", "\n", "\nThe answer."],
])
def test_splitter_separates_reasoning_from_the_answer(pieces):
    kinds, s = split_all(pieces)
    assert kinds == {"reasoning": "Let me think.", "text": "The answer."}
    assert s.reasoning_tokens >= 1


def test_splitter_without_a_section_and_inside_one():
    assert split_all(["Hello <think> there"])[0] == {"reasoning": "", "text": "Hello <think> there"}
    assert split_all(["  plain"])[0] == {"reasoning": "", "text": "  plain"}
    # The prompt opened the section: the output starts inside it.
    assert split_all(["Hmm.</think>Done"], state="inside")[0] == {"reasoning": "Hmm.", "text": "Done"}
    # Cut by max_tokens inside the section: the reasoning is kept, the answer is empty.
    assert split_all(["<think>Still thinking </thi"])[0] == {"reasoning": "Still thinking </thi", "text": ""}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    path = make_reasoning_model(tmp_path_factory.mktemp("reasoning") / "tiny-reasoner")

    def load():
        from squish.runtime.loader import load_artifact

        return load_artifact(path)

    engine = Engine(load, max_batch=4, max_queue=4)
    settings = ServeSettings(rate_limit_per_minute=6000, rate_limit_burst=1000, max_tokens=256)
    with TestClient(create_app(settings, engine)) as c:
        assert engine.ready.wait(120), engine.load_error
        yield c


def chat(client, **kw):
    body = {"model": "tiny-reasoner", "messages": [{"role": "user", "content": "6 x 7?"}], "max_tokens": 64,
            "temperature": 0, **kw}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r


def stream(client, **kw):
    body = {"model": "tiny-reasoner", "messages": [{"role": "user", "content": "6 x 7?"}], "max_tokens": 64,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **kw}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [e for e in "".join(r.iter_text()).split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return chunks, "".join(d.get("reasoning_content") or "" for d in deltas), \
        "".join(d.get("content") or "" for d in deltas), deltas


def test_reasoning_is_split_from_content(client):
    body = chat(client).json()
    msg = body["choices"][0]["message"]
    assert (msg["reasoning_content"], msg["content"]) == (THOUGHT, ANSWER)
    assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 4
    chunks, reasoning, content, _ = stream(client)
    assert (reasoning, content) == (THOUGHT, ANSWER)
    assert chunks[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] >= 4


@pytest.mark.parametrize("switch", [{"reasoning_effort": "none"},
                                    {"chat_template_kwargs": {"enable_thinking": False}}])
def test_thinking_can_be_switched_off(client, switch):
    msg = chat(client, **switch).json()["choices"][0]["message"]
    assert msg["content"] == ANSWER and "reasoning_content" not in msg
    _, reasoning, content, _ = stream(client, **switch)
    assert (reasoning, content) == ("", ANSWER)


def test_a_forced_tool_call_comes_after_the_thinking(client):
    body = chat(client, tools=TOOLS, tool_choice="required").json()
    c = body["choices"][0]
    assert c["finish_reason"] == "tool_calls" and c["message"]["reasoning_content"] == THOUGHT
    (call,) = c["message"]["tool_calls"]
    jsonschema.validate(json.loads(call["function"]["arguments"]), UNIT)
    _, reasoning, content, deltas = stream(client, tools=TOOLS, tool_choice="required")
    assert reasoning == THOUGHT and "<tool_call>" not in content and "<think>" not in content
    frags = [tc for d in deltas for tc in d.get("tool_calls", [])]
    jsonschema.validate(json.loads("".join(f["function"].get("arguments", "") for f in frags)), UNIT)


def test_json_output_comes_after_the_thinking(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "u", "schema": UNIT}}
    msg = chat(client, response_format=fmt).json()["choices"][0]["message"]
    assert msg["reasoning_content"] == THOUGHT
    jsonschema.validate(json.loads(msg["content"]), UNIT)


def test_a_section_over_its_budget_is_closed_and_the_answer_follows(client):
    # Five tokens of thinking with its markers; at max_tokens 8 the JSON answer's reserve
    # (half the budget) is reached first, so the section is closed and the answer still fits.
    r = chat(client, response_format={"type": "json_object"}, max_tokens=8)
    body = r.json()
    msg = body["choices"][0]["message"]
    assert isinstance(json.loads(msg["content"]), dict) and body["choices"][0]["finish_reason"] == "stop"
    assert r.headers.get("x-squish-reasoning-closed") == "budget"
    assert msg.get("reasoning_content", "") != THOUGHT and THOUGHT.startswith(msg.get("reasoning_content", ""))
    assert "<think>" not in msg["content"] and "</think>" not in msg["content"]


def test_reasoning_cannot_be_forced_on_a_model_without_a_switch_off(client):
    r = client.post("/v1/chat/completions", json={
        "model": "tiny-reasoner", "messages": [{"role": "user", "content": "x"}],
        "chat_template_kwargs": {"enable_thinking": False, "system": "evil"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"
