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

class _ToolCollector:
    """Exports ``squish.tools.loop.ToolStats`` (tool calls / JSON outputs):

    - ``squish_tool_attempts_total``: generations run by the retry loop;
    - ``squish_tool_retries_total{cause}``: corrective retries, by the failed attempt's cause
      (parse_error, schema_error, unknown_tool, no_call, call_not_allowed, length,
      numerical, repetition, grammar);
    - ``squish_tool_requests_total{result}``: requests by result: ``ok`` (first attempt),
      ``rescued`` (valid after a retry), ``degraded`` (valid, but only with a repetition
      loop the constraint cut short), ``length`` (``max_tokens`` ended the reply before a
      call or JSON value was complete: ``finish_reason: "length"``), ``failed`` (every
      attempt failed);
    - ``squish_tool_failures_total{cause}``: failed requests by the last attempt's cause.
    """

    def __init__(self, stats) -> None:
        self.stats = stats

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        snap = self.stats.snapshot()
        attempts = CounterMetricFamily("squish_tool_attempts", "Generations run by the tool/JSON retry loop")
        attempts.add_metric([], snap.get(("attempt", ""), 0))
        retries = CounterMetricFamily("squish_tool_retries", "Corrective retries by cause", labels=["cause"])
        failures = CounterMetricFamily("squish_tool_failures", "Requests whose every attempt failed, "
                                       "by the last cause", labels=["cause"])
        results = CounterMetricFamily("squish_tool_requests", "Tool/JSON requests by result", labels=["result"])
        for result in ("ok", "rescued", "degraded", "length"):
            results.add_metric([result], snap.get((result, ""), 0))
        results.add_metric(["failed"], sum(n for (ev, _), n in snap.items() if ev == "failed"))
        for (ev, cause), n in sorted(snap.items()):
            if ev == "retry":
                retries.add_metric([cause], n)
            elif ev == "failed":
                failures.add_metric([cause], n)
        return [attempts, retries, failures, results]


_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co.
        self.requests = Counter("squish_requests", "HTTP requests by route (path template) and status "
                                "(499: the client left; a stream that failed after it started counts "
                                "as its error's status)", ["route", "status"], registry=r)
        self.completions = Counter("squish_completions", "Generations by outcome "
                                   "(stop, length, cancelled, repetition, grammar, timeout, numerical, ...)",
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
        self.mlx_active = Gauge("squish_mlx_active_memory_bytes", "MLX memory in use (mx.get_active_memory)",
                                registry=r)
        self.mlx_peak = Gauge("squish_mlx_peak_memory_bytes", "Peak MLX memory since start "
                              "(mx.get_peak_memory)", registry=r)
        self.mlx_cache = Gauge("squish_mlx_cache_memory_bytes", "MLX buffer cache (mx.get_cache_memory)",
                               registry=r)
        self.rank_mem = Gauge("squish_rank_mlx_memory_bytes", "MLX memory of each rank of a server "
                              "that spans several machines (kind: active, peak, cache; rank 0 is this "
                              "process, the others report over the health channel)", ["rank", "kind"],
                              registry=r)
        from squish.tools.loop import ToolStats

        self.tool_stats = ToolStats()  # the attempt loop counts into it (squish.serving.attempts)
        r.register(_ToolCollector(self.tool_stats))

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

    def memory(self, active: int, peak: int, cache: int) -> None:
        self.mlx_active.set(active)
        self.mlx_peak.set(peak)
        self.mlx_cache.set(cache)

    def rank_memory(self, rank: int, active: int, peak: int, cache: int) -> None:
        for kind, value in (("active", active), ("peak", peak), ("cache", cache)):
            self.rank_mem.labels(str(rank), kind).set(value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
