"""Prometheus metrics for ``GET /metrics``.

Each app gets its own ``CollectorRegistry`` (several apps can live in one test
process). ``Metrics`` is also the engine's observer: the engine thread calls
``first_token`` / ``token_gap`` / ``finished`` / ``step``; prometheus_client
metrics are thread-safe, so no further locking is needed.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co.
        self.requests = Counter("squish_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=r)
        self.completions = Counter("squish_completions", "Generations by outcome "
                                   "(stop, length, cancelled, timeout, numerical, ...)",
                                   ["outcome"], registry=r)
        self.prompt_tokens = Counter("squish_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("squish_completion_tokens", "Tokens generated", registry=r)
        self.cache_hits = Counter("squish_prefix_cache_hits", "Requests that reused a cached prefix",
                                  registry=r)
        self.cached_tokens = Counter("squish_prefix_cache_tokens", "Prompt tokens served from the "
                                     "prefix cache", registry=r)
        self.ttft = Histogram("squish_time_to_first_token_seconds", "Submit to first token",
                              buckets=_LATENCY, registry=r)
        self.itl = Histogram("squish_inter_token_seconds", "Gap between tokens of one stream",
                             buckets=_LATENCY, registry=r)
        self.queue_depth = Gauge("squish_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.batch_size = Gauge("squish_batch_size", "Requests in the running batch", registry=r)
        self.cache_bytes = Gauge("squish_prefix_cache_bytes", "Bytes held by the prefix cache", registry=r)

    # engine observer interface
    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def token_gap(self, seconds: float) -> None:
        self.itl.observe(seconds)

    def finished(self, status: str, prompt: int, completion: int, cached: int) -> None:
        self.completions.labels(status).inc()
        self.prompt_tokens.inc(prompt)
        self.completion_tokens.inc(completion)
        if cached:
            self.cache_hits.inc()
            self.cached_tokens.inc(cached)

    def step(self, batch: int, waiting: int, cache_bytes: int) -> None:
        self.batch_size.set(batch)
        self.queue_depth.set(waiting)
        self.cache_bytes.set(cache_bytes)

    def render(self) -> bytes:
        return generate_latest(self.registry)
