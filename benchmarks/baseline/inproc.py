"""In-process measurements, each in a fresh Python subprocess (nothing cached in
this process can help or hurt): import time, model load time and peak RSS, and
mlx_lm's own ``stream_generate`` as the library floor for TTFT / ITL / decode.

The child scripts print one JSON line on stdout.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import ROOT

IMPORT_CHILD = r"""
import json, sys, time
t = time.perf_counter()
__import__(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - t}))
"""

LOAD_CHILD = r"""
import json, resource, sys, threading, time
import psutil
import mlx.core as mx
proc = psutil.Process()
path, which = sys.argv[1], sys.argv[2]
# Both loaders build the model with mlx_lm's classes: import it before timing in both
# processes so "load" measures loading, not importing (import time is measured separately).
import mlx_lm
import mlx_lm.utils
if which == "squish":
    import squish.runtime.loader as L
before = proc.memory_info().rss
peak = [before]; done = [False]
def sample():
    while not done[0]:
        peak[0] = max(peak[0], proc.memory_info().rss); time.sleep(0.002)
th = threading.Thread(target=sample); th.start()
# Each loader loads its tokenizer once, before the weights (Squish: squish.runtime.tokenizer.load)
# or after them (mlx_lm: mlx_lm.utils.load_tokenizer). That call splits the load into segments:
# the weights phase is the one before or after it with the larger growth, reported against the
# size of the weight files.
segments = []  # (RSS at the segment's start, peak RSS during it)
start = [before]
inside = [False]
def splitting(fn):
    def wrapped(*a, **k):
        if inside[0]:  # a nested call (Squish's loader falling back to mlx_lm's)
            return fn(*a, **k)
        inside[0] = True
        now = proc.memory_info().rss
        segments.append((start[0], max(peak[0], now)))
        try:
            return fn(*a, **k)
        finally:
            start[0] = peak[0] = proc.memory_info().rss
            inside[0] = False
    return wrapped
mlx_lm.utils.load_tokenizer = splitting(mlx_lm.utils.load_tokenizer)
if which == "squish":
    import squish.runtime.tokenizer as T
    T.load = splitting(T.load)
t0 = time.perf_counter()
if which == "squish":
    model = L.load_artifact(path).model
else:
    model, tok = mlx_lm.load(path)
mx.eval(model.parameters())
seconds = time.perf_counter() - t0
done[0] = True; th.join()
after = proc.memory_info().rss
segments.append((start[0], max(peak[0], after)))
ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ru = ru if sys.platform == "darwin" else ru * 1024
import pathlib
size = sum(f.stat().st_size for f in pathlib.Path(path).glob("*.safetensors"))
growth = max((p - s for s, p in segments), default=None) if len(segments) == 2 else None
print(json.dumps({"seconds": seconds, "rss_before": before, "rss_after": after,
                  "peak_rss": max(peak[0], ru, after), "peak_rss_delta": max(ru, after) - before,
                  "weights_bytes": size,
                  "weights_peak_ratio": growth / size if growth is not None and size else None}))
"""

GENERATE_CHILD = r"""
import json, sys, time
import psutil, mlx.core as mx, mlx_lm
from mlx_lm import stream_generate
cfg = json.loads(sys.argv[1])
proc = psutil.Process()
model, tok = mlx_lm.load(cfg["model"])
def prompt_ids(text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
def run(text, max_tokens):
    ids = prompt_ids(text)
    t0 = time.perf_counter(); first = last = None; n = 0; peak_rss = proc.memory_info().rss
    for r in stream_generate(model, tok, ids, max_tokens=max_tokens):
        now = time.perf_counter()
        if first is None:
            first = now
        last = now; n = r.generation_tokens
        peak_rss = max(peak_rss, proc.memory_info().rss)
    return {"ttft": first - t0, "decode_s": last - first, "tokens": n, "prompt_tokens": len(ids),
            "peak_rss": peak_rss}
for w in cfg["warmups"]:
    run(w, cfg["warmup_tokens"])
mx.reset_peak_memory()
out = {"short": [], "long": []}
for kind in ("short", "long"):
    for text in cfg[kind]:
        out[kind].append(run(text, cfg["max_tokens"]))
out["peak_mlx_bytes"] = mx.get_peak_memory()
time.sleep(1.0)
out["steady_rss"] = proc.memory_info().rss
out["active_mlx_bytes"] = mx.get_active_memory()
print(json.dumps(out))
"""


def _child(code: str, *args: str, timeout: float = 900) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"child process failed ({out.returncode}): {out.stderr.strip()[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def import_time(module: str) -> float:
    return _child(IMPORT_CHILD, module)["seconds"]


def load(model: Path, which: str) -> dict:
    return _child(LOAD_CHILD, str(model), which)


def mlx_lm_generate(model: Path, short: list[str], long: list[str], warmups: list[str],
                    warmup_tokens: int, max_tokens: int) -> dict:
    cfg = {"model": str(model), "short": short, "long": long, "warmups": warmups,
           "warmup_tokens": warmup_tokens, "max_tokens": max_tokens}
    return _child(GENERATE_CHILD, json.dumps(cfg), timeout=1800)
