"""The protocol adapters against Chat Completions, on one `squish serve`: cost per token, and validity.

Two parts (issue 11):

- **overhead**: the same prompt streamed through each protocol (OpenAI Chat Completions,
  OpenAI Responses, Anthropic Messages, Ollama chat), greedy, the same `max_tokens`, in
  rounds whose order rotates; per-token time = (last content event - first content event) /
  (completion tokens - 1), tokens from each protocol's own usage. Reported: p50/p95/p99 per
  protocol and each adapter's ratio to Chat Completions (paired by round, Wilcoxon p). The
  target: every adapter within 2% of Chat Completions.
- **tools**: the tool-calling suite of `benchmarks/tool_calling.py` (30 tool prompts with a
  forced call, 20 JSON Schema prompts) sent whole through Chat Completions, Responses and
  Anthropic Messages; a reply is valid when every call names a given function and its
  arguments validate against its schema (JSON: the reply parses and validates). The target:
  the same validity through every route. (Ollama has no `tool_choice`, so it has no forced
  call to compare.)

    .venv/bin/python benchmarks/protocols.py --model <artifact> [--rounds 12] [--max-tokens 48]
    .venv/bin/python benchmarks/protocols.py --model <artifact> --part tools [--limit 10] [--prompts TEXT ...]

Writes benchmarks/results/<UTC stamp>_protocols/{config,results}.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402

from benchmarks.baseline import prompts  # noqa: E402
from benchmarks.baseline.stats import compare  # noqa: E402
from benchmarks.baseline.systems import SQUISH, Server, specs  # noqa: E402
from benchmarks.common import percentiles, write_results  # noqa: E402

PROTOCOLS = ("chat", "responses", "messages", "ollama")


def _events(resp: httpx.Response):
    """(arrival time, parsed JSON) of each SSE data line or NDJSON line."""
    for line in resp.iter_lines():
        now = time.perf_counter()
        line = line.strip()
        if not line or line.startswith("event:") or line == "data: [DONE]":
            continue
        if line.startswith("data: "):
            line = line[6:]
        yield now, json.loads(line)


def _stream(client: httpx.Client, url: str, proto: str, text: str, max_tokens: int) -> dict:
    msgs = [{"role": "user", "content": text}]
    if proto == "chat":
        path, body = "/v1/chat/completions", {"messages": msgs, "max_tokens": max_tokens, "stream": True,
                                               "stream_options": {"include_usage": True}}
    elif proto == "responses":
        path, body = "/v1/responses", {"input": text, "max_output_tokens": max_tokens, "stream": True,
                                        "store": False}
    elif proto == "messages":
        path, body = "/v1/messages", {"messages": msgs, "max_tokens": max_tokens, "stream": True}
    else:
        path, body = "/api/chat", {"messages": msgs, "stream": True, "options": {"num_predict": max_tokens,
                                                                                 "temperature": 0}}
    if proto != "ollama":
        body["temperature"] = 0
    body["model"] = "default"
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", url + path, json=body) as r:
        r.raise_for_status()
        for now, ev in _events(r):
            text_piece = _content(proto, ev)
            if text_piece:
                first = first or now
                last = now
            tokens = _tokens(proto, ev) or tokens
    return {"ttft": (first or t0) - t0, "decode_s": (last - first) if first else 0.0, "tokens": tokens}


def _content(proto: str, ev: dict) -> str:
    if proto == "chat":
        ch = ev.get("choices") or [{}]
        return (ch[0].get("delta") or {}).get("content") or ""
    if proto == "responses":
        return ev.get("delta", "") if ev.get("type") == "response.output_text.delta" else ""
    if proto == "messages":
        d = ev.get("delta") or {}
        return d.get("text", "") if ev.get("type") == "content_block_delta" else ""
    return (ev.get("message") or {}).get("content") or ""


def _tokens(proto: str, ev: dict) -> int:
    if proto == "chat":
        return (ev.get("usage") or {}).get("completion_tokens", 0)
    if proto == "responses":
        return ((ev.get("response") or {}).get("usage") or {}).get("output_tokens", 0) \
            if ev.get("type") in ("response.completed", "response.incomplete") else 0
    if proto == "messages":
        return (ev.get("usage") or {}).get("output_tokens", 0) if ev.get("type") == "message_delta" else 0
    return ev.get("eval_count", 0) if ev.get("done") else 0


def overhead(client: httpx.Client, url: str, rounds: int, warmups: int, max_tokens: int) -> tuple[dict, str]:
    samples: dict[str, list[dict]] = {p: [] for p in PROTOCOLS}
    for i in range(warmups):
        for p in PROTOCOLS:
            _stream(client, url, p, prompts.tagged(f"warm {i}", prompts.SHORT), 8)
    for i in range(rounds):
        order = PROTOCOLS[i % len(PROTOCOLS):] + PROTOCOLS[:i % len(PROTOCOLS)]
        text = prompts.tagged(f"round {i}", prompts.SHORT)
        for p in order:
            samples[p].append(_stream(client, url, p, text, max_tokens))
        print(f"round {i + 1}/{rounds}", file=sys.stderr, flush=True)

    def per_token(s: dict) -> float:
        return s["decode_s"] / (s["tokens"] - 1) if s["tokens"] > 1 and s["decode_s"] else float("nan")

    per = {p: [per_token(s) for s in v] for p, v in samples.items()}
    lines = ["## Per-token cost of each adapter (streaming, greedy)", "",
             f"{rounds} rounds after {warmups} warm-ups, order rotated each round; max_tokens {max_tokens}; "
             f"tokens generated: {sorted({s['tokens'] for v in samples.values() for s in v})}.", "",
             "| protocol | ms/token p50 | p95 | p99 | vs Chat Completions (p50 ratio, Wilcoxon p) |",
             "|---|---|---|---|---|"]
    comparisons = {}
    for p in PROTOCOLS:
        pc = percentiles([x * 1e3 for x in per[p]])
        if p == "chat":
            cmp_txt = "—"
        else:
            c = compare(per[p], per["chat"], higher_is_better=False)
            comparisons[p] = c
            cmp_txt = f"{c['ratio']:.3f}× (p = {c['p']:.3f}; {c['verdict']})"
        lines.append(f"| {p} | {pc['p50']:.1f} | {pc['p95']:.1f} | {pc['p99']:.1f} | {cmp_txt} |")
    return {"samples": samples, "per_token_s": per, "comparisons": comparisons}, "\n".join(lines)


def _tool_request(proto: str, prompt: str, tools: list, schema: dict | None) -> tuple[str, dict]:
    msgs = [{"role": "user", "content": prompt}]
    if proto == "chat":
        body = {"messages": msgs, "max_tokens": 128, "temperature": 0}
        if schema is not None:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema}}
        else:
            body.update(tools=tools, tool_choice="required")
        return "/v1/chat/completions", body
    if proto == "responses":
        body = {"input": prompt, "max_output_tokens": 128, "temperature": 0, "store": False}
        if schema is not None:
            body["text"] = {"format": {"type": "json_schema", "name": "reply", "schema": schema}}
        else:
            body.update(tool_choice="required", tools=[{"type": "function", "name": t["function"]["name"],
                                                        "description": t["function"].get("description", ""),
                                                        "parameters": t["function"]["parameters"]} for t in tools])
        return "/v1/responses", body
    body = {"messages": msgs, "max_tokens": 128, "temperature": 0}
    if schema is not None:  # Anthropic has no response format: one forced tool whose input is the reply
        body.update(tools=[{"name": "reply", "input_schema": schema}], tool_choice={"type": "tool", "name": "reply"})
    else:
        body.update(tool_choice={"type": "any"}, tools=[{"name": t["function"]["name"],
                                                          "description": t["function"].get("description", ""),
                                                          "input_schema": t["function"]["parameters"]} for t in tools])
    return "/v1/messages", body


def _valid(proto: str, body: dict, tools: list, schema: dict | None) -> tuple[bool, str]:
    import jsonschema

    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    if schema is not None:
        schemas = {"reply": schema}
    try:
        if proto == "chat":
            msg = body["choices"][0]["message"]
            if schema is not None:
                jsonschema.validate(json.loads(msg["content"]), schema)
                return True, ""
            calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in msg["tool_calls"]]
        elif proto == "responses":
            if schema is not None:
                text = "".join(p["text"] for o in body["output"] if o["type"] == "message" for p in o["content"])
                jsonschema.validate(json.loads(text), schema)
                return True, ""
            calls = [(o["name"], json.loads(o["arguments"])) for o in body["output"] if o["type"] == "function_call"]
        else:
            calls = [(b["name"], b["input"]) for b in body["content"] if b["type"] == "tool_use"]
        if not calls:
            return False, "no call"
        for name, args in calls:
            jsonschema.validate(args, schemas[name])
        return True, ""
    except Exception as exc:  # noqa: BLE001 - any failure to find or validate the reply is "invalid"
        return False, f"{type(exc).__name__}: {str(exc)[:120]}"


def _finish(proto: str, r: httpx.Response) -> str | None:
    """The route's own stop reason, so an invalid reply says whether it ran out of tokens."""
    if r.status_code != 200:
        return None
    body = r.json()
    if proto == "chat":
        return body["choices"][0].get("finish_reason")
    if proto == "responses":
        return body.get("status") + (f" ({body['incomplete_details'].get('reason')})"
                                     if body.get("incomplete_details") else "")
    return body.get("stop_reason")


