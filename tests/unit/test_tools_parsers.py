"""Per-family parsers, the registry, and the streaming parser."""

import json

import pytest

from squish.tools import registry
from squish.tools.families.base import ParsedCall
from squish.tools.stream import ContentDelta, ToolCallDelta, ToolStream

QWEN_TEMPLATE = "{% if tools %}<tools>{{ tools }}</tools> reply in <tool_call></tool_call>{% endif %}"
LLAMA_TEMPLATE = "<|start_header_id|>{% if tools %}<|python_tag|>{{ parameters }}{% endif %}"
MISTRAL_TEMPLATE = "[AVAILABLE_TOOLS]{{ tools }}[/AVAILABLE_TOOLS] [TOOL_CALLS]"
SMOL_TEMPLATE = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>"


@pytest.mark.parametrize("template, name", [
    (QWEN_TEMPLATE, "qwen"), (LLAMA_TEMPLATE, "llama3"), (MISTRAL_TEMPLATE, "mistral"),
    (SMOL_TEMPLATE, "smollm2"), ("{{ messages }}", "generic"), (None, "generic"),
])
def test_detect(template, name):
    assert registry.detect("llama", template).name == name


def test_by_name_unknown():
    with pytest.raises(KeyError, match="known"):
        registry.by_name("nope")


def test_qwen_parse_several_calls_and_content():
    fam = registry.by_name("qwen")
    text = ('Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": [1, 2]}"}\n</tool_call>')
    r = fam.parse(text)
    assert r.content == "Let me check."
    assert [(c.name, json.loads(c.arguments), c.error) for c in r.calls] == [
        ("a", {"x": 1}, None), ("b", {"y": [1, 2]}, None)]


@pytest.mark.parametrize("text, needle", [
    ('<tool_call>\n{"name": "a", "arguments": {"x": 1}\n</tool_call>', "not valid JSON"),
    ('<tool_call>\n{"arguments": {}}\n</tool_call>', "no \"name\""),
    ('<tool_call>\n{"name": "a"}\n</tool_call>', "no \"arguments\""),
    ('<tool_call>\n{"name": "a", "arguments": [1]}\n</tool_call>', "must be a JSON object"),
    ('<tool_call>\n{"name": "a", "arguments": {}}', "not closed"),
    ('<tool_call>\n{"name": "a", "arguments": {}} trailing\n</tool_call>', "unexpected text"),
])
def test_tagged_parse_errors(text, needle):
    (call,) = registry.by_name("qwen").parse(text).calls
    assert call.error and needle in call.error


def test_smollm2_accepts_a_list_in_one_block():
    r = registry.by_name("smollm2").parse('<tool_call>[{"name": "a", "arguments": {}}, '
                                          '{"name": "b", "arguments": {"k": "v"}}]</tool_call>')
    assert [c.name for c in r.calls] == ["a", "b"] and all(c.error is None for c in r.calls)


def test_llama_bare_json_python_tag_and_semicolons():
    fam = registry.by_name("llama3")
    r = fam.parse('{"name": "search", "parameters": {"q": "a;b"}}; {"name": "now", "parameters": {}}<|eot_id|>')
    assert [(c.name, json.loads(c.arguments)) for c in r.calls] == [("search", {"q": "a;b"}), ("now", {})]
    r = fam.parse('Sure. <|python_tag|>{"name": "now", "parameters": {}}<|eom_id|>')
    assert r.content == "Sure." and r.calls[0].name == "now"
    assert fam.parse("Just text.").calls == []


def test_mistral_both_formats():
    fam = registry.by_name("mistral")
    r = fam.parse('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]</s>')
    assert [c.name for c in r.calls] == ["a", "b"]
    r = fam.parse('[TOOL_CALLS]a[ARGS]{"x": 1}[TOOL_CALLS]b[ARGS]{}')
    assert [(c.name, json.loads(c.arguments)) for c in r.calls] == [("a", {"x": 1}), ("b", {})]


def test_generic_accepts_untagged_json_call():
    r = registry.by_name("generic").parse(' {"name": "a", "arguments": {"x": 1}}')
    assert r.calls[0].name == "a" and r.content == ""
    plain = registry.by_name("generic").parse('{"answer": 42}')  # JSON that is not a call is content
    assert plain.calls == [] and plain.content == '{"answer": 42}'


def test_format_call_round_trips_through_parse():
    for fam in registry.FAMILIES:
        text = fam.format_call("f", {"a": [1, {"b": "c"}]})
        (call,) = fam.parse(text).calls
        assert (call.name, json.loads(call.arguments), call.error) == ("f", {"a": [1, {"b": "c"}]}, None), fam.name


