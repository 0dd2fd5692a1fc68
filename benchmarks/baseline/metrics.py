"""Raw samples → named metrics, each a paired Squish-vs-mlx_lm comparison.

Every metric is the dict ``stats.compare`` returns (``squish`` and ``mlx_lm``
summaries, ``ratio``, ``p``, ``verdict``) or ``{"error": why}`` when it could
not be measured. Metric names are what ``benchmarks/contracts.toml`` refers to.
"""

from __future__ import annotations

from benchmarks.baseline.stats import compare
from benchmarks.baseline.systems import MLX_LM, SQUISH

# Measurements taken inside the baseline's "servers" experiment.
SERVER_PARTS = ("http_short", "http_long", "memory_steady", "prefix", "concurrency")

# name -> (unit, higher_is_better, description); the report follows this order.
METRICS = {
    "startup.import_s": ("s", False, "import time (`import squish` vs `import mlx_lm`)"),
    "startup.dry_run_rss_bytes": ("MB", False, "RSS before the model loads (`squish serve --dry-run` vs `import mlx_lm.server`)"),
    "cold_start.first_token_s": ("s", False, "cold start: process launch → first streamed token"),
    "cold_start.ready_s": ("s", False, "cold start: process launch → `/health` answers 200"),
    "cold_start.first_over_second": ("×", False, "cold start: first request's TTFT / the second's (same shape)"),
    "load.s": ("s", False, "model load time (in-process, fresh interpreter)"),
    "load.peak_rss_delta_bytes": ("MB", False, "peak RSS added by loading the model"),
    "load.weights_peak_ratio": ("×", False, "peak RSS of the weights phase / weight-file size"),
    "http.short.ttft_s": ("ms", False, "TTFT, short prompt (HTTP streaming)"),
    "http.short.itl_s": ("ms", False, "inter-token latency, short prompt"),
    "http.short.decode_tok_s": ("tok/s", True, "decode tok/s, short prompt"),
    "http.long.ttft_s": ("ms", False, "TTFT, long prompt"),
    "http.long.itl_s": ("ms", False, "inter-token latency, long prompt"),
    "http.long.decode_tok_s": ("tok/s", True, "decode tok/s, long prompt"),
    "memory.peak_rss_bytes": ("MB", False, "server peak RSS per request (short + long)"),
    "memory.peak_bytes": ("MB", False, "server peak memory (RSS, or MLX peak if larger)"),
    "memory.steady_rss_bytes": ("MB", False, "server RSS at rest after generation"),
    "memory.process_peak_bytes": ("MB", False, "whole server process: peak RSS from launch to the last request"),
    "prefix.cold_ttft_s": ("ms", False, "prefix cache: TTFT, new long prefix"),
    "prefix.warm_ttft_s": ("ms", False, "prefix cache: TTFT, same prefix again"),
    "prefix.warm_over_cold": ("×", False, "prefix cache: warm TTFT / cold TTFT"),
}
for _c in (1, 2, 4, 8):
    METRICS[f"concurrency.c{_c}.aggregate_tok_s"] = ("tok/s", True, f"aggregate tok/s, {_c} concurrent streams")
    METRICS[f"concurrency.c{_c}.per_stream_tok_s"] = ("tok/s", True, f"per-stream decode tok/s, {_c} concurrent streams")


def _pair(raw_by_system: dict | None, fn) -> tuple[list, list]:
    raw_by_system = raw_by_system or {}
    return ([fn(x) for x in raw_by_system.get(SQUISH, [])], [fn(x) for x in raw_by_system.get(MLX_LM, [])])


def _cmp(name: str, a: list, b: list) -> dict:
    return compare([x for x in a if x is not None], [x for x in b if x is not None],
                   higher_is_better=METRICS[name][1])


def _one_sided(name: str, a: list, b: list) -> dict:
    """Like _cmp, but keeps a summary when only one system has samples."""
    c = _cmp(name, a, b)
    if c["verdict"] == "not measured":
        from benchmarks.baseline.stats import summarize

        c["squish"], c["mlx_lm"] = summarize([x for x in a if x is not None]), summarize([x for x in b if x is not None])
    return c


