"""Constrained decoding with llguidance on the real SmolLM2 tokenizer and model.

Grammar-level tests walk the mask without the model (fast); model tests run
the float32 reference of SmolLM2-135M-Instruct (the model the INT4 artifact is
built from) with short outputs.
"""

import json
import random

import numpy as np
import pytest

from squish.tools import constraints, loop, reference, registry, render, spec
from squish.tools.errors import ToolRequestError

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
                         "address": {"type": "object", "required": ["city"],
                                     "properties": {"city": {"type": "string", "maxLength": 10},
                                                    "zip": {"type": "string", "pattern": "^[0-9]{5}$"}}}}}
TOOLS = spec.parse_tools([
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather for a city",
     "parameters": {"type": "object", "required": ["city"], "additionalProperties": False,
                    "properties": {"city": {"type": "string", "maxLength": 20},
                                   "unit": {"enum": ["celsius", "fahrenheit"]}}}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "required": ["a", "b"], "additionalProperties": False,
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}}},
])
FAM = registry.by_name("smollm2")


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory):
    return reference.load_reference(smollm2_gguf, tmp_path_factory.mktemp("tools-ref"))


@pytest.fixture(scope="module")
def tok(smol):
    return smol[1]


def allowed(proc, tokens, vocab):
    import mlx.core as mx

    out = proc(mx.array(tokens), mx.zeros((1, vocab), dtype=mx.float32))
    assert out.dtype == mx.float32 and out.shape == (1, vocab)
    return np.flatnonzero(np.isfinite(np.array(out[0])))


def random_walk(constraint, tok, prompt_len=3, steps=300, seed=0):
    """Sample uniformly among allowed tokens until only EOS is left; returns the text."""
    rng = random.Random(seed)
    proc = constraint.processor(prompt_len)
    tokens = [0] * prompt_len
    eos = set(tok.eos_token_ids)
    for step in range(steps):
        ok = allowed(proc, tokens, 49152)
        assert len(ok) > 0
        non_eos = [int(t) for t in ok if t not in eos]
        if not non_eos:
            return tok.decode(tokens[prompt_len:]), proc
        if len(non_eos) < len(ok) and rng.random() < 0.3:
            t = next(iter(eos))
        else:
            # After a while prefer tokens that close strings, arrays and objects, so the walk ends.
            closers = [t for t in non_eos if any(ch in tok.decode([t]) for ch in '"]}')] if step > 15 else []
            t = rng.choice(closers or non_eos)
        if t in eos:
            return tok.decode(tokens[prompt_len:]), proc
        tokens.append(t)
    raise AssertionError("the grammar never ended")


@pytest.mark.parametrize("seed", range(4))
def test_json_schema_mask_only_admits_valid_documents(tok, seed):
    from squish.tools import validate

    c = constraints.json_output(tok, spec.OutputFormat("json_schema", SCHEMA))
    assert c.exact
    text, proc = random_walk(c, tok, seed=seed)
    assert proc.error is None
    value, err = validate.check_json_output(text, SCHEMA)
    assert err is None, (text, err)


def test_json_object_and_eos_only_when_complete(tok):
    c = constraints.json_output(tok, spec.OutputFormat("json_object"))
    proc = c.processor(1)
    eos = next(iter(tok.eos_token_ids))
    first = allowed(proc, [5], 49152)
    assert eos not in first and set(tok.decode([int(t)]) for t in first[:50]) <= {"{"} | set(
        tok.decode([int(t)]) for t in first if tok.decode([int(t)]).startswith("{"))
    ids = tok.encode('{"a": [1, 2]}')
    ok = allowed(proc, [5, *ids], 49152)
    assert list(ok) == [eos]  # complete object: only EOS


def test_logits_wider_than_the_tokenizer_are_masked(tok):
    c = constraints.json_output(tok, spec.OutputFormat("json_object"))
    ok = allowed(c.processor(1), [5], 49152 + 64)
    assert ok.max() < 49152


def test_invalid_schema_for_the_grammar_engine_is_a_400(tok):
    with pytest.raises(ToolRequestError, match="cannot be used for constrained decoding") as ei:
        constraints.json_output(tok, spec.OutputFormat("json_schema", {"type": "object", "$ref": "#/nope"}))
    assert ei.value.status == 400