def test_to_openai_ids_and_refuses_invalid():
    out = registry.to_openai([ParsedCall("a", '{"x": 1}'), ParsedCall("b", "{}")])
    assert [o["function"]["name"] for o in out] == ["a", "b"]
    assert all(o["id"].startswith("call_") and len(o["id"]) == 29 and o["type"] == "function" for o in out)
    assert out[0]["id"] != out[1]["id"]
    with pytest.raises(ValueError):
        registry.to_openai([ParsedCall("a", "", "broken")])


def _run_stream(stream, text, step):
    events = []
    for i in range(0, len(text), step):
        events += stream.push(text[i:i + step])
    return events + stream.finish()


@pytest.mark.parametrize("family", ["qwen", "smollm2", "generic"])
@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_stream_never_leaks_markers(family, step):
    fam = registry.by_name(family)
    text = ("Checking <b>now</b>.\n" + fam.format_call("a", {"x": "<tool_call>"}) + "\n"
            + fam.format_call("b", {}) + "\nDone.")
    events = _run_stream(ToolStream(fam), text, step)
    content = "".join(e.text for e in events if isinstance(e, ContentDelta))
    assert content == "Checking <b>now</b>.\nDone." or content == "Checking <b>now</b>.\n\nDone."
    assert "<tool_call>" not in content and "</tool_call>" not in content
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [c.openai()["index"] for c in calls] == [0, 0, 1, 1]
    assert calls[0].openai()["function"] == {"name": "a", "arguments": ""}
    assert calls[0].openai()["type"] == "function" and calls[0].openai()["id"].startswith("call_")
    assert json.loads(calls[1].openai()["function"]["arguments"]) == {"x": "<tool_call>"}
    assert "id" not in calls[1].openai()


def test_stream_llama_bare_json_and_plain_text():
    fam = registry.by_name("llama3")
    events = _run_stream(ToolStream(fam), '  {"name": "a", "parameters": {"k": 1}}', 1)
    assert not any(isinstance(e, ContentDelta) for e in events)
    assert events[0].name == "a" and json.loads(events[1].arguments) == {"k": 1}
    events = _run_stream(ToolStream(fam), "Hello there", 1)
    assert "".join(e.text for e in events) == "Hello there"


def test_stream_drops_invalid_calls_and_caps_parallel():
    fam = registry.by_name("qwen")
    check = (lambda c: ("unknown_tool", "no") if c.name == "bad" else None)
    s = ToolStream(fam, check=check, max_calls=1)
    text = fam.format_call("bad", {}) + fam.format_call("a", {}) + fam.format_call("b", {})
    events = _run_stream(s, text, 3)
    assert [e.name for e in events if e.id] == ["a"]
    assert s.failures == [("unknown_tool", "no")]


def test_stream_stops_on_a_repeated_call_and_drops_a_cut_marker():
    fam = registry.by_name("smollm2")
    block = fam.format_call("add", {"a": 1, "b": 2})
    ts = ToolStream(fam)
    events = ts.push(block + "\n" + fam.format_call("add", {"a": 3, "b": 4}) + "\n")
    assert not ts.repeated and len(ts.calls) == 2
    end = ts.accepted_end
    events += ts.push(block + "\n<tool_c")
    assert ts.repeated and len(ts.calls) == 2  # the identical third call is not emitted
    assert ts.text[:end].endswith("</tool_call>")
    events += ts.finish()
    assert not [e for e in events if isinstance(e, ContentDelta) and "<tool" in e.text]
    cut = ToolStream(fam)
    out = cut.push("Sure. <tool_ca") + cut.finish()  # max_tokens inside the marker
    assert [e.text for e in out if isinstance(e, ContentDelta)] == ["Sure. "]
    assert cut.failures and cut.failures[0][0] == "length"


# What SmolLM2 INT4 wrote under the forced-tool grammar for "Name a country and its capital."
# (issue 11's suite, via Anthropic Messages and Chat Completions alike): the closers and the end
# marker inside a string that is still open. Only the marker after the JSON ends the call.
INSIDE = '<tool_call>\n{"name": "reply", "arguments": {"country": "USA", "capital": "USA}}</tool_call> D.C."}}\n</tool_call>'


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_an_end_marker_inside_a_json_string_does_not_end_the_call(step):
    fam = registry.by_name("smollm2")
    parsed = fam.parse(INSIDE + "\nDone.")
    assert [(c.name, c.error) for c in parsed.calls] == [("reply", None)] and parsed.content == "Done."
    assert json.loads(parsed.calls[0].arguments) == {"country": "USA", "capital": "USA}}</tool_call> D.C."}
    events = _run_stream(ToolStream(fam), INSIDE, step)
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert json.loads(calls[1].openai()["function"]["arguments"])["capital"] == "USA}}</tool_call> D.C."
    assert not [e for e in events if isinstance(e, ContentDelta)]
    escaped = fam.format_call("a", {"q": 'say "</tool_call>" \\ ok'})
    assert json.loads(fam.parse(escaped).calls[0].arguments) == {"q": 'say "</tool_call>" \\ ok'}