def derive(raw: dict, global_raw: dict | None = None) -> dict:
    """Named metrics for one model from ``ModelRun.raw`` (and run-wide ``global_raw``)."""
    m: dict = {}
    errors = raw.get("errors", {})

    skipped = set(raw.get("skipped", ()))

    def missing(key: str, exp: str) -> None:
        top = "servers" if exp in SERVER_PARTS else exp
        if top in skipped:
            m[key] = {"skipped": f"experiment '{top}' was not part of this run (--experiments)"}
        else:
            m[key] = {"error": errors.get(exp, f"experiment '{exp}' did not run")}

    if global_raw and "import" in global_raw:
        m["startup.import_s"] = _cmp("startup.import_s", global_raw["import"].get(SQUISH, []),
                                     global_raw["import"].get(MLX_LM, []))
    if "dry_run" in raw:
        m["startup.dry_run_rss_bytes"] = _one_sided("startup.dry_run_rss_bytes",
                                                    *_pair(raw["dry_run"], lambda r: r["peak_rss_bytes"]))
    else:
        missing("startup.dry_run_rss_bytes", "startup")
    if "cold_start" in raw:
        for key, field in (("cold_start.first_token_s", "first_token_s"), ("cold_start.ready_s", "ready_s")):
            m[key] = _one_sided(key, *_pair(raw["cold_start"], lambda r, f=field: r[f]))
        m["cold_start.first_over_second"] = _one_sided(
            "cold_start.first_over_second",
            *_pair(raw["cold_start"], lambda r: r["first_ttft_s"] / r["second_ttft_s"]
                   if r.get("first_ttft_s") and r.get("second_ttft_s") else None))
    else:
        missing("cold_start.first_token_s", "cold_start")
    if "load" in raw:
        m["load.s"] = _cmp("load.s", *_pair(raw["load"], lambda r: r["seconds"]))
        m["load.peak_rss_delta_bytes"] = _cmp("load.peak_rss_delta_bytes",
                                              *_pair(raw["load"], lambda r: r["peak_rss_delta"]))
        m["load.weights_peak_ratio"] = _cmp("load.weights_peak_ratio",
                                            *_pair(raw["load"], lambda r: r.get("weights_peak_ratio")))
    else:
        for key in ("load.s", "load.peak_rss_delta_bytes", "load.weights_peak_ratio"):
            missing(key, "load")
    for kind in ("short", "long"):
        samples = raw.get("http", {}).get(kind)
        for field in ("ttft", "itl", "decode_tok_s"):
            key = f"http.{kind}.{field}" + ("" if field == "decode_tok_s" else "_s")
            if samples is None:
                missing(key, f"http_{kind}" if f"http_{kind}" in errors else "servers")
            else:
                m[key] = _one_sided(key, *_pair(samples, lambda r, f=field: r[f]))
    http = raw.get("http", {})
    if http:
        peaks = {s: [r["server_peak_rss"] for k in ("short", "long") for r in http.get(k, {}).get(s, [])]
                 for s in (SQUISH, MLX_LM)}
        m["memory.peak_rss_bytes"] = _one_sided("memory.peak_rss_bytes", peaks[SQUISH], peaks[MLX_LM])
        mem = raw.get("memory", {})
        both = {s: [max(p, (mem.get(s) or {}).get("mlx_peak_bytes") or 0) for p in peaks[s]] for s in peaks}
        m["memory.peak_bytes"] = _one_sided("memory.peak_bytes", both[SQUISH], both[MLX_LM])
    else:
        missing("memory.peak_rss_bytes", "servers")
        missing("memory.peak_bytes", "servers")
    if "memory" in raw:
        mem = raw["memory"]
        m["memory.steady_rss_bytes"] = _one_sided("memory.steady_rss_bytes", (mem.get(SQUISH) or {}).get("rss", []),
                                                  (mem.get(MLX_LM) or {}).get("rss", []))
        m["memory.process_peak_bytes"] = _one_sided(
            "memory.process_peak_bytes", [(mem.get(SQUISH) or {}).get("process_peak")],
            [(mem.get(MLX_LM) or {}).get("process_peak")])
    else:
        missing("memory.steady_rss_bytes", "memory_steady")
        missing("memory.process_peak_bytes", "memory_steady")
    if "prefix" in raw:
        p = raw["prefix"]
        m["prefix.cold_ttft_s"] = _one_sided("prefix.cold_ttft_s", *_pair(p, lambda r: r["cold_ttft"]))
        m["prefix.warm_ttft_s"] = _one_sided("prefix.warm_ttft_s", *_pair(p, lambda r: r["warm_ttft"]))
        m["prefix.warm_over_cold"] = _one_sided(
            "prefix.warm_over_cold",
            *_pair(p, lambda r: r["warm_ttft"] / r["cold_ttft"] if r["cold_ttft"] and r["warm_ttft"] else None))
    else:
        missing("prefix.warm_over_cold", "prefix")
    for level, by_sys in (raw.get("concurrency") or {}).items():
        key = f"concurrency.c{level}.aggregate_tok_s"
        if key not in METRICS:
            continue
        m[key] = _one_sided(key, *_pair(by_sys, lambda r: r["aggregate_tok_s"]))
        per = f"concurrency.c{level}.per_stream_tok_s"
        m[per] = _one_sided(per, *_pair(by_sys, lambda r: _mean(r["per_stream_decode_tok_s"])))
    if "concurrency" not in raw:
        missing("concurrency.c4.aggregate_tok_s", "concurrency")
    for system in (SQUISH, MLX_LM):  # say why a side is empty when its server never started
        why = errors.get(f"server_{system}")
        for entry in m.values():
            if why and not entry.get("error") and not (entry.get(system) or {}).get("n"):
                entry["note"] = f"{system} not measured: {why}"
    return m


def inproc_floor(raw: dict) -> dict | None:
    """Summaries of mlx_lm's in-process ``stream_generate`` (no server in the way)."""
    from benchmarks.baseline.stats import summarize

    r = raw.get("inproc_mlx_lm")
    if not r:
        return None
    out = {"peak_mlx_bytes": r.get("peak_mlx_bytes"), "steady_rss": r.get("steady_rss"),
           "active_mlx_bytes": r.get("active_mlx_bytes")}
    for kind in ("short", "long"):
        rows = r.get(kind, [])
        out[kind] = {
            "ttft_s": summarize([x["ttft"] for x in rows]),
            "itl_s": summarize([x["decode_s"] / (x["tokens"] - 1) for x in rows if x["tokens"] > 1]),
            "decode_tok_s": summarize([(x["tokens"] - 1) / x["decode_s"] for x in rows
                                       if x["tokens"] > 1 and x["decode_s"] > 0]),
            "prompt_tokens": rows[0]["prompt_tokens"] if rows else None,
            "peak_rss": max((x["peak_rss"] for x in rows), default=None),
        }
    return out


def _mean(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None
