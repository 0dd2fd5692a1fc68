"""The attempt loop of the serving core, with scripted generations (no model).

Each scripted attempt is the engine's events for one request: the reply text as one
``Delta``, then its ``Finish`` (or an ``Error``). The loop's output is collected as a
whole reply would be (``events.collect``); ``run`` also returns the events themselves.
"""

import asyncio
import json

import pytest

from squish.serving.attempts import run_attempts
from squish.serving.errors import ServeError
from squish.serving.events import Restart, collect
from squish.tools import loop, registry, spec
from squish.tools.reference import Generation, engine_events

FAM = registry.by_name("smollm2")
TOOLS = spec.parse_tools([
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "now"}},
])
MSGS = [{"role": "user", "content": "2+3?"}]


def call(name, args):
    return FAM.format_call(name, args)


def scripted(*gens):
    seen = []

    async def generate(messages):
        seen.append(messages)
        g = gens[len(seen) - 1]
        for ev in engine_events(g if isinstance(g, Generation) else Generation(g, "stop")):
            yield ev

    return generate, seen


class Out:
    """A collected reply, with what the loop's counters and events said."""

    def __init__(self, reply, events):
        self.reply, self.events = reply, events
        self.content = reply.content or None
        self.finish_reason = reply.finish_reason
        self.tool_calls = [{"function": {"name": c.name, "arguments": c.arguments}} for c in reply.tool_calls]
        self.causes = [e.cause for e in events if isinstance(e, Restart)]
        self.degraded = reply.done.degraded


def run(task, *gens, attempts=3):
    stats = loop.ToolStats()
    generate, seen = scripted(*gens)
    events = []

    async def go():
        async def tee():
            async for ev in run_attempts(generate, MSGS, task, max_attempts=attempts, stats=stats):
                events.append(ev)
                yield ev
        return await collect(tee())

    try:
        out = Out(asyncio.run(go()), events)
    except ServeError as exc:
        return exc, seen, stats
    out.attempts = stats.snapshot().get(("attempt", ""), 0)
    return out, seen, stats


def task(mode="required", name=None, **kw):
    return loop.Task(FAM, TOOLS, spec.ToolChoice(mode, name), **kw)


def test_valid_call_first_try():
    out, seen, stats = run(task(), call("add", {"a": 2, "b": 3}))
    assert out.finish_reason == "tool_calls" and out.attempts == 1 and out.content is None
    (c,) = out.tool_calls
    assert c["function"]["name"] == "add" and json.loads(c["function"]["arguments"]) == {"a": 2, "b": 3}
    assert stats.snapshot() == {("attempt", ""): 1, ("ok", ""): 1}


def test_schema_error_is_corrected_and_counted_as_rescued():
    out, seen, stats = run(task(), call("add", {"a": "2", "b": 3}), call("add", {"a": 2, "b": 3}))
    assert out.attempts == 2 and out.causes == ["schema_error"]
    fix = seen[1]
    assert fix[:1] == MSGS and fix[1]["role"] == "assistant" and "<tool_call>" in fix[1]["content"]
    assert fix[2]["role"] == "user" and "$.a" in fix[2]["content"] and "is not of type 'integer'" in fix[2]["content"]
    snap = stats.snapshot()
    assert snap[("retry", "schema_error")] == 1 and snap[("rescued", "")] == 1 and snap[("attempt", "")] == 2


def test_all_attempts_fail_raises_clear_error():
    bad = Generation("<tool_call>\n{\"name\": \"add\", \"arguments\": {\"a\": 1\n</tool_call>", "stop")
    rep = Generation("again again", "length", problem="repetition")
    nan = Generation("", "stop", problem="numerical")
    exc, seen, stats = run(task(), bad, rep, nan)
    assert isinstance(exc, ServeError) and exc.status == 500 and exc.code == "tool_call_failed"
    assert exc.causes == ["parse_error", "repetition", "numerical"]
    assert "3 attempt(s)" in str(exc) and "NaN/Inf" in str(exc)
    snap = stats.snapshot()
    assert snap[("failed", "numerical")] == 1 and snap[("retry", "parse_error")] == 1
    assert snap[("retry", "repetition")] == 1 and ("ok", "") not in snap


@pytest.mark.parametrize("text, cause", [
    ("I cannot do that.", "no_call"),
    (call("mul", {"a": 1}), "unknown_tool"),
    (call("now", {}), "unknown_tool"),  # a named tool_choice wants "add"
])
def test_failures_by_cause(text, cause):
    exc, _, _ = run(task("function", "add"), text, attempts=1)
    assert isinstance(exc, ServeError) and exc.causes == [cause]


def test_auto_allows_text_and_parallel_false_keeps_first_call():
    out, _, _ = run(task("auto"), "It is 5.")
    assert (out.content, out.tool_calls, out.finish_reason) == ("It is 5.", [], "stop")
    two = call("now", {}) + "\n" + call("add", {"a": 1, "b": 1})
    out, _, _ = run(task("auto", parallel=False), two)
    assert [c["function"]["name"] for c in out.tool_calls] == ["now"]
    out, _, _ = run(task("auto"), two)
    assert [c["function"]["name"] for c in out.tool_calls] == ["now", "add"]


def test_length_mid_call_ends_as_length_without_a_retry():
    # The constraint could not close the call within max_tokens: the same budget would end the
    # same way, so the reply ends as "length" (as OpenAI ends one), not in three attempts and a 500.
    out, seen, stats = run(task(), Generation('<tool_call>\n{"name": "add", "argu', "length"))
    assert (out.finish_reason, out.tool_calls, len(seen)) == ("length", [], 1)
    assert stats.snapshot()[("length", "")] == 1 and ("failed", "length") not in stats.snapshot()


