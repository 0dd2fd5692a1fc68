"""Flood: one client far over the rate limit while a second client is still served.

The server runs without an API key, so its rate limit buckets are client addresses. Client
A (source 127.0.0.1) sends ``requests`` small chat completions as fast as ``concurrency``
connections allow; every other one carries a made-up ``Authorization: Bearer ...`` header,
which must not open a fresh bucket (issue 15, defect 2). Client B, bound to another
loopback address (``127.0.0.2``, a different bucket), sends one request every ``b_every_s``
seconds for as long as A runs. A third client polls ``/health`` every 0.1 s. Only loopback
addresses are used, as source and as target.

Passes when: A got 429s and every 429 carries ``Retry-After`` (a whole number of seconds
>= 1); A was admitted no more than the bucket allows (burst + rate x duration, + 1 for
the clock); no reply anywhere is a 5xx; every request of B got a 200; every ``/health``
reply was 200 with status ``ok``.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import time

from benchmarks.common import percentiles

B_ADDRESS = "127.0.0.2"


def _chat(model: str, tag: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": f"{tag} Say hi."}], "max_tokens": 2,
            "temperature": 0}


async def _flood(url: str, model: str, n: int, concurrency: int, stats: dict) -> None:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    queue: asyncio.Queue = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        async def worker():
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                headers = {"Authorization": f"Bearer made-up-{secrets.token_hex(6)}"} if i % 2 else {}
                try:
                    r = await client.post("/v1/chat/completions", json=_chat(model, f"[a{i}]"), headers=headers)
                except httpx.HTTPError as exc:
                    stats["errors"].append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                stats["status"][r.status_code] += 1
                if r.status_code == 429:
                    ra = r.headers.get("retry-after", "")
                    if ra.isdigit() and int(ra) >= 1:
                        stats["retry_after"][int(ra)] += 1
                    else:
                        stats["bad_retry_after"] += 1
                elif r.status_code == 200:
                    stats["admitted_at"].append(time.monotonic())

        await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _second(url: str, model: str, every: float, done: asyncio.Event, stats: dict) -> None:
    import httpx

    transport = httpx.AsyncHTTPTransport(local_address=B_ADDRESS)
    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=60) as client:
        i = 0
        while not done.is_set() or i < 3:
            t0 = time.monotonic()
            try:
                r = await client.post("/v1/chat/completions", json=_chat(model, f"[b{i}]"))
                stats["status"][r.status_code] += 1
                stats["latency_s"].append(time.monotonic() - t0)
            except httpx.HTTPError as exc:
                stats["errors"].append(f"{type(exc).__name__}: {exc}"[:200])
            i += 1
            await asyncio.sleep(max(0.0, every - (time.monotonic() - t0)))


async def _health(url: str, done: asyncio.Event, stats: dict) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not done.is_set():
            t0 = time.monotonic()
            try:
                r = await client.get("/health")
                ok = r.status_code == 200 and r.json().get("status") == "ok"
                stats["ok" if ok else "bad"] += 1
                stats["latency_s"].append(time.monotonic() - t0)
            except Exception as exc:  # noqa: BLE001 - any failure to answer is a failed health check
                stats["bad"] += 1
                stats["errors"].append(f"{type(exc).__name__}: {exc}"[:200])
            await asyncio.sleep(0.1)


async def _run(url: str, model: str, n: int, concurrency: int, b_every: float) -> dict:
    a = {"status": collections.Counter(), "retry_after": collections.Counter(), "bad_retry_after": 0,
         "admitted_at": [], "errors": []}
    b = {"status": collections.Counter(), "latency_s": [], "errors": []}
    h = {"ok": 0, "bad": 0, "latency_s": [], "errors": []}
    done = asyncio.Event()
    t0 = time.monotonic()
    side = [asyncio.create_task(_second(url, model, b_every, done, b)), asyncio.create_task(_health(url, done, h))]
    await _flood(url, model, n, concurrency, a)
    a_s = time.monotonic() - t0
    done.set()
    await asyncio.gather(*side)
    return {"a": a, "b": b, "health": h, "a_seconds": a_s, "t0": t0}


def run(server, *, requests: int = 1000, concurrency: int = 32, b_every_s: float = 1.0,
        per_minute: int = 120, burst: int = 30, log=print) -> dict:
    """Flood ``server`` (started without an API key, rate limit ``per_minute``/``burst``)."""
    res = asyncio.run(_run(server.url, server.model, requests, concurrency, b_every_s))
    a, b, h = res["a"], res["b"], res["health"]
    admitted = len(a["admitted_at"])
    allowed = burst + per_minute / 60.0 * res["a_seconds"] + 1
    out = {
        "requests": requests, "concurrency": concurrency, "rate_limit": {"per_minute": per_minute, "burst": burst},
        "a": {"statuses": {str(k): v for k, v in sorted(a["status"].items())}, "seconds": res["a_seconds"],
              "requests_per_s": requests / res["a_seconds"], "admitted": admitted,
              "admitted_bound": allowed, "retry_after_values": {str(k): v for k, v in sorted(a["retry_after"].items())},
              "retry_after_missing_or_bad": a["bad_retry_after"], "errors": a["errors"][:10]},
        "b": {"address": B_ADDRESS, "statuses": {str(k): v for k, v in sorted(b["status"].items())},
              "latency_s": percentiles(b["latency_s"]), "errors": b["errors"][:10]},
        "health": {"ok": h["ok"], "bad": h["bad"], "latency_s": percentiles(h["latency_s"]),
                   "errors": h["errors"][:10]},
        "server_alive": server.alive(),
    }
    failures = []
    n429 = a["status"].get(429, 0)
    if n429 == 0:
        failures.append("client A was never rate limited")
    if a["bad_retry_after"]:
        failures.append(f"{a['bad_retry_after']} 429 replies without a valid Retry-After")
    if admitted > allowed:
        failures.append(f"client A was admitted {admitted} times, more than the bucket allows ({allowed:.1f})")
    for who, st in (("A", a["status"]), ("B", b["status"])):
        bad = {k: v for k, v in st.items() if k >= 500}
        if bad:
            failures.append(f"client {who} got 5xx replies: {bad}")
    if a["errors"] or b["errors"]:
        failures.append(f"transport errors: A {len(a['errors'])}, B {len(b['errors'])}")
    b_total = sum(b["status"].values())
    if b_total == 0 or b["status"].get(200, 0) != b_total:
        failures.append(f"client B was not always served: {dict(b['status'])}")
    if h["bad"] or h["ok"] == 0:
        failures.append(f"/health failed {h['bad']} of {h['ok'] + h['bad']} times")
    if not server.alive():
        failures.append("the server exited during the flood")
    out["failures"] = failures
    log(f"flood: A {dict(a['status'])} in {res['a_seconds']:.1f}s; B {dict(b['status'])}; "
        f"health ok {h['ok']}/{h['ok'] + h['bad']}")
    return out
