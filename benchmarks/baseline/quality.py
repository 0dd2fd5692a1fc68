"""The quantization-quality table (RTN vs Squish at INT8/INT4/INT3) from
``benchmarks/quant_quality.py``'s newest result folder; ``--full`` reruns it first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT

RESULTS = ROOT / "benchmarks" / "results"
SCRIPT = ROOT / "benchmarks" / "quant_quality.py"


def latest(rerun: bool = False, results: Path = RESULTS) -> dict | None:
    """``{"folder", "link", "table", "rows", "error"?}`` or None when no result exists."""
    error = None
    if rerun:
        if SCRIPT.exists():
            r = subprocess.run([sys.executable, str(SCRIPT)], cwd=ROOT, capture_output=True, text=True)
            if r.returncode != 0:
                error = f"quant_quality.py exited {r.returncode}: {r.stderr.strip()[-300:]}"
        else:
            error = "benchmarks/quant_quality.py not found"
    folders = sorted(p for p in results.glob("*_quant_quality") if (p / "results.json").exists())
    if not folders:
        return {"error": error, "folder": None, "link": None, "table": "", "rows": []} if error else None
    folder = folders[-1]
    data = json.loads((folder / "results.json").read_text())
    rows = data.get("rows", [])
    out = {"folder": folder.name, "link": f"../{folder.name}/results.json", "rows": rows,
           "table": markdown_table(rows)}
    if error:
        out["error"] = error
    return out


COLUMNS = (("config", "config", "{}"), ("method", "method", "{}"), ("bpw", "bits/weight", "{:.3f}"),
           ("mean_kld", "KLD", "{:.4f}"), ("top1_agreement", "top-1", "{:.4f}"), ("ppl_ref", "ppl ref", "{:.2f}"),
           ("ppl_quant", "ppl", "{:.2f}"), ("ppl_delta", "Δppl", "{:+.1%}"))


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "_empty result_"
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = r.get(key)
            try:
                cells.append(fmt.format(v) if v is not None else "—")
            except (ValueError, TypeError):
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
