"""One model over 1, 2 and 3 ranks on this machine: per-rank memory, TTFT, decode tok/s,
for Squish (`squish serve --hosts 127.0.0.1,...`, over HTTP) beside mlx_lm's own
distributed generation (`mlx_lm.utils.sharded_load` + `stream_generate` under
`mlx.launch`, in process), in the same run.

Models:
- ``smollm2``: the real SmolLM2-135M INT4 artifact (``--artifact``). 9 attention heads and
  3 KV heads: it splits over 1 or 3 ranks, not 2.
- ``six``: random weights shaped like SmolLM2 but divisible by 2 and 3 (hidden 768, 12
  heads, 6 KV heads, MLP 2304, 12 layers, SmolLM2's tokenizer and vocabulary), INT4
  group 64 with float32 scales, written here as a plain mlx_lm folder. For speed and
  memory only: its text is noise.

Per configuration: one warm-up, then ``--runs`` greedy streamed requests of
``--max-tokens`` tokens on the same prompt (Squish; the prefix cache is off so every run
prefills the whole prompt), and as many ``stream_generate`` calls (mlx_lm). TTFT is
send -> first token; decode tok/s is (tokens - 1) / (last token - first token). Memory:
MLX's peak per rank after the runs (Squish: ``squish_rank_mlx_memory_bytes``; mlx_lm:
``mx.get_peak_memory`` on each rank) and each rank process's RSS.

Everything runs on this machine's 2 cores over loopback: more ranks cannot be faster
here (they share the same cores and every token crosses the ring dozens of times). The
numbers show what splitting costs in latency and saves in memory per rank; see
docs/distributed.md for what they mean on Thunderbolt.

    .venv/bin/python benchmarks/distributed.py --artifact <smollm2 artifact> [--runs 5] [--max-tokens 24]

Writes benchmarks/results/<UTC stamp>_distributed/{config,results}.json and report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import httpx  # noqa: E402
import psutil  # noqa: E402

from benchmarks.baseline.streaming import chat_body, stream_chat  # noqa: E402
from benchmarks.common import percentiles, write_results  # noqa: E402

PROMPT = "Write a short story about a cat who learns to play the piano."
SIX = {"model_type": "llama", "hidden_size": 768, "num_hidden_layers": 12, "intermediate_size": 2304,
       "num_attention_heads": 12, "num_key_value_heads": 6, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
       "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
       "rope_traditional": False}

MLX_LM = r"""
import json, sys, time
import mlx.core as mx
from mlx_lm import stream_generate
from mlx_lm.utils import load, sharded_load
path, runs, max_tokens, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
group = mx.distributed.init()
if group.size() > 1:
    model, tok = sharded_load(path)  # tensor parallel where the model has `shard` (mlx_lm's choice)
else:
    model, tok = load(path)
ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
rows = []
for i in range(runs + 1):
    t0 = time.perf_counter(); first = last = None; n = 0
    for r in stream_generate(model, tok, ids, max_tokens=max_tokens):
        now = time.perf_counter(); first = first or now; last = now; n = r.generation_tokens
    if i:
        rows.append({"ttft": first - t0, "decode_tok_s": (n - 1) / (last - first) if n > 1 else None,
                     "tokens": n})