def tools_suite(client: httpx.Client, url: str, limit: int, only: list[str] | None = None) -> tuple[dict, str]:
    from benchmarks.tool_calling import JSON_CASES, TOOL_CASES

    rows = []
    cases = [("tools", p, t, None) for p, t in TOOL_CASES[: limit or None]]
    cases += [("json_schema", p, [], s) for p, s in JSON_CASES[: limit or None]]
    if only:
        cases = [c for c in cases if any(o in c[1] for o in only)]
    for suite, prompt, tools, schema in cases:
        row = {"suite": suite, "prompt": prompt}
        for proto in ("chat", "responses", "messages"):
            path, body = _tool_request(proto, prompt, tools, schema)
            body["model"] = "default"
            r = client.post(url + path, json=body)
            ok, why = (False, f"HTTP {r.status_code}: {r.text[:120]}") if r.status_code != 200 else \
                _valid(proto, r.json(), tools, schema)
            row[proto] = {"valid": ok, "why": why, "status": r.status_code, "finish": _finish(proto, r)}
        rows.append(row)
        print(f"{suite}: " + " ".join(f"{p}={row[p]['valid']}" for p in ("chat", "responses", "messages")),
              file=sys.stderr, flush=True)
    lines = ["## Tool-calling suite through each route (whole replies, greedy)", "",
             "| suite | n | Chat Completions | Responses | Anthropic Messages |", "|---|---|---|---|---|"]
    summary = {}
    for suite in ("tools", "json_schema"):
        rs = [r for r in rows if r["suite"] == suite]
        if rs:
            summary[suite] = {p: sum(r[p]["valid"] for r in rs) for p in ("chat", "responses", "messages")}
            s = summary[suite]
            lines.append(f"| {suite} | {len(rs)} | {s['chat']} | {s['responses']} | {s['messages']} |")
    bad = [(r, p) for r in rows for p in ("chat", "responses", "messages") if not r[p]["valid"]]
    if bad:
        lines += ["", "Invalid replies (route, stop reason, why):", ""]
        lines += [f"- {r['suite']} `{r['prompt'][:60]}` via {p}: {r[p]['finish']}; {r[p]['why']}" for r, p in bad]
    return {"rows": rows, "summary": summary}, "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="artifact folder to serve")
    ap.add_argument("--part", choices=("all", "overhead", "tools"), default="all")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--warmups", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--limit", type=int, default=0, help="only the first N prompts of each tool suite")
    ap.add_argument("--prompts", action="append", help="only the suite prompts containing this text (repeatable)")
    a = ap.parse_args()
    log = Path(tempfile.mkdtemp(prefix="squish-protocols-")) / "server.log"
    server = Server(specs()[SQUISH], a.model, log).start()
    results, report = {}, [f"# Protocol adapters on `{a.model.name}`", ""]
    try:
        server.wait_ready(300)
        with httpx.Client(timeout=600) as client:
            if a.part in ("all", "overhead"):
                results["overhead"], text = overhead(client, server.base_url, a.rounds, a.warmups, a.max_tokens)
                report += [text, ""]
            if a.part in ("all", "tools"):
                results["tools"], text = tools_suite(client, server.base_url, a.limit, a.prompts)
                report += [text, ""]
    finally:
        server.stop()
    out = write_results("protocols", {"model": str(a.model), "part": a.part, "rounds": a.rounds,
                                      "warmups": a.warmups, "max_tokens": a.max_tokens, "limit": a.limit,
                                      "prompts": a.prompts},
                        results, "\n".join(report))
    print("\n".join(report))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