@pytest.mark.parametrize("choice", [spec.ToolChoice("required"), spec.ToolChoice("function", "add")])
def test_tool_call_grammar_walk(tok, choice):
    from squish.tools import validate

    c = constraints.tool_calls(tok, FAM, TOOLS, choice, parallel=True)
    for seed in range(2):
        text, _ = random_walk(c, tok, seed=seed)
        calls = FAM.parse(text).calls
        assert calls and all(validate.check_call(k, {t.name: t for t in TOOLS}) is None for k in calls), text
        if choice.mode == "function":
            assert {k.name for k in calls} == {"add"}


def test_none_has_no_constraint_and_unknown_named_is_400(tok):
    assert constraints.tool_calls(tok, FAM, TOOLS, spec.ToolChoice("none")) is None
    with pytest.raises(ToolRequestError):
        constraints.tool_calls(tok, FAM, TOOLS, spec.ToolChoice("function", "nope"))


def test_auto_is_free_until_the_marker_then_constrained(tok):
    c = constraints.tool_calls(tok, FAM, TOOLS, spec.ToolChoice("auto"), parallel=False)
    proc = c.processor(2)
    prompt = [7, 8]
    text_ids = tok.encode("Let me look.")
    assert len(allowed(proc, prompt + text_ids, 49152)) == 49152  # free text: nothing masked
    marker = tok.encode("\n<tool_call>")
    ok = allowed(proc, prompt + text_ids + marker, 49152)
    assert len(ok) < 100 and all("\n".startswith(tok.decode([int(t)])[:1]) for t in ok)
    rest = tok.encode('\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')
    ok = allowed(proc, prompt + text_ids + marker + rest, 49152)
    assert list(ok) == sorted(tok.eos_token_ids)  # parallel=False: one call, then only EOS
    assert proc.error is None


def test_auto_marker_split_inside_a_token(tok):
    c = constraints.tool_calls(tok, FAM, TOOLS, spec.ToolChoice("auto"))
    proc = c.processor(0)
    ids = tok.encode('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}')
    ok = allowed(proc, ids, 49152)
    assert ok.size and proc.error is None
    assert [tok.decode([int(t)]) for t in ok] == ["\n"]  # the call object is complete: "\n</tool_call>" next


def test_bad_token_forces_eos_and_records_error(tok):
    c = constraints.json_output(tok, spec.OutputFormat("json_object"))
    proc = c.processor(0)
    ok = allowed(proc, tok.encode("hello"), 49152)
    assert list(ok) == sorted(tok.eos_token_ids) and proc.error


def _first_chars(tok, ids):
    return {tok.decode([int(t)])[:1] for t in ids}


def test_a_loop_inside_a_string_is_closed_then_its_object(tok):
    schema = {"type": "object", "properties": {"q": {"type": "string"}, "n": {"type": "integer"}},
              "required": ["q"], "additionalProperties": False}
    proc = constraints.json_output(tok, spec.OutputFormat("json_schema", schema)).processor(0)
    head, rep = tok.encode('{"q": "https://x.com'), tok.encode("/search")
    ids = head + rep * 16  # >= LOOP_SPAN tokens of repetition
    before = allowed(proc, head + rep * 4, 49152)
    assert len(before) > 1000 and proc.loops_closed == 0  # no loop yet: the string may go on
    ok = allowed(proc, ids, 49152)
    assert proc.loops_closed == 1 and _first_chars(tok, ok) == {'"'}
    ids += tok.encode('"')
    ok = allowed(proc, ids, 49152)
    assert _first_chars(tok, ok) == {"}"}  # the optional "n" is skipped: the object closes
    ids += tok.encode("}")
    assert list(allowed(proc, ids, 49152)) == sorted(tok.eos_token_ids)
    from squish.tools import validate

    value, err = validate.check_json_output(tok.decode(ids), schema)
    assert err is None and value["q"].startswith("https://x.com/search")


