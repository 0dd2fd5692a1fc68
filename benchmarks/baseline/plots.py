"""PNG plots: latency distributions and throughput vs concurrency (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path

from benchmarks.baseline.systems import MLX_LM, SQUISH

COLORS = {SQUISH: "#1f77b4", MLX_LM: "#ff7f0e"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency(raw: dict, out: Path, label: str) -> Path | None:
    """Box + points of TTFT and ITL per system, short and long prompts."""
    http = raw.get("http") or {}
    panels = [(kind, field) for kind in ("short", "long") if kind in http for field in ("ttft", "itl")]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6), squeeze=False)
    for ax, (kind, field) in zip(axes[0], panels):
        systems = [s for s in (SQUISH, MLX_LM) if http[kind].get(s)]
        data = [[r[field] * 1e3 for r in http[kind][s] if r.get(field) is not None] for s in systems]
        ax.boxplot(data, showfliers=False)
        ax.set_xticks(range(1, len(systems) + 1), systems)
        for i, (s, ys) in enumerate(zip(systems, data), start=1):
            ax.scatter([i] * len(ys), ys, s=10, color=COLORS[s], alpha=0.7, zorder=3)
        ax.set_title(f"{field.upper()} — {kind} prompt", fontsize=9)
        ax.set_ylabel("ms")
    fig.suptitle(label, fontsize=10)
    fig.tight_layout()
    path = out / f"latency_{_slug(label)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def concurrency(raw: dict, out: Path, label: str) -> Path | None:
    """Aggregate and per-stream tok/s vs number of concurrent streams."""
    conc = raw.get("concurrency") or {}
    if not conc:
        return None
    plt = _plt()
    levels = sorted(int(k) for k in conc)
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
    for s in (SQUISH, MLX_LM):
        agg, per = [], []
        for lv in levels:
            runs = conc[str(lv)].get(s) or []
            agg.append(_mean([r["aggregate_tok_s"] for r in runs]))
            per.append(_mean([x for r in runs for x in r["per_stream_decode_tok_s"]]))
        if any(a is not None for a in agg):
            axes[0].plot(levels, agg, marker="o", color=COLORS[s], label=s)
            axes[1].plot(levels, per, marker="o", color=COLORS[s], label=s)
    for ax, title in zip(axes, ("aggregate tok/s", "per-stream decode tok/s")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(levels, [str(lv) for lv in levels])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
    fig.suptitle(label, fontsize=10)
    fig.tight_layout()
    path = out / f"concurrency_{_slug(label)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower()
