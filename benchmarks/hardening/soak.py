"""Soak: mixed requests at a fixed concurrency; RSS at idle checkpoints; in-flight at the end.

``requests`` requests, drawn from ``MIX`` by a seeded generator, run ``concurrency`` at a
time against one server (rate limit off: this is one client doing many people's work).
Each carries a unique tag at the start of its user text, so prompts share only the chat
template's prefix, and the prefix cache fills and evicts as it would with many users.
Kinds: a streamed chat, a whole chat, a tool call (``tool_choice: required``), a
``json_schema`` reply, a legacy completion, and two early disconnects: a stream closed
after its first content chunk, and a whole request whose client gives up after
``GIVE_UP_S`` (the server must cancel both: issue 15, defect 1).

The run is split into ``rounds`` equal rounds; the first is the warm-up. After each round
the load stops until ``/health`` reports nothing in flight, then (after ``SETTLE_S``, once
the engine has released its buffers) RSS is sampled ``RSS_SAMPLES`` times (median), with
the server's MLX active / cache memory and prefix-cache bytes from ``/metrics``. Growth
after warm-up = (RSS at the last checkpoint - RSS at the first) / RSS at the first. RSS is
also sampled every 0.5 s throughout (peak, series).

Passes when: no request got an unexpected status (anything but 200 for the normal kinds; a
transport error other than the intended give-up); growth < ``max_growth``; nothing in flight
at the end (``/health`` in-flight 0, ``/metrics`` batch and queue 0).
"""

from __future__ import annotations

import collections
import json
import random
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

MIX = (("stream", 30), ("whole", 25), ("tools", 12), ("json", 8), ("completion", 5),
       ("disconnect_stream", 12), ("disconnect_whole", 8))
GIVE_UP_S = 1.0
SETTLE_S = 2.0
RSS_SAMPLES = 5
TOPICS = ("three fruits", "two colours", "a short greeting", "one planet", "three animals", "a city in France",
          "two vegetables", "a breakfast food", "a musical instrument", "three shapes")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
FRUIT = {"type": "json_schema", "json_schema": {"name": "item", "schema": {
    "type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}},
    "required": ["name", "count"]}}}


def plan(n: int, seed: int, only: tuple[str, ...] | None = None) -> list[str]:
    rng = random.Random(seed)
    mix = [(k, w) for k, w in MIX if only is None or k in only]
    if not mix:
        raise ValueError(f"no request kinds left of {[k for k, _ in MIX]}")
    kinds, weights = zip(*mix)
    return rng.choices(kinds, weights=weights, k=n)


def _body(kind: str, model: str, i: int, rng: random.Random) -> tuple[str, dict]:
    topic = TOPICS[i % len(TOPICS)]
    user = {"role": "user", "content": f"[{i}] Name {topic}."}
    common = {"model": model, "temperature": rng.choice((0.0, 0.7)), "seed": i}
    if kind == "completion":
        return "/v1/completions", {**common, "prompt": f"[{i}] A list of {topic}:", "max_tokens": 16}
    body = {**common, "messages": [user], "max_tokens": 24}
    if kind in ("stream", "disconnect_stream"):
        body.update(stream=True, stream_options={"include_usage": True})
    elif kind == "tools":
        city = ("Paris", "Oslo", "Lima", "Cairo")[i % 4]
        body.update(messages=[{"role": "user", "content": f"[{i}] What is the weather in {city}?"}],
                    tools=[WEATHER], tool_choice="required", max_tokens=64)
    elif kind == "json":
        body.update(response_format=FRUIT, max_tokens=48)
    return "/v1/chat/completions", body


