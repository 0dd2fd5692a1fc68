"""Prefix-cache reuse on agent loops, `squish serve` vs `mlx_lm.server`, turn by turn, paired.

Agents are not plain chat: their histories hold tool calls whose arguments the client
re-serialized, tool results, a thinking model's replies whose reasoning the template
drops, several conversations at once, and (for Squish) other protocols. Each trace
below is a scripted client conversation; every turn is one streamed request, and for
every turn from the second on the benchmark records:

  prompt     the prompt's tokens (the server's ``usage``)
  cached     the tokens the server reused from its prefix cache (``usage``)
  shared     the tokens this prompt shares with the previous request of the same
             conversation *as the model saw it*: that request's prompt followed by the
             tokens the model generated (the longest common prefix)
  reuse      cached / shared (the target: at least 0.95)
  ttft       request sent -> first streamed token (content or reasoning)

Traces (``--traces``):
  plain        one conversation, a ~190-token system prompt, 5 user turns (``--model``)
  interleaved  four conversations (an agent and three sub-agents) sharing a ~400-token
               system prompt, round robin, 4 turns each: entries compete for the bound
  tools        tools in the request; every reply is followed by the assistant tool call
               the client sends back (arguments re-serialized: compact, other key order)
               and a ~100-token tool result; 5 turns (the scripted thinking model)
  thinking     user turns to the thinking model, whose template drops earlier reasoning
               (the stored generation and the next prompt part ways at the reply); 5 turns
  routes       the thinking conversation with its turns sent alternately through
               /v1/chat/completions, /v1/messages (Anthropic) and /v1/responses (OpenAI
               Responses): they must hit one cache. Routes a server does not have (404)
               are skipped, so mlx_lm.server runs only the chat turns of it.

Models: ``--model`` is a real artifact (default: SmolLM2-135M INT4, the best local model)
for plain and interleaved; tools, thinking and routes use the scripted thinking model of
``benchmarks/agent_models.py`` (its generated tokens are known exactly; ~9M float32
parameters, so its TTFT is prefill). For the real model, "as the model saw it" is the reply's
text encoded again (a greedy reply of ordinary text round-trips).

Prompts are rendered here with the artifact's tokenizer the way each server renders them
(mlx_lm.server: ``apply_chat_template`` with ``tools`` and its thinking default; Squish:
``squish.tools.render`` / ``squish.runtime.prompts``), and checked against the server's
``prompt_tokens``. Pairs alternate which server goes first; each run is a fresh server.

    .venv/bin/python -m benchmarks.agent_loops --model PATH [--pairs 3] [--traces plain,tools]

Results: benchmarks/results/<UTC stamp>_agent_loops/ (config.json, results.json, report.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baseline import prompts  # noqa: E402
from benchmarks.baseline.stats import compare, fmt_p, summarize  # noqa: E402
from benchmarks.baseline.systems import free_port  # noqa: E402
from benchmarks.common import machine, result_dir  # noqa: E402

SQUISH, MLX_LM = "squish", "mlx_lm"
COMMANDS = {
    SQUISH: "{python} -m squish serve {model} --port {port} --rate-limit 0 --request-timeout 3600",
    MLX_LM: "{python} -m mlx_lm.server --model {model} --port {port}",
}
TRACES = ("plain", "interleaved", "tools", "thinking", "routes")
REAL_TRACES = ("plain", "interleaved")
ROUTES = ("chat", "messages", "responses")
REUSE_TARGET = 0.95
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "search_files", "description": "Search the project's files for a text pattern.",
        "parameters": {"type": "object", "properties": {
            "pattern": {"type": "string"}, "path": {"type": "string"}}, "required": ["pattern"]}}},
    {"type": "function", "function": {
        "name": "read_file", "description": "Read a file of the project.",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}},
]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "Kyoto", "Cairo", "Quito"]
QUESTIONS = ["Tell me about the river.", "Which travellers came first?", "Why did the town grow?",
             "What happened in winter?", "Summarise all of that in one sentence.", "Who remembered it?"]
TASKS = ["Find every place the old library is mentioned.", "List the bridges and what crossed them.",
         "Check which towns the railway connected.", "Collect what the painters did at the harbour."]


# ---- one streamed request, any route --------------------------------------------------------
@dataclass
class Reply:
    ttft: float | None
    total: float
    content: str = ""
    reasoning: str = ""
    prompt_tokens: int | None = None
    cached: int | None = None
    completion_tokens: int | None = None


def _sse(client: httpx.Client, url: str, body: dict, on_event) -> float:
    t0 = time.perf_counter()
    with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code} from {url}: {r.text[:300]}")
        for line in r.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data and data != "[DONE]":
                    on_event(json.loads(data), time.perf_counter())
    return t0


def send(client: httpx.Client, base: str, route: str, model: str, messages: list[dict], tools: list | None,
         max_tokens: int) -> Reply:
    rep = Reply(None, 0.0)
    first: list[float] = []

    def mark(now: float) -> None:
        if not first:
            first.append(now)

    if route == "chat":
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        if tools:
            body["tools"] = tools

        def on(ev, now):
            for ch in ev.get("choices") or []:
                d = ch.get("delta") or {}
                for key, attr in (("content", "content"), ("reasoning_content", "reasoning"),
                                  ("reasoning", "reasoning")):
                    if d.get(key):
                        mark(now)
                        setattr(rep, attr, getattr(rep, attr) + d[key])
            if ev.get("usage"):
                u = ev["usage"]
                rep.prompt_tokens, rep.completion_tokens = u.get("prompt_tokens"), u.get("completion_tokens")
                rep.cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens")
        t0 = _sse(client, base + "/v1/chat/completions", body, on)
    elif route == "messages":
        system = [m["content"] for m in messages if m["role"] == "system"]
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]}
        if system:
            body["system"] = system[0]
        usage: dict = {}

        def on(ev, now):
            kind = ev.get("type")
            if kind == "message_start":
                usage.update(ev["message"].get("usage") or {})
            elif kind == "message_delta":
                usage.update(ev.get("usage") or {})
            elif kind == "content_block_delta":
                d = ev.get("delta") or {}
                if d.get("text"):
                    mark(now)
                    rep.content += d["text"]
                if d.get("thinking"):
                    mark(now)
                    rep.reasoning += d["thinking"]
        t0 = _sse(client, base + "/v1/messages", body, on)
        rep.cached = usage.get("cache_read_input_tokens") or 0
        rep.prompt_tokens = (usage.get("input_tokens") or 0) + rep.cached
        rep.completion_tokens = usage.get("output_tokens")
    else:
        system = [m["content"] for m in messages if m["role"] == "system"]
        body = {"model": model, "max_output_tokens": max_tokens, "temperature": 0.0, "stream": True,
                "store": False,
                "input": [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]}
        if system:
            body["instructions"] = system[0]

        def on(ev, now):
            kind = ev.get("type", "")
            if kind == "response.output_text.delta":
                mark(now)
                rep.content += ev.get("delta", "")
            elif kind == "response.reasoning_text.delta":
                mark(now)
                rep.reasoning += ev.get("delta", "")
            elif kind == "response.completed":
                u = ev["response"].get("usage") or {}
                rep.prompt_tokens, rep.completion_tokens = u.get("input_tokens"), u.get("output_tokens")
                rep.cached = (u.get("input_tokens_details") or {}).get("cached_tokens")
        t0 = _sse(client, base + "/v1/responses", body, on)
    rep.total = time.perf_counter() - t0
    rep.ttft = first[0] - t0 if first else None
    return rep


def has_route(client: httpx.Client, base: str, route: str) -> bool:
    path = {"chat": "/v1/chat/completions", "messages": "/v1/messages", "responses": "/v1/responses"}[route]
    try:
        return client.post(base + path, json={}).status_code != 404
    except httpx.HTTPError:
        return False


# ---- rendering: the prompt each server builds, and what its model saw ----------------------
class Renderer:
    def __init__(self, model_dir: Path):
        from mlx_lm.utils import load_config, load_tokenizer

        self.tok = load_tokenizer(model_dir, eos_token_ids=load_config(model_dir).get("eos_token_id"))
        self.scripted = (model_dir / "config.json").exists() and "scripted-reasoning" in model_dir.name

    def prompt(self, system: str, messages: list[dict], tools: list | None) -> list[int]:
        if system == MLX_LM:
            msgs = json.loads(json.dumps(messages))
            for m in msgs:
                for c in m.get("tool_calls") or []:
                    c["function"]["arguments"] = json.loads(c["function"]["arguments"])
            return list(self.tok.apply_chat_template(msgs, tools=tools, add_generation_prompt=True))
        from squish.runtime.prompts import apply_template, encode_chat
        from squish.tools.render import native_messages
        from squish.tools.spec import parse_tools

        if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
            kw = {"tools": [t.openai() for t in parse_tools(tools)]} if tools else {}
            return apply_template(self.tok, native_messages(messages), **kw)
        return encode_chat(self.tok, messages)

    def generated(self, reply: Reply, script: list[int] | None) -> list[int]:
        """The tokens the model wrote: the script (scripted model), else the reply re-encoded."""
        if script is not None:
            return script
        return list(self.tok.encode(reply.content, add_special_tokens=False))


def lcp(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# ---- traces -----------------------------------------------------------------------------------
@dataclass
class Conv:
    name: str
    messages: list[dict]
    tools: list | None = None
    last_seen: list[int] | None = None  # previous prompt + generated tokens, as the model saw them
    turns: list[dict] = field(default_factory=list)


def traces(kind: str, tag: str, tokens) -> tuple[list[Conv], list[tuple[int, str]]]:
    """The conversations of a trace and its schedule: (conversation index, route) per turn."""
    if kind == "plain":
        sys_msg = f"[{tag}] You are a patient guide. " + prompts.prose(190, tokens, 11)
        return [Conv("plain", [{"role": "system", "content": sys_msg}])], [(0, "chat")] * 5
    if kind == "interleaved":
        sys_msg = (f"[{tag}] You are one of four research agents working on the same archive. "
                   + prompts.prose(400, tokens, 12))
        convs = [Conv(f"agent{k}", [{"role": "system", "content": sys_msg}]) for k in range(4)]
        return convs, [(k, "chat") for _ in range(4) for k in range(4)]
    if kind == "tools":
        sys_msg = f"[{tag}] You are a travel assistant. Use the tools to answer."
        return [Conv("tools", [{"role": "system", "content": sys_msg}], tools=TOOLS)], [(0, "chat")] * 5
    sys_msg = f"[{tag}] You are a careful assistant who thinks before answering."
    schedule = [(0, "chat")] * 5 if kind == "thinking" else [(0, ROUTES[k % 3]) for k in range(6)]
    return [Conv(kind, [{"role": "system", "content": sys_msg}])], schedule


def next_user(kind: str, conv: Conv, k: int, tokens) -> None:
    if kind == "interleaved":
        task = TASKS[int(conv.name[-1])]
        text = task if k == 0 else f"Result of step {k}: " + prompts.prose(40, tokens, 100 + k) + " Continue."
        conv.messages.append({"role": "user", "content": text})
    elif kind == "tools":
        if k == 0:
            conv.messages.append({"role": "user", "content": "What is the weather in " + ", ".join(CITIES[:5])
                                  + "? Check each city."})
    else:
        conv.messages.append({"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]})


def after_reply(kind: str, conv: Conv, k: int, reply: Reply) -> None:
    """What the client sends back: the reply without its reasoning; for the tools trace the
    tool call the agent acts on (arguments re-serialized) and the tool's result."""
    if kind == "tools":
        city = CITIES[k % len(CITIES)]
        args = json.dumps({"unit": "celsius", "city": city}, separators=(",", ":"))  # compact, other key order
        call_id = f"call_{k}"
        conv.messages.append({"role": "assistant", "content": reply.content or None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": args}}]})
        result = {"city": city, "unit": "celsius", "temperature": 12 + k, "conditions": "light rain",
                  "forecast": [{"day": d, "high": 14 + d, "low": 6 + d, "wind_kmh": 10 + 2 * d} for d in range(4)]}
        conv.messages.append({"role": "tool", "tool_call_id": call_id, "content": json.dumps(result)})
    else:
        conv.messages.append({"role": "assistant", "content": reply.content})


# ---- one server run -----------------------------------------------------------------------------
class Server:
    def __init__(self, system: str, model: Path, log: Path):
        self.system, self.port = system, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = shlex.split(COMMANDS[system].format(python=shlex.quote(sys.executable),
                                                   model=shlex.quote(str(model)), port=self.port))
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.model_field = "default" if system == SQUISH else "default_model"

    def wait(self, timeout: float = 900) -> None:
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=5) as c:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.system} exited ({self.proc.returncode}); see {self.log.name}")
                try:
                    if c.get(self.url + "/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"{self.system} not ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def run_traces(system: str, model: Path, kinds: list[str], renderer: Renderer, script: list[int] | None,
               tag: str, out: Path, max_tokens: int, tokens) -> dict:
    srv = Server(system, model, out / f"server_{system}_{model.name}_{tag}.log")
    results: dict = {}
    try:
        srv.wait()
        # The first request of a fresh process is not part of any trace (mlx_lm.server loads its
        # model on its first request's thread).
        with httpx.Client(timeout=3600) as c:
            send(c, srv.url, "chat", srv.model_field, [{"role": "user", "content": "Warm-up."}], None, 2)
            routes = {r: has_route(c, srv.url, r) for r in ROUTES}
            for kind in kinds:
                convs, schedule = traces(kind, f"{tag} {kind}", tokens)
                counts = [0] * len(convs)
                for ci, route in schedule:
                    conv = convs[ci]
                    k = counts[ci]
                    counts[ci] += 1
                    if not routes[route]:
                        conv.turns.append({"turn": k + 1, "route": route, "skipped": "route not served"})
                        # keep the conversation going as a client of this server would not: skip the turn
                        continue
                    next_user(kind, conv, k, tokens)
                    ids = renderer.prompt(system, conv.messages, conv.tools)
                    reply = send(c, srv.url, route, srv.model_field, conv.messages, conv.tools, max_tokens)
                    shared = lcp(ids, conv.last_seen) if conv.last_seen is not None else None
                    conv.turns.append({
                        "turn": k + 1, "route": route, "prompt": reply.prompt_tokens, "rendered": len(ids),
                        "cached": reply.cached, "shared": shared, "ttft": reply.ttft, "total": reply.total,
                        "completion": reply.completion_tokens,
                        "reuse": (reply.cached or 0) / shared if shared else None})
                    gen = renderer.generated(reply, script)
                    conv.last_seen = ids + gen
                    after_reply(kind, conv, k, reply)
                results[kind] = {c.name: c.turns for c in convs}
    finally:
        srv.stop()
    return results


# ---- summary --------------------------------------------------------------------------------------
def summarize_trace(runs: dict[str, list[dict]], kind: str) -> dict:
    """Per trace: reuse from turn 2 on (min, p50), TTFT Squish/mlx_lm paired by (run, conversation,
    turn), and the same on the turns where mlx_lm.server re-prefilled (cached < half of shared)."""
    out: dict = {}
    pairs_all, pairs_miss = ([], []), ([], [])
    for system in (SQUISH, MLX_LM):
        reuse = [t["reuse"] for run in runs[system] for turns in run[kind].values() for t in turns
                 if t.get("reuse") is not None]
        misses = sum(1 for r in reuse if r < REUSE_TARGET)
        out[system] = {"reuse": summarize(reuse), "turns_below_target": misses, "turns": len(reuse),
                       "render_mismatches": sum(1 for run in runs[system] for turns in run[kind].values()
                                                for t in turns if t.get("prompt") not in (None, t.get("rendered")))}
    for run_s, run_m in zip(runs[SQUISH], runs[MLX_LM]):
        for name, turns_s in run_s[kind].items():
            for ts, tm in zip(turns_s, run_m[kind].get(name, [])):
                if ts.get("ttft") is None or tm.get("ttft") is None or ts["turn"] < 2:
                    continue
                pairs_all[0].append(ts["ttft"])
                pairs_all[1].append(tm["ttft"])
                if tm.get("shared") and (tm.get("cached") or 0) < 0.5 * tm["shared"]:
                    pairs_miss[0].append(ts["ttft"])
                    pairs_miss[1].append(tm["ttft"])
    out["ttft"] = compare(*pairs_all, higher_is_better=False)
    out["ttft_where_mlx_lm_reprefills"] = compare(*pairs_miss, higher_is_better=False)
    return out


def report(summary: dict, runs: dict, meta: dict) -> str:
    L = [f"# Agent loops: prefix-cache reuse per turn ({meta['stamp']})", "",
         f"Machine: {meta['chip']}, {meta['backend']} backend; load average {meta['loadavg']} at the start, "
         f"{meta['loadavg_end']} at the end. {meta['pairs']} pairs (fresh servers, alternating order); "
         f"greedy, {meta['max_tokens']} generated tokens per turn.", "",
         f"Command: `{meta['command']}`", "",
         "reuse = cached / shared, from turn 2 on (target ≥ 0.95); TTFT ratio = median Squish / median "
         "mlx_lm over turns paired by run, conversation and turn (turn 2 on).", "",
         "| trace | Squish reuse min / p50 | turns < 0.95 | mlx_lm reuse min / p50 | turns < 0.95 | "
         "TTFT Squish / mlx_lm | p | where mlx_lm re-prefills: TTFT ratio (n) |",
         "|---|---|---|---|---|---|---|---|"]
    for kind, s in summary.items():
        def cell(system):
            r = s[system]["reuse"]
            return (f"{r['min']:.3f} / {r['p50']:.3f}" if r["n"] else "—",
                    f"{s[system]['turns_below_target']}/{s[system]['turns']}")
        a, b = cell(SQUISH), cell(MLX_LM)
        t, m = s["ttft"], s["ttft_where_mlx_lm_reprefills"]
        t_ratio = "—" if t["ratio"] is None else f"{t['ratio']:.2f}×"
        m_ratio = "—" if m["ratio"] is None else f"{m['ratio']:.2f}× ({m['n_pairs']})"
        L.append(f"| {kind} | {a[0]} | {a[1]} | {b[0]} | {b[1]} | {t_ratio} | {fmt_p(t['p'])} | {m_ratio} |")
    L += ["", "## Every turn of the first pair", ""]
    for kind in summary:
        L += [f"### {kind}", "", "| system | conversation | turn | route | prompt | cached | shared | reuse | TTFT s |",
              "|---|---|---|---|---|---|---|---|---|"]
        for system in (SQUISH, MLX_LM):
            for name, turns in runs[system][0][kind].items():
                for t in turns:
                    if t.get("skipped"):
                        L.append(f"| {system} | {name} | {t['turn']} | {t['route']} | skipped: {t['skipped']} "
                                 "| | | | |")
                        continue
                    reuse = "—" if t.get("reuse") is None else f"{t['reuse']:.3f}"
                    ttft = "—" if t.get("ttft") is None else f"{t['ttft']:.2f}"
                    L.append(f"| {system} | {name} | {t['turn']} | {t['route']} | {t['prompt']} | {t['cached']} | "
                             f"{t['shared'] if t['shared'] is not None else '—'} | {reuse} | {ttft} |")
        L.append("")
    return "\n".join(L) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="real artifact for plain / interleaved (default: best local model)")
    ap.add_argument("--reasoning-model", type=Path, help="scripted thinking model folder (default: built once)")
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--name", default="agent_loops")
    ap.add_argument("--squish-cmd", help="command that serves Squish, with {python} {model} {port} "
                    f"(default: '{COMMANDS[SQUISH]}')")
    a = ap.parse_args(argv)
    if a.squish_cmd:
        COMMANDS[SQUISH] = a.squish_cmd
    kinds = [k.strip() for k in a.traces.split(",") if k.strip()]
    bad = [k for k in kinds if k not in TRACES]
    if bad:
        ap.error(f"unknown trace(s) {bad}; known: {', '.join(TRACES)}")
    real = [k for k in kinds if k in REAL_TRACES]
    scripted = [k for k in kinds if k not in REAL_TRACES]
    models = []
    if real:
        path = a.model
        if path is None:
            from squish.models import resolve_model

            path = resolve_model(None)
        models.append((path, real, None))
    if scripted:
        from benchmarks.agent_models import build_reasoning_model, script_ids

        path = a.reasoning_model or build_reasoning_model()
        models.append((path, scripted, script_ids(path)))
    mach = machine()
    out = result_dir(a.name)
    command = " ".join(["python -m benchmarks.agent_loops", *(argv if argv is not None else sys.argv[1:])])
    (out / "config.json").write_text(json.dumps({"argv": command, "commands": COMMANDS, "pairs": a.pairs,
                                                 "models": [str(m) for m, _, _ in models], "machine": mach},
                                                indent=2) + "\n")
    runs: dict[str, list[dict]] = {SQUISH: [], MLX_LM: []}
    for i in range(a.pairs):
        merged = {SQUISH: {}, MLX_LM: {}}
        for path, ks, script in models:
            renderer = Renderer(path)
            tokens = prompts.Tokens(path)
            for system in ((SQUISH, MLX_LM) if i % 2 == 0 else (MLX_LM, SQUISH)):
                print(f"[agent_loops {time.strftime('%H:%M:%S')}] pair {i + 1}/{a.pairs}: {system} on {path.name}",
                      file=sys.stderr, flush=True)
                merged[system].update(run_traces(system, path, ks, renderer, script, f"pair {i}", out,
                                                 a.max_tokens, tokens))
        for system in runs:
            runs[system].append(merged[system])
        summary = {k: summarize_trace(runs, k) for k in kinds}
        meta = {"stamp": out.name, "chip": mach.get("chip"), "backend": mach.get("backend"),
                "loadavg": mach.get("loadavg"), "loadavg_end": list(os.getloadavg()), "pairs": len(runs[SQUISH]),
                "max_tokens": a.max_tokens, "command": command}
        (out / "results.json").write_text(json.dumps({"summary": summary, "runs": runs, "meta": meta},
                                                     indent=2, default=str) + "\n")
        (out / "report.md").write_text(report(summary, runs, meta))
    print((out / "report.md").read_text())
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
