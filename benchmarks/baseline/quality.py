"""The quantization-quality table (RTN vs Squish at INT8/INT4/INT3) from
``benchmarks/quant_quality.py``'s result folders: each config's row comes from the newest
folder that measured it (one run need not cover every config); ``--full`` reruns it first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT

RESULTS = ROOT / "benchmarks" / "results"
SCRIPT = ROOT / "benchmarks" / "quant_quality.py"


def latest(rerun: bool = False, results: Path = RESULTS) -> dict | None:
    """``{"links": {folder: relative link}, "table", "rows", "error"?}``, or None when no result
    exists. Each row gains ``source``: the folder it came from."""
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
        return {"error": error, "links": {}, "table": "", "rows": []} if error else None
    newest: dict[str, tuple[Path, dict]] = {}
    for folder in folders:  # oldest first, so a newer folder's row replaces an older one's
        for row in json.loads((folder / "results.json").read_text()).get("rows", []):
            newest[row.get("config", "?")] = (folder, row)
    ordered = sorted(newest.values(), key=lambda fr: -_bits(fr[1]))  # INT8, INT4, INT3
    rows = [{**row, "source": folder.name} for folder, row in ordered]
    used = sorted({folder.name for folder, _ in ordered})
    out = {"links": {name: f"../{name}/results.json" for name in used}, "rows": rows, "table": markdown_table(rows)}
    if error:
        out["error"] = error
    return out


def _bits(row: dict) -> int:
    try:
        return int(row.get("bits") or str(row.get("config", "")).split(":")[0])
    except ValueError:
        return 0


COLUMNS = (("config", "config", "{}"), ("method", "method", "{}"), ("bpw", "bits/weight", "{:.3f}"),
           ("mean_kld", "KLD", "{:.4f}"), ("top1_agreement", "top-1", "{:.4f}"), ("ppl_ref", "ppl ref", "{:.2f}"),
           ("ppl_quant", "ppl", "{:.2f}"), ("ppl_delta", "Δppl", "{:+.1%}"), ("source", "result", "{}"))


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
