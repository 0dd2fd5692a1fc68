"""One streaming chat completion over real HTTP (SSE), timed from the client.

Token counts come from the ``usage`` field (``stream_options.include_usage``)
or, when a server sends none, from the artifact's tokenizer on the returned
text, never from counting SSE chunks (a chunk may carry several tokens).
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class StreamResult:
    t_send: float                 # perf_counter when the request was sent
    ttft: float | None            # seconds to the first non-empty content delta
    total: float                  # seconds to the end of the stream
    decode_s: float | None        # first content delta -> last content delta
    completion_tokens: int
    prompt_tokens: int | None
    tokens_from: str              # "usage" or "tokenizer"
    text: str
    chunk_gaps: list[float] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def itl(self) -> float | None:
        """Mean inter-token latency: decode time over (tokens − 1)."""
        if self.decode_s is None or self.completion_tokens < 2:
            return None
        return self.decode_s / (self.completion_tokens - 1)

    @property
    def decode_tok_s(self) -> float | None:
        if not self.decode_s or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / self.decode_s


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    """Greedy (temperature 0), so no ``seed`` is needed; and none is sent because
    mlx_lm.server stops batching requests that carry one."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}


def stream_chat(client: httpx.Client, base_url: str, body: dict, count_tokens=None,
                start_event: threading.Event | None = None) -> StreamResult:
    """Send one streaming request and time it. ``count_tokens(text) -> int`` is the
    fallback when the server sends no usage. Raises on HTTP errors."""
    if start_event is not None:
        start_event.wait()
    t_send = time.perf_counter()
    first = last = None
    prev = None
    gaps: list[float] = []
    parts: list[str] = []
    usage = None
    finish = None
    with client.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"HTTP {r.status_code} from {base_url}: {r.text[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            now = time.perf_counter()
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"]
            for choice in msg.get("choices") or []:
                delta = choice.get("delta") or {}
                piece = delta.get("content") or delta.get("reasoning") or ""
                if piece:
                    parts.append(piece)
                    if first is None:
                        first = now
                    if prev is not None:
                        gaps.append(now - prev)
                    prev = last = now
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
    end = time.perf_counter()
    text = "".join(parts)
    if usage and usage.get("completion_tokens") is not None:
        n, src, prompt_tokens = int(usage["completion_tokens"]), "usage", usage.get("prompt_tokens")
    elif count_tokens is not None:
        n, src, prompt_tokens = count_tokens(text), "tokenizer", None
    else:
        raise RuntimeError(f"{base_url} sent no usage and no tokenizer is available to count tokens")
    return StreamResult(
        t_send=t_send, ttft=None if first is None else first - t_send, total=end - t_send,
        decode_s=None if first is None or last is None else last - first,
        completion_tokens=n, prompt_tokens=prompt_tokens, tokens_from=src, text=text,
        chunk_gaps=gaps, finish_reason=finish)


def concurrent_streams(base_url: str, bodies: list[dict], count_tokens=None,
                       timeout: float = 600) -> tuple[list[StreamResult], float]:
    """Fire all ``bodies`` at once (one thread and connection each); returns the
    results and the wall time from the common start to the last stream's end."""
    results: list[StreamResult | BaseException | None] = [None] * len(bodies)
    go = threading.Event()

    def worker(i: int) -> None:
        try:
            with httpx.Client(timeout=timeout) as c:
                results[i] = stream_chat(c, base_url, bodies[i], count_tokens, go)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the caller's thread
            results[i] = e

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(len(bodies))]
    for t in threads:
        t.start()
    time.sleep(0.05)  # let every thread reach the start line
    t0 = time.perf_counter()
    go.set()
    for t in threads:
        t.join(timeout)
    for r in results:
        if isinstance(r, BaseException):
            raise RuntimeError(f"a concurrent stream failed: {r}") from r
        if r is None:
            raise RuntimeError(f"a concurrent stream did not finish within {timeout:.0f} s")
    wall = max(r.t_send + r.total for r in results) - t0
    return results, wall
