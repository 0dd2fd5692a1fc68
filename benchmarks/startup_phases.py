"""Where `squish serve`'s start-up time goes, phase by phase, beside mlx_lm.server's.

The baseline's cold-start metric (process launch -> first streamed token) is one
number per system; this script splits it. Each run is a fresh interpreter that
performs, in order, what the server does before it can answer a chat request, and
times every step with ``perf_counter``:

  squish   import the web stack (squish.api.app: FastAPI, pydantic, uvicorn), import
           mlx_lm.utils (transformers comes with it), load the artifact the way the
           loader does (manifest and header checks, tokenizer, lazy build, NaN/Inf check,
           weights), then encode one chat prompt
  mlx_lm   import mlx_lm.server, then mlx_lm.load on the same folder (its server does
           the same before the first request)

The first prefill is left out: both servers run the same BatchGenerator prefill,
and the baseline measures it. Runs alternate between the systems.

    .venv/bin/python benchmarks/startup_phases.py --model /path/to/artifact [--runs 7]

Writes benchmarks/results/<UTC stamp>_startup_phases/{config,results}.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentiles, write_results  # noqa: E402

SQUISH = r"""
import json, sys, time
T = time.perf_counter(); out = {}
def lap(name, t=[T]):
    now = time.perf_counter(); out[name] = now - t[0]; t[0] = now
from pathlib import Path
path = Path(sys.argv[1])
import squish.api.app, uvicorn; lap("web stack (FastAPI, pydantic, uvicorn)")
import mlx.core as mx, mlx_lm.utils as U; lap("import mlx_lm.utils (+ transformers)")
from squish import artifact
from squish.runtime import loader, tokenizer
artifact.check_files(path, artifact.read_manifest(path)); lap("manifest + header checks")
tok = tokenizer.load(path, eos_token_ids=U.load_config(path).get("eos_token_id")); lap("tokenizer")
model, config = U.load_model(path, lazy=True); lap("build model (lazy)")
loader.check_finite(model, path); mx.eval(model.parameters()); lap("NaN/Inf check + weights")
from squish.runtime import prompts
prompts.encode_chat(tok, [{"role": "user", "content": "Hello!"}]); lap("first chat encode")
out["total"] = time.perf_counter() - T
print(json.dumps(out))
"""

MLX_LM = r"""
import json, sys, time
T = time.perf_counter(); out = {}
def lap(name, t=[T]):
    now = time.perf_counter(); out[name] = now - t[0]; t[0] = now
import mlx_lm.server; lap("import mlx_lm.server")
from mlx_lm import load
model, tok = load(sys.argv[1]); lap("mlx_lm.load (model + tokenizer)")
tok.apply_chat_template([{"role": "user", "content": "Hello!"}], add_generation_prompt=True); lap("first chat encode")
out["total"] = time.perf_counter() - T
print(json.dumps(out))
"""


def run_once(code: str, model: str) -> dict[str, float]:
    r = subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        raise RuntimeError(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="artifact folder (both systems load it)")
    ap.add_argument("--runs", type=int, default=7, help="fresh interpreters per system (default 7)")
    ap.add_argument("--warmups", type=int, default=1, help="discarded runs per system (file cache)")
    a = ap.parse_args()
    systems = {"squish": SQUISH, "mlx_lm": MLX_LM}
    raw: dict[str, list[dict]] = {s: [] for s in systems}
    for i in range(a.warmups + a.runs):
        for s in (systems if i % 2 == 0 else reversed(list(systems))):
            sample = run_once(systems[s], a.model)
            if i >= a.warmups:
                raw[s].append(sample)
    summary = {s: {k: percentiles([r[k] for r in rows]) for k in rows[0]} for s, rows in raw.items()}
    lines = [f"# Start-up phases, `{Path(a.model).name}`", "",
             f"{a.runs} fresh interpreters per system after {a.warmups} warm-up; seconds.", "",
             "| system | phase | p50 | p95 | mean |", "|---|---|---|---|---|"]
    for s, phases in summary.items():
        for k, v in phases.items():
            lines.append(f"| {s} | {k} | {v['p50']:.3f} | {v['p95']:.3f} | {v['mean']:.3f} |")
    ratio = statistics.median(r["total"] for r in raw["squish"]) / statistics.median(r["total"] for r in raw["mlx_lm"])
    lines += ["", f"Squish / mlx_lm, median total: {ratio:.2f}×", ""]
    report = "\n".join(lines)
    out = write_results("startup_phases", {"model": a.model, "runs": a.runs, "warmups": a.warmups},
                        {"raw": raw, "summary": summary, "ratio_total_p50": ratio}, report)
    print(report)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