def one(client, url: str, model: str, kind: str, i: int) -> dict:
    """Send request ``i``; returns {kind, status, ok, seconds, detail}."""
    import httpx

    rng = random.Random(i)
    path, body = _body(kind, model, i, rng)
    t0 = time.monotonic()
    rec = {"i": i, "kind": kind, "status": None, "ok": False, "detail": ""}
    try:
        if kind in ("stream", "disconnect_stream"):
            with client.stream("POST", url + path, json=body, timeout=600) as r:
                rec["status"] = r.status_code
                if r.status_code != 200:
                    rec["detail"] = r.read().decode("utf-8", "replace")[:300]
                else:
                    done = usage = False
                    for line in r.iter_lines():
                        if not line.startswith("data: "):
                            continue
                        data = line[6:]
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            rec["detail"] = json.dumps(chunk)[:300]
                            break
                        usage = usage or bool(chunk.get("usage"))
                        if kind == "disconnect_stream" and any(c.get("delta", {}).get("content")
                                                               for c in chunk.get("choices", [])):
                            rec["ok"], rec["detail"] = True, "closed after the first content chunk"
                            break  # leaving the block closes the connection mid-stream
                    if kind == "stream":
                        rec["ok"] = done and usage
                        rec["detail"] = rec["detail"] or ("" if rec["ok"] else f"done={done} usage={usage}")
                    elif not rec["ok"]:
                        rec["ok"] = done  # finished before any content: nothing to disconnect from
                        rec["detail"] = "ended before the first content chunk"
        elif kind == "disconnect_whole":
            try:
                r = client.post(url + path, json=body, timeout=GIVE_UP_S)
                rec["status"] = r.status_code
                rec["ok"] = r.status_code == 200  # answered within the give-up time
                rec["detail"] = "answered before the client gave up"
            except httpx.TimeoutException:
                rec["ok"], rec["detail"] = True, f"client gave up after {GIVE_UP_S:g}s"
        else:
            r = client.post(url + path, json=body, timeout=600)
            rec["status"] = r.status_code
            if r.status_code == 200:
                choice = r.json()["choices"][0]
                if kind == "tools":
                    calls = choice["message"].get("tool_calls") or []
                    rec["ok"] = bool(calls) or choice["finish_reason"] == "length"
                    rec["detail"] = f"finish={choice['finish_reason']} calls={len(calls)}"
                elif kind == "json":
                    text = choice["message"]["content"] or ""
                    try:
                        json.loads(text)
                        rec["ok"] = True
                    except ValueError:
                        rec["ok"] = choice["finish_reason"] == "length"
                    rec["detail"] = f"finish={choice['finish_reason']}"
                else:
                    rec["ok"] = choice["finish_reason"] in ("stop", "length")
            else:
                rec["detail"] = r.text[:300]
    except httpx.HTTPError as exc:
        rec["detail"] = f"{type(exc).__name__}: {exc}"[:300]
    rec["seconds"] = time.monotonic() - t0
    return rec


class RssSampler(threading.Thread):
    """RSS every ``every`` s; every ``metrics_every``-th sample also the server's MLX active /
    cache memory and prefix-cache bytes (``/metrics``), to see what RSS is made of under load."""

    def __init__(self, server, every: float = 0.5, metrics_every: int = 4):
        super().__init__(daemon=True)
        self.server, self.every, self.metrics_every = server, every, metrics_every
        self.samples: list[tuple[float, int]] = []
        self.under_load: list[dict] = []
        self.stop_event = threading.Event()
        self.t0 = time.monotonic()

    def run(self) -> None:
        while not self.stop_event.is_set():
            t, rss = time.monotonic() - self.t0, self.server.rss()
            self.samples.append((t, rss))
            if len(self.samples) % self.metrics_every == 0:
                try:
                    m = self.server.metrics()
                    self.under_load.append({"t_s": round(t, 1), "rss": rss,
                                            "mlx_active": m.get("squish_mlx_active_memory_bytes"),
                                            "mlx_cache": m.get("squish_mlx_cache_memory_bytes"),
                                            "prefix": m.get("squish_prefix_cache_bytes"),
                                            "batch": m.get("squish_batch_size")})
                except Exception:  # noqa: BLE001 - a missed sample is not a failure
                    pass
            self.stop_event.wait(self.every)


def checkpoint(server, done: int, t0: float) -> dict:
    idle_wait = server.wait_idle(timeout=300)
    time.sleep(SETTLE_S)
    rss = []
    for _ in range(RSS_SAMPLES):
        rss.append(server.rss())
        time.sleep(0.2)
    m = server.metrics()
    return {"after_requests": done, "t_s": time.monotonic() - t0, "idle_wait_s": idle_wait,
            "rss_bytes": int(statistics.median(rss)), "rss_samples": rss,
            "mlx_active_bytes": m.get("squish_mlx_active_memory_bytes"),
            "mlx_cache_bytes": m.get("squish_mlx_cache_memory_bytes"),
            "mlx_peak_bytes": m.get("squish_mlx_peak_memory_bytes"),
            "prefix_cache_bytes": m.get("squish_prefix_cache_bytes"),
            "prefix_cache_hits": m.get("squish_prefix_cache_hits_total")}


