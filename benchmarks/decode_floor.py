"""Squish's HTTP decode speed against mlx_lm's in-process ``stream_generate``, paired.

The issue's target is "decode tok/s >= mlx_lm's stream_generate". The baseline measures
that floor in its own phase (fresh subprocesses, before the servers start), so its
comparison with the HTTP numbers is unpaired and a machine that slows down between
phases shows up as a difference. Here both run at the same time: a `squish serve`
process and a long-lived worker process that has loaded the model with `mlx_lm.load`
and runs `stream_generate` on request. Requests alternate (A B, B A, ...) with the same
prompt text, which has a unique tag per pair. Greedy decoding is used, with the same
`max_tokens`. Decode tok/s = (tokens - 1) / (last token - first token) on both sides:
the first streamed content delta on the HTTP side, the first `stream_generate`
response in-process.

    .venv/bin/python benchmarks/decode_floor.py --model <artifact> [--pairs 12] [--max-tokens 48]

Writes benchmarks/results/<UTC stamp>_decode_floor/{config,results}.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402

from benchmarks.baseline import prompts  # noqa: E402
from benchmarks.baseline.stats import compare  # noqa: E402
from benchmarks.baseline.streaming import chat_body, stream_chat  # noqa: E402
from benchmarks.baseline.systems import SQUISH, Server, specs  # noqa: E402
from benchmarks.common import write_results  # noqa: E402

WORKER = r"""
import json, sys, time
import mlx_lm
from mlx_lm import stream_generate
model, tok = mlx_lm.load(sys.argv[1])
print("ready", flush=True)
for line in sys.stdin:
    cfg = json.loads(line)
    ids = tok.apply_chat_template([{"role": "user", "content": cfg["text"]}], add_generation_prompt=True)
    t0 = time.perf_counter(); first = last = None; n = 0
    for r in stream_generate(model, tok, ids, max_tokens=cfg["max_tokens"]):
        now = time.perf_counter()
        first = first or now
        last = now; n = r.generation_tokens
    print(json.dumps({"ttft": first - t0, "decode_s": last - first, "tokens": n}), flush=True)
"""


class Worker:
    def __init__(self, model: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, str(model)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the mlx_lm worker failed to load the model")

    def run(self, text: str, max_tokens: int) -> dict:
        self.proc.stdin.write(json.dumps({"text": text, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, type=Path, help="artifact folder (both sides load it)")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--warmups", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=48)
    a = ap.parse_args()
    log_dir = Path(tempfile.mkdtemp(prefix="squish-decode-floor-"))
    server = Server(specs()[SQUISH], a.model, log_dir / "server_squish.log").start()
    worker = None
    samples: dict[str, list[dict]] = {"squish_http": [], "mlx_lm_stream_generate": []}
    try:
        server.wait_ready(300)
        worker = Worker(a.model)
        with httpx.Client(timeout=600) as client:
            def http(text: str, n: int) -> dict:
                r = stream_chat(client, server.base_url, chat_body(server.model_field, text, n))
                return {"ttft": r.ttft, "decode_s": r.decode_s, "tokens": r.completion_tokens}

            for i in range(a.warmups):
                text = prompts.tagged(f"warm {i}", prompts.SHORT)
                http(text, 8)
                worker.run(text, 8)
            for i in range(a.pairs):
                text = prompts.tagged(f"pair {i}", prompts.SHORT)
                first_http = i % 2 == 0
                for side in (("http", "inproc") if first_http else ("inproc", "http")):
                    if side == "http":
                        samples["squish_http"].append(http(text, a.max_tokens))
                    else:
                        samples["mlx_lm_stream_generate"].append(worker.run(text, a.max_tokens))
                print(f"pair {i + 1}/{a.pairs}", file=sys.stderr, flush=True)
    finally:
        if worker is not None:
            worker.close()
        server.stop()

    def tok_s(s: dict) -> float:
        return (s["tokens"] - 1) / s["decode_s"] if s["decode_s"] and s["tokens"] > 1 else float("nan")

    sq = [tok_s(s) for s in samples["squish_http"]]
    ml = [tok_s(s) for s in samples["mlx_lm_stream_generate"]]
    c = compare(sq, ml, higher_is_better=True)
    tokens = sorted({s["tokens"] for v in samples.values() for s in v})
    report = "\n".join([
        f"# Decode: Squish over HTTP vs mlx_lm `stream_generate` in-process, `{a.model.name}`", "",
        f"{c['n_pairs']} interleaved pairs after {a.warmups} warm-ups, greedy, max_tokens {a.max_tokens} "
        f"(tokens generated: {tokens}); short prompt with a unique tag per pair.", "",
        "| side | decode tok/s p50 | p95 | p99 | mean | stdev |", "|---|---|---|---|---|---|",
        *(f"| {name} | {s['p50']:.2f} | {s['p95']:.2f} | {s['p99']:.2f} | {s['mean']:.2f} | {s['stdev']:.2f} |"
          for name, s in (("Squish (HTTP streaming)", c["squish"]), ("mlx_lm stream_generate", c["mlx_lm"]))),
        "", f"Squish / floor: {c['ratio']:.3f}× (Wilcoxon p = {c['p']:.4f}; {c['verdict']})", ""])
    out = write_results("decode_floor", {"model": str(a.model), "pairs": a.pairs, "warmups": a.warmups,
                                         "max_tokens": a.max_tokens},
                        {"samples": samples, "decode_tok_s": {"squish_http": sq, "mlx_lm_stream_generate": ml},
                         "comparison": c}, report)
    print(report)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
