"""Squish serving vs mlx_lm on the same artifact, in the same run.

    python -m benchmarks.serve_bench PATH [--prompt-tokens 128] [--gen 64] [--streams 8]

Measures (results in benchmarks/results/<UTC>_serve/, never overwritten):
- start-up: ``import squish`` time; ``squish serve --dry-run`` wall time and RSS
  before the model loads;
- in-process, one stream: TTFT and decode tok/s of Squish's engine vs mlx_lm's
  ``stream_generate`` (greedy, EOS masked so both generate exactly --gen tokens);
- repeated prefix: TTFT of a second identical request vs the cold one;
- HTTP, --streams concurrent streaming requests: aggregate completion tok/s of
  ``squish serve`` vs ``mlx_lm.server``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import write_results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def startup(path: Path) -> dict:
    py = sys.executable
    imp = subprocess.run([py, "-c", "import time; t = time.perf_counter(); import squish; "
                          "print(time.perf_counter() - t)"], capture_output=True, text=True, check=True)
    t0 = time.perf_counter()
    dry = subprocess.run([py, "-m", "squish", "serve", str(path), "--dry-run", "--quiet"],
                         capture_output=True, text=True, check=True)
    wall = time.perf_counter() - t0
    rss = float(dry.stdout.split("RSS ")[1].split(" MiB")[0])
    return {"import_squish_s": float(imp.stdout), "dry_run_wall_s": wall, "dry_run_rss_mib": rss}


def _prompt(tokenizer, n: int) -> list[int]:
    text = ("The history of the city is long and varied, with markets, rivers, bridges and "
            "old stone houses along the narrow streets. ") * 40
    return tokenizer.encode(text)[:n]


def mlx_lm_single(info, prompt: list[int], gen: int) -> dict:
    import mlx.core as mx
    from mlx_lm.generate import stream_generate

    eos = sorted(info.tokenizer.eos_token_ids)

    def mask_eos(tokens, logits):
        logits[:, eos] = -float("inf")
        return logits

    t0 = time.perf_counter()
    ttft, n, last = None, 0, None
    for r in stream_generate(info.model, info.tokenizer, mx.array(prompt), max_tokens=gen,
                             logits_processors=[mask_eos]):
        now = time.perf_counter()
        if ttft is None:
            ttft, first = now - t0, now
        n, last = r.generation_tokens, now
    return {"ttft_s": ttft, "decode_tok_s": (n - 1) / (last - first), "tokens": n}


def squish_single(engine, prompt: list[int], gen: int) -> dict:
    from squish.runtime import engine as eng
    from squish.runtime.sampling import SamplingParams

    eos = sorted(engine.model_info.tokenizer.eos_token_ids)
    params = SamplingParams(max_tokens=gen, temperature=0.0, logit_bias={e: -100.0 for e in eos})

    async def run():
        q: asyncio.Queue = asyncio.Queue()
        t0 = time.perf_counter()
        engine.submit(eng.Request(f"b{time.monotonic_ns()}", prompt, params, 600,
                                  asyncio.get_running_loop(), q))
        ttft, first, last = None, None, None
        while True:
            ev = await q.get()
            now = time.perf_counter()
            if isinstance(ev, eng.Delta):
                if ttft is None:
                    ttft, first = now - t0, now
                last = now
            else:
                return ev, ttft, first, last

    fin, ttft, first, last = asyncio.run(run())
    n = fin.completion_tokens
    return {"ttft_s": ttft, "decode_tok_s": (n - 1) / (last - first), "tokens": n,
            "cached_tokens": fin.cached_tokens}


def in_process(path: Path, prompt_tokens: int, gen: int, repeats: int) -> dict:
    from squish.runtime.engine import Engine
    from squish.runtime.loader import load_artifact

    info = load_artifact(path)
    prompt = _prompt(info.tokenizer, prompt_tokens)
    mlx_lm_single(info, prompt[:16], 4)  # warm-up
    ref = [mlx_lm_single(info, prompt, gen) for _ in range(repeats)]
    engine = Engine(lambda: info, prefix_cache_bytes=0)
    engine.start()
    engine.ready.wait()
    squish_single(engine, prompt[:16], 4)
    ours = [squish_single(engine, prompt, gen) for _ in range(repeats)]
    engine.stop()
    cached = Engine(lambda: info)
    cached.start()
    cached.ready.wait()
    cold = squish_single(cached, prompt, gen)
    warm = squish_single(cached, prompt, gen)
    cached.stop()
    med = lambda xs, k: sorted(x[k] for x in xs)[len(xs) // 2]  # noqa: E731
    return {"prompt_tokens": len(prompt), "gen_tokens": gen,
            "mlx_lm": {"ttft_s": med(ref, "ttft_s"), "decode_tok_s": med(ref, "decode_tok_s")},
            "squish": {"ttft_s": med(ours, "ttft_s"), "decode_tok_s": med(ours, "decode_tok_s")},
            "prefix": {"cold_ttft_s": cold["ttft_s"], "warm_ttft_s": warm["ttft_s"],
                       "warm_cached_tokens": warm["cached_tokens"],
                       "ratio": warm["ttft_s"] / cold["ttft_s"]}}


def _wait_ready(url: str, proc, probe: str) -> None:
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + probe, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not become ready")


def http_streams(cmd: list[str], port: int, probe: str, model: str, prompt: str, gen: int,
                 streams: int, eos: list[int]) -> dict:
    import httpx

    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_ready(url, proc, probe)
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": gen,
                "temperature": 0.0, "stream": True, "logit_bias": {str(e): -100 for e in eos}}
        counts = [0] * streams

        def one(i):
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        ch = json.loads(line[6:])
                        if ch.get("choices") and ch["choices"][0]["delta"].get("content"):
                            counts[i] += 1

        one(0)  # warm-up
        counts[0] = 0
        threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        return {"streams": streams, "wall_s": wall, "content_chunks": sum(counts),
                "aggregate_tok_s": sum(counts) / wall}
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="artifact folder (served by both systems)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    results = {"startup": startup(args.model)}
    results["single"] = in_process(args.model, args.prompt_tokens, args.gen, args.repeats)
    from squish.artifact import read_manifest

    name = (read_manifest(args.model) or {}).get("name", args.model.name)
    with open(args.model / "config.json") as f:
        eos = json.load(f).get("eos_token_id", [])
    eos = eos if isinstance(eos, list) else [eos]
    prompt = "Write a long story about a lighthouse keeper."
    p1, p2 = _free_port(), _free_port()
    env_py = sys.executable
    results["http_squish"] = http_streams(
        [env_py, "-m", "squish", "serve", str(args.model), "--port", str(p1), "--quiet",
         "--rate-limit", "0"], p1, "/health", name, prompt, args.gen, args.streams, eos)
    results["http_mlx_lm"] = http_streams(
        [env_py, "-m", "mlx_lm.server", "--model", str(args.model), "--port", str(p2)], p2,
        "/v1/models", str(args.model), prompt, args.gen, args.streams, eos)
    s, m = results["single"]["squish"], results["single"]["mlx_lm"]
    report = "\n".join([
        f"# serve_bench on {args.model.name}",
        f"- import squish: {results['startup']['import_squish_s']:.3f} s; dry-run "
        f"{results['startup']['dry_run_wall_s']:.2f} s, RSS {results['startup']['dry_run_rss_mib']:.0f} MiB",
        f"- decode tok/s: squish {s['decode_tok_s']:.1f} vs mlx_lm {m['decode_tok_s']:.1f}",
        f"- TTFT ({results['single']['prompt_tokens']} tokens): squish {s['ttft_s'] * 1000:.0f} ms vs "
        f"mlx_lm {m['ttft_s'] * 1000:.0f} ms",
        f"- repeated prefix TTFT: {results['single']['prefix']['ratio'] * 100:.0f}% of cold",
        f"- {args.streams} HTTP streams aggregate tok/s: squish "
        f"{results['http_squish']['aggregate_tok_s']:.1f} vs mlx_lm.server "
        f"{results['http_mlx_lm']['aggregate_tok_s']:.1f}", ""])
    out = write_results("serve", vars(args) | {"model": str(args.model)}, results, report)
    print(report)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