def run(server, *, requests: int = 500, concurrency: int = 8, rounds: int = 5, seed: int = 0,
        max_growth: float = 0.05, kinds: tuple[str, ...] | None = None, log=print) -> dict:
    import httpx

    mix = kinds
    kinds = plan(requests, seed, mix)
    per_round = -(-requests // rounds)
    records: list[dict] = []
    checkpoints = []
    sampler = RssSampler(server)
    sampler.start()
    t0 = time.monotonic()
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency)
    with httpx.Client(limits=limits) as client, ThreadPoolExecutor(concurrency) as pool:
        for r0 in range(0, requests, per_round):
            batch = list(range(r0, min(requests, r0 + per_round)))
            futures = [pool.submit(one, client, server.url, server.model, kinds[i], i) for i in batch]
            records += [f.result() for f in futures]
            cp = checkpoint(server, len(records), t0)
            checkpoints.append(cp)
            bad = sum(1 for r in records if not r["ok"])
            log(f"soak: {len(records)}/{requests} requests, {bad} unexpected, idle RSS "
                f"{cp['rss_bytes'] / 2**20:.1f} MiB, prefix cache {(cp['prefix_cache_bytes'] or 0) / 2**20:.1f} MiB, "
                f"MLX active {(cp['mlx_active_bytes'] or 0) / 2**20:.1f} MiB")
    elapsed = time.monotonic() - t0
    sampler.stop_event.set()
    sampler.join()
    end_inflight = server.inflight()
    m = server.metrics()
    by_kind = collections.defaultdict(lambda: {"n": 0, "ok": 0, "seconds": []})
    for r in records:
        k = by_kind[r["kind"]]
        k["n"] += 1
        k["ok"] += r["ok"]
        k["seconds"].append(r["seconds"])
    from benchmarks.common import percentiles

    kinds_out = {k: {"n": v["n"], "ok": v["ok"], "seconds": percentiles(v["seconds"])} for k, v in by_kind.items()}
    unexpected = [r for r in records if not r["ok"]]
    first, last = checkpoints[0]["rss_bytes"], checkpoints[-1]["rss_bytes"]
    growth = (last - first) / first if first else float("nan")
    out = {
        "requests": requests, "concurrency": concurrency, "rounds": rounds, "seed": seed,
        "mix": [k for k, _ in MIX if mix is None or k in mix],
        "elapsed_s": elapsed, "kinds": kinds_out, "unexpected": len(unexpected),
        "unexpected_examples": unexpected[:10], "checkpoints": checkpoints,
        "rss_growth_after_warmup": growth, "max_growth": max_growth,
        "rss_peak_bytes": max((s for _, s in sampler.samples), default=0),
        "rss_series": [(round(t, 1), s) for t, s in sampler.samples[:: max(1, len(sampler.samples) // 400)]],
        "under_load": sampler.under_load[:: max(1, len(sampler.under_load) // 300)],
        "end": {"inflight": end_inflight, "batch": m.get("squish_batch_size"), "queue": m.get("squish_queue_depth"),
                "requests_499": _requests_with_status(server, "499")},
        "server_alive": server.alive(),
        "disconnects_sent": sum(1 for r in records if r["kind"].startswith("disconnect")),
        "disconnects_made": sum(1 for r in records if r["kind"].startswith("disconnect") and r["ok"]
                                and r["detail"].startswith(("closed after", "client gave up"))),
    }
    failures = []
    if unexpected:
        failures.append(f"{len(unexpected)} requests got an unexpected answer (first: {unexpected[0]})")
    if not growth < max_growth:
        failures.append(f"idle RSS grew {growth:.1%} after warm-up (bound {max_growth:.0%})")
    if end_inflight != 0 or (m.get("squish_batch_size") or 0) != 0 or (m.get("squish_queue_depth") or 0) != 0:
        failures.append(f"still in flight at the end: {out['end']}")
    if not server.alive():
        failures.append("the server exited during the soak")
    out["failures"] = failures
    return out


def _requests_with_status(server, status: str) -> float:
    import re

    import httpx

    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(
        rf'^squish_requests_total\{{[^}}]*status="{status}"[^}}]*\}} ([0-9.e+]+)$', text, re.M))
