"""Disconnect storm: many clients in flight leave at the same moment.

``clients`` raw TCP connections (half streamed chat completions, half whole ones, each
asking for ``max_tokens`` tokens so none can finish first) are opened and their requests
sent; once ``/health`` reports all of them in flight, every socket is closed, one after
the other in a tight loop. The figure is the time from the first close until ``/health``
reports nothing in flight. The server needs ``--max-queue`` >= ``clients`` (so none is
turned away with a 503), the rate limit off, and ``--max-tokens`` >= ``max_tokens``.

Passes when: all ``clients`` were in flight together, nothing is in flight within
``bound_s`` of the closes, every request was cancelled (``squish_requests_total`` counts
them as 499, the status for a client that left), ``/health`` is ok and a new request is
answered afterwards.
"""

from __future__ import annotations

import json
import re
import socket
import time


def _request(host: str, port: int, model: str, i: int, stream: bool, max_tokens: int) -> bytes:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": f"[storm {i}] Tell a long story."}],
                       "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": stream}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


def _count_499(server) -> float:
    import httpx

    text = httpx.get(server.url + "/metrics", headers=server.headers, timeout=10).text
    return sum(float(m.group(1)) for m in re.finditer(
        r'^squish_requests_total\{[^}]*status="499"[^}]*\} ([0-9.e+]+)$', text, re.M))


def run(server, *, clients: int = 100, max_tokens: int = 200, bound_s: float = 1.0,
        admit_timeout_s: float = 120.0, log=print) -> dict:
    import httpx

    host, port = "127.0.0.1", server.port
    before_499 = _count_499(server)
    socks = []
    t_open = time.monotonic()
    for i in range(clients):
        s = socket.create_connection((host, port), timeout=30)
        s.sendall(_request(host, port, server.model, i, stream=i % 2 == 0, max_tokens=max_tokens))
        socks.append(s)
    peak, t_all = 0, None
    deadline = time.monotonic() + admit_timeout_s
    while time.monotonic() < deadline:
        n = server.inflight()
        peak = max(peak, n)
        if n >= clients:
            t_all = time.monotonic() - t_open
            break
        time.sleep(0.02)
    t_close = time.monotonic()
    for s in socks:
        s.close()
    close_s = time.monotonic() - t_close
    samples = []
    zero_s = None
    while time.monotonic() - t_close < max(10.0, 5 * bound_s):
        n = server.inflight()
        samples.append((round(time.monotonic() - t_close, 3), n))
        if n == 0:
            zero_s = time.monotonic() - t_close
            break
        time.sleep(0.01)
    time.sleep(0.5)  # the access log and counters are written after the cancel
    cancelled = _count_499(server) - before_499
    health = server.health().json()
    r = httpx.post(server.url + "/v1/chat/completions", headers=server.headers, timeout=120,
                   json={"model": server.model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4})
    out = {"clients": clients, "max_tokens": max_tokens, "bound_s": bound_s,
           "all_in_flight_after_s": t_all, "peak_in_flight": peak, "close_loop_s": close_s,
           "in_flight_zero_after_s": zero_s, "in_flight_samples": samples[:200],
           "cancelled_499": cancelled, "health_after": health, "request_after": r.status_code,
           "server_alive": server.alive()}
    failures = []
    if t_all is None:
        failures.append(f"only {peak} of {clients} requests were in flight together")
    if zero_s is None or zero_s > bound_s:
        failures.append(f"requests still in flight {bound_s:g}s after the disconnects "
                        f"(zero after {zero_s if zero_s is not None else 'never'})")
    if cancelled < clients:
        failures.append(f"only {cancelled:.0f} of {clients} requests were counted as cancelled (499)")
    if health.get("status") != "ok" or r.status_code != 200:
        failures.append(f"after the storm: health {health}, new request {r.status_code}")
    out["failures"] = failures
    log(f"storm: {clients} clients in flight after {t_all}s; in-flight 0 after {zero_s}s; "
        f"{cancelled:.0f} cancelled")
    return out
