"""Load time and peak RSS of loading an artifact: Squish's loader vs mlx_lm.load.

Each load runs in a fresh subprocess (A B A B ... interleaved so machine drift hits both);
RSS is sampled every 2 ms from a thread and cross-checked with ru_maxrss. The metric of
record is (peak RSS during load − RSS before load) / size of the weight files, with every
library both loaders need (mlx_lm, transformers) imported before "before", so the delta is
the load itself: weights plus the tokenizer.

    .venv/bin/python benchmarks/load_memory.py [ARTIFACT] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import ROOT, percentiles, write_results

CHILD = r"""
import json, resource, sys, threading, time
import psutil
import mlx.core as mx
import mlx_lm
import mlx_lm.utils
import transformers
import squish.runtime.loader as L
proc = psutil.Process()
path, which = sys.argv[1], sys.argv[2]
before = proc.memory_info().rss
peak = [before]; done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
# Both loaders call mlx_lm.utils.load_tokenizer after the weights: note the peak there,
# so the weights' share of the load is reported apart from the tokenizer's.
weights_peak = [None]
_load_tokenizer = mlx_lm.utils.load_tokenizer
def load_tokenizer(*a, **k):
    weights_peak[0] = max(peak[0], proc.memory_info().rss)
    return _load_tokenizer(*a, **k)
mlx_lm.utils.load_tokenizer = load_tokenizer
t0 = time.perf_counter()
if which == "squish":
    model = L.load_artifact(path).model
else:
    model, tok = mlx_lm.load(path)
mx.eval(model.parameters())
seconds = time.perf_counter() - t0
done[0] = True; t.join()
after = proc.memory_info().rss
peak_rss = max(peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, after)
print(json.dumps({"seconds": seconds, "rss_before": before, "rss_peak": peak_rss, "rss_after": after,
                  "rss_peak_weights": weights_peak[0]}))
"""


def artifact_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("model*.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", nargs="?", help="artifact folder (default: best local artifact)")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if args.artifact:
        path = Path(args.artifact)
    else:
        from squish.models import resolve_model

        path = resolve_model(None)
    size = artifact_bytes(path)
    runs: dict[str, list[dict]] = {"squish": [], "mlx_lm": []}
    for i in range(args.runs):
        for which in ("squish", "mlx_lm"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), which], capture_output=True,
                                 text=True, check=True, cwd=ROOT)
            runs[which].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {"artifact": str(path), "weights_bytes": size, "systems": {}}
    lines = [f"# Load: Squish vs mlx_lm\n\nArtifact `{path.name}`, weights {size / 1e6:.1f} MB, "
             f"{args.runs} runs each, interleaved.\n",
             "| system | load s p50 | peak ΔRSS MB p50 | ΔRSS / weights | weights phase ΔRSS / weights |",
             "|---|---|---|---|---|"]
    for which, rs in runs.items():
        secs = percentiles([r["seconds"] for r in rs])
        delta = percentiles([r["rss_peak"] - r["rss_before"] for r in rs])
        wdelta = percentiles([r["rss_peak_weights"] - r["rss_before"] for r in rs])
        results["systems"][which] = {"seconds": secs, "peak_rss_delta": delta, "runs": rs,
                                     "weights_phase_rss_delta": wdelta,
                                     "ratio_p50": delta["p50"] / size,
                                     "weights_phase_ratio_p50": wdelta["p50"] / size}
        lines.append(f"| {which} | {secs['p50']:.3f} | {delta['p50'] / 1e6:.1f} | {delta['p50'] / size:.2f} "
                     f"| {wdelta['p50'] / size:.2f} |")
    report = "\n".join(lines) + "\n"
    out = write_results("load_memory", {"artifact": str(path), "runs": args.runs}, results, report)
    print(report)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
