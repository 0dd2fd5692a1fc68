"""The markdown report (``report.md``) from derived metrics and contract verdicts. Pure."""

from __future__ import annotations

import math

from benchmarks.baseline.contracts import FAIL, INCONCLUSIVE, NOT_HERE, NOT_IN_RUN, PASS, Verdict
from benchmarks.baseline.metrics import METRICS
from benchmarks.baseline.stats import fmt_comparison

HEADLINE = ("startup.import_s", "startup.dry_run_rss_bytes", "cold_start.first_token_s", "load.s",
            "http.short.ttft_s", "http.short.decode_tok_s", "http.long.ttft_s", "memory.peak_rss_bytes",
            "memory.process_peak_bytes",
            "prefix.warm_over_cold", "concurrency.c4.aggregate_tok_s")


def scale(unit: str, x: float | None) -> str:
    """A value stored in base units (s, bytes, tok/s) shown in ``unit``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if unit == "ms":
        return f"{x * 1e3:.1f}"
    if unit == "MB":
        return f"{x / 1e6:.1f}"
    if unit == "s":
        return f"{x:.3f}"
    if unit == "×":
        return f"{x:.2f}"
    return f"{x:.1f}"


def _cell(m: dict, system: str, stat: str, unit: str) -> str:
    s = (m or {}).get(system) or {}
    return scale(unit, s.get(stat)) if s.get("n") else "—"


def headline_table(metrics: dict, keys=HEADLINE) -> str:
    lines = ["| metric | unit | Squish p50 | mlx_lm p50 | Squish/mlx_lm (Wilcoxon p) | verdict |",
             "|---|---|---|---|---|---|"]
    for key in keys:
        unit, _, desc = METRICS[key]
        m = metrics.get(key)
        if m is None:
            continue
        if m.get("error"):
            lines.append(f"| {desc} | {unit} | not measured | | | {m['error'][:120]} |")
            continue
        lines.append(f"| {desc} | {unit} | {_cell(m, 'squish', 'p50', unit)} | {_cell(m, 'mlx_lm', 'p50', unit)} "
                     f"| {fmt_comparison(m)} | {m.get('verdict', '')} |")
    return "\n".join(lines)


def detail_table(metrics: dict) -> str:
    lines = ["| metric | unit | system | n | p50 | p95 | p99 | mean | stddev |", "|---|---|---|---|---|---|---|---|---|"]
    for key, (unit, _, desc) in METRICS.items():
        m = metrics.get(key)
        if not m or m.get("error"):
            continue
        for system in ("squish", "mlx_lm"):
            s = m.get(system) or {}
            if not s.get("n"):
                continue
            lines.append(f"| {desc} | {unit} | {system} | {s['n']} | " + " | ".join(
                scale(unit, s.get(k)) for k in ("p50", "p95", "p99", "mean", "stdev")) + " |")
    return "\n".join(lines)


def floor_table(floor: dict | None) -> str:
    if not floor:
        return "_not measured_"
    lines = ["| prompt | prompt tokens | TTFT p50 ms | ITL p50 ms | decode tok/s p50 | stddev tok/s |",
             "|---|---|---|---|---|---|"]
    for kind in ("short", "long"):
        f = floor.get(kind) or {}
        if not f:
            continue
        lines.append(f"| {kind} | {f.get('prompt_tokens')} | {scale('ms', f['ttft_s'].get('p50'))} | "
                     f"{scale('ms', f['itl_s'].get('p50'))} | {scale('tok/s', f['decode_tok_s'].get('p50'))} | "
                     f"{scale('tok/s', f['decode_tok_s'].get('stdev'))} |")
    lines.append("")
    lines.append(f"Peak MLX memory (`mx.get_peak_memory`) during generation: {scale('MB', floor.get('peak_mlx_bytes'))} MB; "
                 f"RSS at rest after: {scale('MB', floor.get('steady_rss'))} MB.")
    return "\n".join(lines)


def contracts_section(verdicts: list[Verdict]) -> str:
    if not verdicts:
        return "_no contracts_"
    order = {FAIL: 0, INCONCLUSIVE: 1, PASS: 2, NOT_IN_RUN: 3, NOT_HERE: 4}
    lines = []
    for v in sorted(verdicts, key=lambda v: order.get(v.status, 9)):
        lines.append(f"- **{v.status}** `{v.contract.id}`" + (f" [{v.model}]" if v.model else "")
                     + f": {v.contract.description} — {v.detail}")
    counts = {s: sum(1 for v in verdicts if v.status == s) for s in (PASS, FAIL, INCONCLUSIVE, NOT_IN_RUN, NOT_HERE)}
    head = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    return head + "\n\n" + "\n".join(lines)


def quality_section(quality: dict | None) -> str:
    if not quality:
        return ("_No quantization-quality result found under `benchmarks/results/*_quant_quality/`; "
                "run `benchmarks/quant_quality.py` (or this script with `--full`)._")
    if not quality["links"]:
        return f"_No quantization-quality result: {quality.get('error')}_"
    head = "From " + ", ".join(f"[`{name}`]({link})" for name, link in quality["links"].items()) + ":\n\n"
    return head + quality["table"]


def errors_section(errors: dict) -> str:
    if not errors:
        return "none"
    return "\n".join(f"- `{k}`: {v}" for k, v in errors.items())


def render(*, stamp: str, machine: dict, profile: dict, argv: list[str], models: list[dict],
           global_metrics: dict, verdicts: list[Verdict], quality: dict | None, notes: list[str],
           plots: list[str]) -> str:
    hw = (f"{machine.get('chip')} · {machine.get('cpu_logical_cores')} logical cores · "
          f"{(machine.get('memory_bytes') or 0) / 2**30:.1f} GiB · {machine.get('os')} · backend "
          f"**{machine.get('backend')}**" + (f" · GPU {machine['gpu']}" if machine.get("gpu") else "")
          + f" · MLX {machine.get('mlx')} · mlx_lm {machine.get('mlx_lm')} · Squish {machine.get('squish')}")
    out = [f"# Squish vs mlx_lm — baseline {stamp}", "", hw, "", f"Thermal state: {_thermal(machine)}. "
           f"Load average at start: {_loadavg(machine)}.", "",
           f"Profile `{profile['name']}`; command: `{' '.join(argv)}`.", ""]
    if notes:
        out += ["Notes:", *[f"- {n}" for n in notes], ""]
    for m in models:
        out += [f"## {m['label']}", "", f"Artifact `{m['path']}` ({m.get('bits') or '?'}-bit, "
                f"{(m.get('size_bytes') or 0) / 1e6:.1f} MB). Long prompt: {m.get('long_prompt_tokens')} tokens.", "",
                "### Headline", "", headline_table(m["metrics"]), "",
                "### All metrics (p50 / p95 / p99 / mean / stddev)", "", detail_table(m["metrics"]), "",
                "### mlx_lm in-process floor (`stream_generate`, no server)", "", floor_table(m.get("floor")), "",
                "### Errors", "", errors_section(m.get("errors") or {}), ""]
    out += ["## Contracts (`benchmarks/contracts.toml`)", "", contracts_section(verdicts), "",
            "## Quantization quality", "", quality_section(quality), ""]
    if plots:
        out += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    out += ["## Method", "",
            "Both systems serve the same artifact folder. Server numbers come from real HTTP streaming (SSE) "
            "with the OpenAI chat API, temperature 0 (greedy); tokens are counted from the `usage` field "
            "(or the artifact's tokenizer), never from SSE chunks. Samples are interleaved in pairs, alternating "
            "which system goes first; warm-ups are discarded. Ratios are Squish/mlx_lm of the medians; p is the "
            "two-sided Wilcoxon signed-rank test on the pairs (fewer than 6 pairs can never reach p < 0.05, "
            f"shown as 'n too small'); a difference with p ≥ 0.05 is reported as not significant. "
            "See docs/benchmarks.md.", ""]
    return "\n".join(out)


def _thermal(machine: dict) -> str:
    t0, t1 = machine.get("thermal"), machine.get("thermal_end")
    if not t0 and not t1:
        return "not exposed by this OS"

    def one(t):
        if not t:
            return "—"
        if "text" in t:
            return " ".join(t["text"].split())[:160]
        zones = t.get("zones_celsius") or {}
        return ", ".join(f"{k.split(':', 1)[-1]} {v:.0f}°C" for k, v in zones.items()) or t.get("cpufreq_governor", "—")
    return f"start {one(t0)}; end {one(t1)}"


def _loadavg(machine: dict) -> str:
    la = machine.get("loadavg")
    return " / ".join(f"{x:.2f}" for x in la) + " (1/5/15 min)" if la else "unknown"