def test_a_closed_loop_keeps_required_fields_and_watching_resumes(tok):
    schema = {"type": "object", "properties": {"q": {"type": "string"}, "r": {"type": "string"}},
              "required": ["q", "r"], "additionalProperties": False}
    proc = constraints.json_output(tok, spec.OutputFormat("json_schema", schema)).processor(0)
    ids = tok.encode('{"q": "a') + tok.encode(" b") * 30
    assert _first_chars(tok, allowed(proc, ids, 49152)) == {'"'}
    ids += tok.encode('"')
    ok = allowed(proc, ids, 49152)
    assert "," in _first_chars(tok, ok) and "}" not in _first_chars(tok, ok)  # "r" is required
    ids += tok.encode(', "r": "')
    assert len(allowed(proc, ids, 49152)) > 1000  # the new string is free again
    ids += tok.encode(" c") * 30
    assert _first_chars(tok, allowed(proc, ids, 49152)) == {'"'} and proc.loops_closed == 2


def test_a_loop_over_array_items_ends_the_array(tok):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["tags"], "additionalProperties": False}
    proc = constraints.json_output(tok, spec.OutputFormat("json_schema", schema)).processor(0)
    ids = tok.encode('{"tags": ["x"') + tok.encode(', "x"') * 12
    ok = allowed(proc, ids, 49152)
    assert proc.loops_closed == 1 and _first_chars(tok, ok) == {"]"}


def adversarial_walk(constraint, tok, max_tokens, budget=True):
    """A "model" that never closes anything it may leave open: it takes the first allowed token
    that is not EOS and does not start with a closer, while one exists. Returns (text, proc, n)."""
    proc = constraint.processor(0, max_tokens if budget else None)
    eos = set(tok.eos_token_ids)
    tokens: list[int] = []
    while len(tokens) < max_tokens:
        ok = [int(t) for t in allowed(proc, tokens, 49152)]
        keep = [t for t in ok if t not in eos and tok.decode([t])[:1] not in '"]}']
        t = (keep or ok)[0]
        if t in eos:
            return tok.decode(tokens), proc, len(tokens) + 1
        tokens.append(t)
    return tok.decode(tokens), proc, None


@pytest.mark.parametrize("kind", ["json_schema", "tools"])
def test_the_token_budget_finishes_a_reply_that_would_never_close(tok, kind):
    from squish.tools import validate

    schema = {"type": "object", "properties": {"to": {"type": "array", "items": {"type": "string"}},
                                               "note": {"type": "string"}},
              "required": ["to"], "additionalProperties": False}
    if kind == "json_schema":
        c = constraints.json_output(tok, spec.OutputFormat("json_schema", schema))
    else:
        tools = spec.parse_tools([{"type": "function", "function": {"name": "mail", "parameters": schema}}])
        c = constraints.tool_calls(tok, FAM, tools, spec.ToolChoice("required"))
    text, proc, n = adversarial_walk(c, tok, max_tokens=60)
    assert n is not None and n <= 60, text  # ended with EOS inside the budget
    assert proc.closed_early == "length" and proc.error is None
    if kind == "json_schema":
        assert validate.check_json_output(text, schema)[1] is None, text
    else:
        calls = FAM.parse(text).calls
        assert calls and all(validate.check_call(k, {"mail": tools[0]}) is None for k in calls), text
    # without a budget the same "model" is still going at 60 tokens
    _, proc, n = adversarial_walk(c, tok, max_tokens=60, budget=False)
    assert n is None and proc.closed_early != "length"


def test_a_reply_that_ends_naturally_inside_the_reserve_is_not_marked(tok):
    import mlx.core as mx

    schema = {"type": "object", "properties": {"to": {"type": "array", "items": {"type": "string"}}},
              "required": ["to"], "additionalProperties": False}
    c = constraints.json_output(tok, spec.OutputFormat("json_schema", schema))
    natural = tok.encode('{"to": ["ana@x.org"]}') + [next(iter(tok.eos_token_ids))]
    # inside the string, finishing starts 10 tokens before the budget: here, once the address is
    # written, so every later step is narrowed to closers, which is what this "model" wants anyway
    proc = c.processor(0, len(natural) + 7)  # 12 tokens; finishing from the 10th (`"]`) on
    for i, want in enumerate(natural):
        logits = mx.where(mx.arange(49152) == want, 10.0, 0.0)[None]  # the "model" prefers the natural token
        out = proc(mx.array(natural[:i]), logits)
        assert np.isfinite(np.array(out[0, want])), tok.decode(natural[:i])
    proc(mx.array(natural), mx.zeros((1, 49152)))  # a last call lets it check the last choice
    assert proc._budget_mode and proc.closed_early is None


