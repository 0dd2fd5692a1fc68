"""The Responses adapter's pure parts: the bounded store, and input items → the core's messages."""

from __future__ import annotations

import json

import pytest

from squish.api.openai_responses_items import encrypt, messages
from squish.api.openai_responses_schemas import ResponseRequest
from squish.api.response_store import ResponseStore
from squish.serving.errors import ServeError


def resp(rid: str, text: str = "x") -> dict:
    return {"id": rid, "object": "response", "output": [
        {"id": f"msg_{rid}", "type": "message", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": text, "annotations": []}]}]}


def user(text: str) -> dict:
    return {"id": f"in_{text}", "type": "message", "role": "user", "status": "completed",
            "content": [{"type": "input_text", "text": text}]}


def test_the_store_is_bounded_in_count_least_recently_used_first():
    s = ResponseStore(max_items=2, max_bytes=1 << 20)
    assert s.put(resp("a"), [user("1")], None) and s.put(resp("b"), [], "a")
    assert s.get("a") is not None  # a is now the most recently used
    s.put(resp("c"), [], None)
    assert "b" not in s and "a" in s and "c" in s and len(s) == 2


def test_the_store_is_bounded_in_bytes():
    one = len(json.dumps(resp("a", "y" * 100), separators=(",", ":"))) + len("[]")
    s = ResponseStore(max_items=100, max_bytes=2 * one + 10)
    for rid in "abc":
        assert s.put(resp(rid, "y" * 100), [], None)
    assert "a" not in s and len(s) == 2 and s.bytes <= s.max_bytes
    assert not s.put(resp("big", "z" * 10_000), [], None) and "big" not in s  # alone over the bound
    assert not ResponseStore(max_items=0).put(resp("d"), [], None)
    assert s.delete("b") and not s.delete("b") and s.bytes == len(json.dumps(resp("c", "y" * 100),
                                                                              separators=(",", ":"))) + 2


def test_a_conversation_is_the_chain_of_inputs_and_outputs():
    s = ResponseStore()
    s.put(resp("a", "A"), [user("1")], None)
    s.put(resp("b", "B"), [user("2")], "a")
    s.put(resp("c", "C"), [user("3")], "b")
    items = s.conversation("c")
    texts = [i["content"][0]["text"] for i in items]
    assert texts == ["1", "A", "2", "B", "3", "C"]
    with pytest.raises(ServeError) as e:
        s.conversation("zzz")
    assert (e.value.status, e.value.code, e.value.param) == (400, "previous_response_not_found", "previous_response_id")
    s.delete("a")
    with pytest.raises(ServeError, match="no longer stored"):
        s.conversation("c")


def test_continuing_a_response_keeps_its_whole_chain_alive():
    s = ResponseStore(max_items=3)
    s.put(resp("a"), [], None)
    s.put(resp("b"), [], "a")
    s.put(resp("x"), [], None)
    s.conversation("b")  # uses b and a: x is now the least recently used
    s.put(resp("c"), [], "b")
    assert "x" not in s and {"a", "b", "c"} <= {k for k in "abc" if k in s}


def request(items, **kw) -> ResponseRequest:
    return ResponseRequest.model_validate({"model": "m", "input": items, **kw})


def test_items_become_turns():
    items = request([
        {"role": "developer", "content": "Be terse."},
        {"role": "user", "content": [{"type": "input_text", "text": "Weather "}, {"type": "input_text",
                                                                                "text": "in Paris?"}]},
        {"type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": "Call it."}]},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": "{\"city\": \"Paris\"}"},
        {"type": "function_call", "call_id": "call_2", "name": "now", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Answer now."}]},
        {"role": "assistant", "content": "18C at noon."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Anything else?"}]},
    ]).normalized_input()
    msgs = messages([], items, "You help.")
    assert [(m.role, m.content) for m in msgs] == [
        ("system", "You help."), ("system", "Be terse."), ("user", "Weather in Paris?"), ("assistant", None),
        ("tool", "18C"), ("tool", "noon"), ("assistant", "18C at noon."), ("assistant", "Anything else?")]
    calls = msgs[3]
    assert calls.reasoning == "Call it." and [c.id for c in calls.tool_calls] == ["call_1", "call_2"]
    assert (msgs[4].name, msgs[4].tool_call_id) == ("weather", "call_1")
    assert msgs[6].reasoning == "Answer now." and msgs[7].reasoning is None
    assert all(i["id"] for i in items)


def test_a_result_needs_its_call_and_history_counts():
    history = request([{"type": "function_call", "call_id": "call_1", "name": "f",
                        "arguments": "{}"}]).normalized_input()
    out = request([{"type": "function_call_output", "call_id": "call_1", "output": "ok"}]).normalized_input()
    assert [m.role for m in messages(history, out, None)] == ["assistant", "tool"]
    with pytest.raises(ServeError) as e:
        messages([], out, None)
    assert e.value.param == "input[0].call_id"


def test_encrypted_reasoning_is_this_servers_own():
    item = {"type": "reasoning", "summary": [], "encrypted_content": encrypt("Let me see.")}
    (m,) = messages([], request([item]).normalized_input(), None)
    assert m.reasoning == "Let me see." and m.content == ""
    with pytest.raises(ServeError) as e:
        messages([], request([{**item, "encrypted_content": "gAAAAB-from-elsewhere"}]).normalized_input(), None)
    assert e.value.param == "input[0].encrypted_content"