def test_budget_closes_that_never_fit_end_as_length_not_a_500():
    # The constraint began closing for the budget on every attempt and still ran out mid-call
    # (the 500-request soak met one: three attempts, then 500 tool_call_failed). Retries can
    # rescue such a reply, so it is retried; when none does, the budget was the reason: "length".
    cut = Generation('<tool_call>\n{"name": "add", "argu', "length", closed_early="length")
    out, seen, stats = run(task(), cut, cut, cut)
    assert (out.finish_reason, out.tool_calls, len(seen)) == ("length", [], 3)
    assert ("failed", "length") not in stats.snapshot() and stats.snapshot()[("length", "")] == 1
    out, seen, _ = run(task(), cut, call("add", {"a": 1, "b": 2}))  # a retry that fits still wins
    assert out.finish_reason == "tool_calls" and len(seen) == 2
    exc, _, _ = run(task(), cut, "no call", "no call")  # the last attempt failed for another reason
    assert isinstance(exc, ServeError) and exc.causes == ["length", loop.validate.NO_CALL, loop.validate.NO_CALL]


def test_json_schema_output():
    fmt = spec.parse_response_format({"type": "json_schema", "json_schema": {"name": "r", "schema": {
        "type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}})
    t = loop.Task(FAM, fmt=fmt)
    out, seen, _ = run(t, '{"n": "x"}', ' {"n": 4} ')
    assert json.loads(out.content) == {"n": 4} and out.content == '{"n": 4}' and out.causes == ["schema_error"]
    assert "matches the schema" in seen[1][2]["content"]
    exc, _, _ = run(loop.Task(FAM, fmt=spec.OutputFormat("json_object")), "[1, 2]", "nope", '{"a": 1',
                    attempts=3)
    assert exc.causes == ["schema_error", "parse_error", "parse_error"]


def test_max_attempts_must_be_positive():
    with pytest.raises(ValueError):
        asyncio.run(collect(run_attempts(scripted("x")[0], MSGS, task(), max_attempts=0)))


def test_none_refuses_a_call_and_a_cut_last_parallel_call_is_dropped():
    exc, _, stats = run(task("none"), call("add", {"a": 1, "b": 2}), attempts=1)
    assert isinstance(exc, ServeError) and exc.causes == [loop.CALL_NOT_ALLOWED]
    out, _, _ = run(task("none"), "Five.")
    assert out.content == "Five." and not out.tool_calls
    two = call("add", {"a": 1, "b": 2}) + "\n" + '<tool_call>\n{"name": "add", "argu'
    out, _, _ = run(task(), Generation(two, "length"))
    assert out.finish_reason == "tool_calls" and len(out.tool_calls) == 1
    out, seen, _ = run(task(), Generation("", "length"))  # required, nothing complete: no retry
    assert (out.finish_reason, out.tool_calls, len(seen)) == ("length", [], 1)


def looped(text):
    return Generation(text, "stop", closed_early="repetition")


def test_a_closed_loop_is_retried_and_a_clean_retry_wins():
    good = call("add", {"a": 2, "b": 3})
    out, seen, stats = run(task(), looped(call("add", {"a": 2, "b": 33333})), good)
    assert out.attempts == 2 and out.causes == ["repetition"]
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"a": 2, "b": 3}
    assert "repeating itself" in seen[1][-1]["content"]
    snap = stats.snapshot()
    assert snap[("retry", "repetition")] == 1 and snap[("rescued", "")] == 1


def test_a_closed_loop_is_returned_when_no_attempt_does_better():
    first = call("add", {"a": 2, "b": 33333})
    out, _, stats = run(task(), looped(first), "no call at all", looped(call("add", {"a": 2, "b": 4444})))
    assert not isinstance(out, ServeError)
    assert out.attempts == 3 and out.causes == ["repetition", "no_call", "repetition"]
    assert json.loads(out.tool_calls[0]["function"]["arguments"]) == {"a": 2, "b": 4444}
    snap = stats.snapshot()
    assert snap[("degraded", "")] == 1 and ("failed", "repetition") not in snap


def test_a_closed_loop_that_is_invalid_still_fails():
    out, _, stats = run(task(), looped("<tool_call>{\"name\": \"add\""), "nope", "nope")
    assert isinstance(out, ServeError)
    assert ("degraded", "") not in stats.snapshot()


def test_a_close_in_the_last_of_several_calls_drops_that_call_only():
    two = call("add", {"a": 2, "b": 3}) + "\n" + call("add", {"a": 2, "b": 4444})
    out, seen, stats = run(task(), Generation(two, "stop", closed_early="length"))
    assert out.attempts == 1 and out.causes == [] and len(seen) == 1
    assert [json.loads(c["function"]["arguments"]) for c in out.tool_calls] == [{"a": 2, "b": 3}]
    assert stats.snapshot()[("ok", "")] == 1
    out, _, _ = run(task(parallel=False), Generation(two, "stop", closed_early="length"))
    assert out.attempts == 1 and len(out.tool_calls) == 1
    looped_two = Generation(two, "stop", closed_early="repetition")  # a loop may be in any call
    out, seen, _ = run(task(), looped_two, looped_two, looped_two)
    assert len(seen) == 3 and out.causes == ["repetition"] * 3 and len(out.tool_calls) == 2