import psutil
print("RESULT " + json.dumps({"rank": group.rank(), "peak": mx.get_peak_memory(),
      "rss": psutil.Process().memory_info().rss, "runs": rows}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_six(out: Path, tokenizer_from: Path) -> Path:
    """A random-weight INT4 model divisible by 2 and 3, with SmolLM2's tokenizer."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    if (out / "config.json").exists():
        return out
    out.mkdir(parents=True)
    model_cls, args_cls = _get_classes(SIX)
    mx.random.seed(0)
    model = model_cls(args_cls.from_dict(SIX))  # MLX's default initialisation: random weights
    nn.quantize(model, group_size=64, bits=4)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    quant = {"group_size": 64, "bits": 4, "mode": "affine"}
    (out / "config.json").write_text(json.dumps({**SIX, "quantization": quant, "eos_token_id": 2}))
    for f in tokenizer_from.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, out / f.name)
    return out


def rank_processes(root: int) -> dict[int, psutil.Process]:
    out = {}
    for p in psutil.Process(root).children(recursive=True):
        try:
            rank = p.environ().get("MLX_RANK")
            if "squish" in p.cmdline() or "-c" in p.cmdline():
                out[int(rank or 0)] = p
        except (psutil.Error, ValueError):
            continue
    return out


def squish_run(model: Path, ranks: int, runs: int, max_tokens: int) -> dict:
    port = _free_port()
    cmd = [sys.executable, "-m", "squish", "serve", str(model), "--port", str(port), "--rate-limit", "0",
           "--prefix-cache-mb", "0", "-q"]
    if ranks > 1:
        cmd += ["--hosts", ",".join(["127.0.0.1"] * ranks)]
    log = tempfile.NamedTemporaryFile("w+", suffix=".log")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"squish serve exited:\n{log.read()[-3000:]}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        ready_s = time.perf_counter() - t0
        body = chat_body("default", PROMPT, max_tokens)
        rows = []
        with httpx.Client(timeout=900) as c:
            for i in range(runs + 1):
                r = stream_chat(c, url, body)
                if i:
                    rows.append({"ttft": r.ttft, "decode_tok_s": r.decode_tok_s, "tokens": r.completion_tokens})
            metrics = c.get(url + "/metrics").text
        peaks = {}
        for m in re.finditer(r'squish_rank_mlx_memory_bytes\{kind="peak",rank="(\d+)"\} ([0-9.e+]+)', metrics):
            peaks[int(m.group(1))] = float(m.group(2))
        if not peaks:
            m = re.search(r"^squish_mlx_peak_memory_bytes ([0-9.e+]+)$", metrics, re.M)
            peaks = {0: float(m.group(1))}
        procs = rank_processes(proc.pid) if ranks > 1 else {0: psutil.Process(proc.pid)}
        rss = {r: p.memory_info().rss for r, p in procs.items()}
        return {"ready_s": ready_s, "runs": rows, "peak": peaks, "rss": rss}
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def mlx_lm_run(model: Path, ranks: int, runs: int, max_tokens: int) -> dict:
    script = [sys.executable, "-c", MLX_LM, str(model), str(runs), str(max_tokens), PROMPT]
    if ranks > 1:
        launcher = Path(sys.executable).with_name("mlx.launch")
        script = [str(launcher), "--backend", "ring", "--hosts", ",".join(["127.0.0.1"] * ranks),
                  "--starting-port", str(_free_port()), "--", *script]
    out = subprocess.run(script, capture_output=True, text=True, timeout=3600)
    results = [json.loads(line.split("RESULT ", 1)[1]) for line in out.stdout.splitlines() if "RESULT " in line]
    if len(results) != ranks:
        raise RuntimeError(f"mlx_lm run failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    results.sort(key=lambda r: r["rank"])
    return {"runs": results[0]["runs"], "peak": {r["rank"]: r["peak"] for r in results},
            "rss": {r["rank"]: r["rss"] for r in results}}


def summary(res: dict) -> dict:
    return {"ttft": percentiles([r["ttft"] for r in res["runs"]]),
            "decode_tok_s": percentiles([r["decode_tok_s"] for r in res["runs"] if r["decode_tok_s"]]),
            "peak_mib": {r: v / 2**20 for r, v in res["peak"].items()},
            "rss_mib": {r: v / 2**20 for r, v in res["rss"].items()}}


def report(rows: list[dict], cfg: dict, load: tuple) -> str:
    lines = ["# One model over several ranks on this machine (loopback, ring backend)", "",
             f"{cfg['runs']} greedy runs of {cfg['max_tokens']} tokens after one warm-up; prompt: "
             f"\"{PROMPT}\". Load average before/after: {load[0]} / {load[1]} (2 cores, shared).", "",
             "| model | ranks | system | TTFT p50 (s) | decode tok/s p50 | MLX peak per rank (MiB) | "
             "RSS per rank (MiB) |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        s = r["summary"]
        peak = " / ".join(f"{v:.0f}" for _, v in sorted(s["peak_mib"].items()))
        rss = " / ".join(f"{v:.0f}" for _, v in sorted(s["rss_mib"].items()))
        lines.append(f"| {r['model']} | {r['ranks']} | {r['system']} | {s['ttft']['p50']:.3f} | "
                     f"{s['decode_tok_s']['p50']:.2f} | {peak} | {rss} |")
    lines += ["", "Memory columns list rank 0 / rank 1 / rank 2. MLX peak is `mx.get_peak_memory()` "
              "since the process started (loading included); RSS also counts Python, the tokenizer "
              "and, on Squish's rank 0, the HTTP server.", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, required=True, help="the SmolLM2-135M INT4 artifact")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "squish-bench-distributed")
    ap.add_argument("--only", default="", help="comma-separated MODEL:RANKS subset, e.g. smollm2:3,six:2")
    args = ap.parse_args()
    plan = [("smollm2", 1), ("smollm2", 3), ("six", 1), ("six", 2), ("six", 3)]
    if args.only:
        want = {tuple(x.split(":")) for x in args.only.split(",")}
        plan = [(m, r) for m, r in plan if (m, str(r)) in want]
        if not plan:
            ap.error(f"--only {args.only!r} names none of smollm2:1, smollm2:3, six:1, six:2, six:3")
    paths = {"smollm2": args.artifact}
    if any(m == "six" for m, _ in plan):
        paths["six"] = build_six(args.work / "six-4bit", args.artifact)
    plan = [(m, paths[m], r) for m, r in plan]
    load0 = tuple(round(x, 1) for x in os.getloadavg())
    rows = []
    for name, path, ranks in plan:
        for system, run in (("squish", squish_run), ("mlx_lm", mlx_lm_run)):
            print(f"{name} x{ranks} {system} ...", file=sys.stderr, flush=True)
            res = run(path, ranks, args.runs, args.max_tokens)
            rows.append({"model": name, "ranks": ranks, "system": system, "raw": res, "summary": summary(res)})
            print(f"  {json.dumps(rows[-1]['summary'])[:300]}", file=sys.stderr, flush=True)
    load1 = tuple(round(x, 1) for x in os.getloadavg())
    cfg = {"runs": args.runs, "max_tokens": args.max_tokens, "prompt": PROMPT, "artifact": str(args.artifact),
           "six": SIX, "loadavg_before": load0, "loadavg_after": load1}
    out = write_results("distributed", cfg, {"rows": rows}, report(rows, cfg, (load0, load1)))
    print(out)


if __name__ == "__main__":
    main()