def test_model_json_schema_output_validates(smol):
    model, tok = smol
    fmt = spec.OutputFormat("json_schema", {"type": "object", "additionalProperties": False,
                                            "required": ["name", "color"],
                                            "properties": {"name": {"type": "string", "maxLength": 20},
                                                           "color": {"enum": ["black", "white", "orange"]}}})
    ids = tok.apply_chat_template([{"role": "user", "content": "Describe a cat as JSON."}], add_generation_prompt=True)
    g = reference.generate(model, tok, ids, max_tokens=40, constraint=constraints.json_output(tok, fmt))
    assert g.finish_reason == "stop" and g.problem is None
    value = json.loads(g.text)
    assert set(value) == {"name", "color"} and value["color"] in ("black", "white", "orange")


def test_model_agent_loop_call_then_result_then_answer(smol):
    """Named tool_choice → a valid call; the tool result goes back through the
    fallback prompt; with tool_choice none the model answers in text."""
    import asyncio

    model, tok = smol
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]

    from squish.serving.attempts import run_attempts
    from squish.serving.events import Restart, collect

    def served(task, max_tokens, msgs):
        """What the server returns: the serving core's attempt loop around the real model."""
        c = constraints.tool_calls(tok, FAM, task.tools, task.choice, task.parallel)
        restarts = []

        async def generate(convo):
            ids = render.encode_chat(tok, convo, task.tools, task.choice, FAM)
            for ev in reference.engine_events(reference.generate(model, tok, ids, max_tokens=max_tokens,
                                                                 constraint=c)):
                yield ev

        async def events():
            async for ev in run_attempts(generate, msgs, task, stats=loop.ToolStats()):
                if isinstance(ev, Restart):
                    restarts.append(ev)
                yield ev

        return asyncio.run(collect(events())), restarts

    t1 = loop.Task(FAM, TOOLS, spec.ToolChoice("function", "get_weather"), parallel=False)
    # 48: the call is ~30 tokens; the constraint starts closing ~10 tokens before max_tokens
    out, restarts = served(t1, 48, messages)
    assert restarts == [] and out.finish_reason == "tool_calls"
    (call,) = out.tool_calls
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] == "Paris"
    messages += [{"role": "assistant", "content": None,
                  "tool_calls": [{"id": call.id, "type": "function",
                                  "function": {"name": call.name, "arguments": call.arguments}}]},
                 {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 degrees celsius"}]
    t2 = loop.Task(FAM, TOOLS, spec.ToolChoice("none"))
    final, _ = served(t2, 12, messages)
    assert final.tool_calls == [] and final.content.strip()
    assert "<tool_call>" not in final.content


def test_batched_requests_each_carry_their_own_matcher(smol):
    """Two constrained requests in one mlx_lm BatchGenerator, different grammars."""
    from mlx_lm.generate import BatchGenerator

    model, tok = smol
    eos = sorted(tok.eos_token_ids)
    p1 = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], add_generation_prompt=True)
    p2 = tok.apply_chat_template([{"role": "user", "content": "A cat as JSON."}], add_generation_prompt=True)
    c1 = constraints.tool_calls(tok, FAM, TOOLS, spec.ToolChoice("function", "add"), parallel=False)
    c2 = constraints.json_output(tok, spec.OutputFormat("json_schema", {
        "type": "object", "required": ["name"], "additionalProperties": False,
        "properties": {"name": {"type": "string", "maxLength": 10}}}))
    gen = BatchGenerator(model, stop_tokens=[[t] for t in eos], completion_batch_size=2, prefill_batch_size=2)
    try:
        uids = gen.insert([p1, p2], max_tokens=[40, 30],
                          logits_processors=[[c1.processor(len(p1))], [c2.processor(len(p2))]])
        out = {u: [] for u in uids}
        done = set()
        while len(done) < 2:
            _, responses = gen.next()
            for r in responses:
                if r.token not in eos:
                    out[r.uid].append(r.token)
                if r.finish_reason is not None:
                    done.add(r.uid)
    finally:
        gen.close()
    call = FAM.parse(tok.decode(out[uids[0]])).calls[0]
    assert call.error is None and call.name == "add" and set(json.loads(call.arguments)) == {"a", "b"}
    assert set(json.loads(tok.decode(out[uids[1]]))) == {"name"}
