"""Peak memory of `squish serve` vs `mlx_lm.server`, phase by phase, paired and interleaved.

Both servers run the same artifact folder, one at a time, each under the same probe
(``benchmarks/memprobe.py``: MLX's allocator figures from inside the process), in
pairs that alternate which system goes first. Each server process goes through:

  load      launch -> model loaded (Squish: /health 200; mlx_lm: its model provider
            returned): whole-process peak RSS since launch, RSS once settled
  request   one chat request with a ``--prompt-tokens`` prompt, ``--gen`` tokens
  ctx<N>    one request with an N-token prompt, for each ``--contexts`` entry
  streams   ``--streams`` concurrent requests (short prompts), ``--gen`` tokens each

Every prompt starts with a unique tag, so neither server reuses a cached prefix.
Before each phase after ``load`` the process's peak RSS is reset (Linux: VmHWM via
/proc/PID/clear_refs; elsewhere a 5 ms RSS sampler) and so is MLX's peak; after it
the phase's peaks are read. Reported per phase: ``peak_rss`` (the whole process),
``growth`` (peak minus the RSS the phase started from), ``mlx_peak``, and the KV
cache those tokens need (computed from the config: layers x 2 x KV heads x head
dim x the activation dtype's bytes), so "memory grows with the KV only" can be read
off: growth minus KV is what else the phase allocated.

    .venv/bin/python -m benchmarks.serve_memory --shape qwen2.5:1.5b --bits 4
    .venv/bin/python -m benchmarks.serve_memory --model PATH --contexts 1024,2048 --pairs 3
    .venv/bin/python -m benchmarks.serve_memory --model PATH --contexts 2048 --kv-bits 8

``--shape`` builds (once, cached) a random-weight artifact with that model's exact
shapes (``benchmarks/random_artifact.py``). Defaults follow the issue on Metal / CUDA
(512-token request, 4k and 16k contexts, 8 streams); MLX's CPU backend prefills a
1.5B model at roughly one token per second on a 2-core machine, so on CPU the
defaults are scaled down (64-token request, no long contexts, 8 streams of short
prompts) and the report says so. Results: benchmarks/results/<UTC stamp>_serve_memory/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.baseline import prompts  # noqa: E402
from benchmarks.baseline.stats import compare, fmt_p  # noqa: E402
from benchmarks.baseline.streaming import chat_body, concurrent_streams, stream_chat  # noqa: E402
from benchmarks.baseline.systems import free_port  # noqa: E402
from benchmarks.common import machine, result_dir  # noqa: E402

SQUISH, MLX_LM = "squish", "mlx_lm"
# The contract (Apple M3 16 GB), whole process: bytes.
CONTRACT = {("qwen2.5:1.5b", 4): 1.5e9, ("qwen2.5:1.5b", 3): 1.0e9, ("qwen3:8b", 4): 6.0e9}
SQUISH_CMD = ("{python} -m benchmarks.memprobe {stats} squish serve {model} --port {port} --rate-limit 0 "
              "--request-timeout 86400 --queue-timeout 86400")
MLX_LM_CMD = "{python} -m benchmarks.memprobe {stats} mlx_lm.server --model {model} --port {port}"
# --kv-bits N: both servers keep a quantized KV cache from the first token (mlx_lm.server's own
# option starts at token 5000 unless told, and serves one request at a time with it).
KV_ARGS = {SQUISH: " --kv-bits {bits}", MLX_LM: " --kv-bits {bits} --quantized-kv-start 0"}
KV_GROUP = 64
GPU_DEFAULTS = {"prompt_tokens": 512, "contexts": [4096, 16384], "streams": 8, "stream_tokens": 64, "gen": 16}
CPU_DEFAULTS = {"prompt_tokens": 64, "contexts": [], "streams": 8, "stream_tokens": 8, "gen": 4}


def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    key, value = line.split(":")
                    out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class Peak:
    """The process's peak RSS since ``reset()``: the kernel's VmHWM on Linux, else a
    5 ms sampler (which can miss a spike shorter than that)."""

    def __init__(self, pid: int):
        self.pid = pid
        self.proc = psutil.Process(pid)
        self.kernel = "VmHWM" in _status(pid)
        self._peak = 0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def rss(self) -> int:
        try:
            return self.proc.memory_info().rss
        except psutil.Error:
            return 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self.rss())
            self._stop.wait(0.005)

    def reset(self) -> None:
        if self.kernel:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
        self._peak = self.rss()

    def read(self) -> int:
        hwm = _status(self.pid).get("VmHWM", 0) if self.kernel else 0
        return max(hwm, self._peak, self.rss())

    def stop(self) -> None:
        self._stop.set()


class Server:
    def __init__(self, system: str, model: Path, out: Path, tag: str, kv_bits: int | None = None):
        self.system, self.model = system, model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stats = Path(tempfile.mkdtemp(prefix="memprobe-")) / "stats.json"
        template = (SQUISH_CMD if system == SQUISH else MLX_LM_CMD) + (
            KV_ARGS[system].format(bits=kv_bits) if kv_bits else "")
        self.argv = shlex.split(template.format(python=shlex.quote(sys.executable), stats=self.stats,
                                                model=shlex.quote(str(model)), port=self.port))
        self.log = open(out / f"server_{system}_{tag}.log", "ab")
        self.model_field = "default" if system == SQUISH else "default_model"

    def start(self) -> "Server":
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for _ in range(200):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.system} exited with {self.proc.returncode}; see {self.log.name}")
            if psutil.pid_exists(self.proc.pid):
                break
            time.sleep(0.01)
        self.peak = Peak(self.proc.pid)
        return self

    def probe(self) -> dict:
        for _ in range(100):
            try:
                return json.loads(self.stats.read_text())
            except (OSError, ValueError):
                time.sleep(0.02)
        return {}

    def reset_mlx_peak(self) -> None:
        before = self.probe().get("resets", 0)
        Path(str(self.stats) + ".cmd").write_text("reset")
        deadline = time.perf_counter() + 10
        while self.probe().get("resets", 0) <= before and time.perf_counter() < deadline:
            time.sleep(0.02)

    def fresh_probe(self) -> dict:
        """A probe reading written after this call (the probe writes every 50 ms)."""
        t = time.time()
        for _ in range(200):
            p = self.probe()
            if p.get("t", 0) > t:
                return p
            time.sleep(0.02)
        return self.probe()

    def wait_loaded(self, timeout: float) -> float:
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=5) as c:
            while time.perf_counter() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.system} exited with {self.proc.returncode}; see {self.log.name}")
                try:
                    ok = c.get(self.url + "/health").status_code == 200
                except httpx.TransportError:
                    ok = False
                if ok and (self.system == SQUISH or self.probe().get("loaded")):
                    return time.perf_counter() - self.t0
                time.sleep(0.05)
        raise TimeoutError(f"{self.system} not loaded after {timeout:.0f} s")

    def stop(self) -> None:
        self.peak.stop()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        self.log.close()


def settle(srv: Server, seconds: float = 1.0) -> int:
    time.sleep(seconds)
    return srv.peak.rss()


def kv_bytes_per_token(model: Path, kv_bits: int | None = None) -> int:
    cfg = json.loads((model / "config.json").read_text())
    cfg = {**cfg, **(cfg.get("text_config") or {})}
    heads = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    manifest = model / "squish.json"
    dtype = json.loads(manifest.read_text()).get("quantization", {}).get("dtype") if manifest.exists() else None
    size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype or "float16", 2)
    values = cfg["num_hidden_layers"] * 2 * heads * head_dim
    if kv_bits:  # packed bits, and a scale and a bias in the activation dtype per group
        return int(values * (kv_bits / 8 + 2 * size / KV_GROUP))
    return values * size


def phase(srv: Server, name: str, bodies: list[dict], timeout: float) -> dict:
    """Run ``bodies`` (concurrently when more than one) and read the phase's peaks."""
    rss_before = settle(srv, 0.5)
    srv.reset_mlx_peak()
    srv.peak.reset()
    t = time.perf_counter()
    if len(bodies) == 1:
        with httpx.Client(timeout=timeout) as c:
            results = [stream_chat(c, srv.url, bodies[0])]
    else:
        results, _ = concurrent_streams(srv.url, bodies, timeout=timeout)
    seconds = time.perf_counter() - t
    probe = srv.fresh_probe()
    peak = srv.peak.read()
    return {"phase": name, "rss_before": rss_before, "peak_rss": peak, "growth": peak - rss_before,
            "mlx_peak": probe.get("peak"), "mlx_active_after": probe.get("active"),
            "mlx_cache_after": probe.get("cache"), "rss_after": settle(srv),
            "prompt_tokens": sum(r.prompt_tokens or 0 for r in results),
            "completion_tokens": sum(r.completion_tokens for r in results), "seconds": seconds}


def one_server(system: str, model: Path, out: Path, tag: str, plan: dict, tokens, counter: list[int],
               timeout: float, kv_bits: int | None = None) -> list[dict]:
    srv = Server(system, model, out, tag, kv_bits).start()
    rows = []
    try:
        ready = srv.wait_loaded(timeout)
        rss = settle(srv, 2.0)
        probe = srv.fresh_probe()
        rows.append({"phase": "load", "rss_before": 0, "peak_rss": srv.peak.read(), "growth": None,
                     "mlx_peak": probe.get("peak"), "mlx_active_after": probe.get("active"),
                     "mlx_cache_after": probe.get("cache"), "rss_after": rss, "seconds": ready})

        def body(n_tokens: int, max_tokens: int) -> dict:
            counter[0] += 1
            text = prompts.long_prompt(f"run {counter[0]}", prompts.prose(n_tokens, tokens, counter[0]))
            return chat_body(srv.model_field, text, max_tokens)

        for name, sizes in plan["phases"]:
            rows.append(phase(srv, name, [body(n, plan["gen"]) for n in sizes], timeout))
    finally:
        srv.stop()
    return rows


def summarize_runs(runs: dict[str, list[list[dict]]], kv_per_token: int) -> dict:
    names = [r["phase"] for r in (runs[SQUISH] or runs[MLX_LM])[0]]
    out = {}
    for i, name in enumerate(names):
        entry = {}
        for field in ("peak_rss", "growth", "mlx_peak", "rss_after"):
            a = [r[i][field] for r in runs[SQUISH]]
            b = [r[i][field] for r in runs[MLX_LM]]
            if all(x is None for x in a + b):
                continue
            entry[field] = compare([x for x in a if x is not None], [x for x in b if x is not None],
                                   higher_is_better=False)
        tokens = [r[i].get("prompt_tokens", 0) + r[i].get("completion_tokens", 0) for r in runs[SQUISH]]
        entry["kv_bytes"] = kv_per_token * (max(tokens) if tokens else 0)
        out[name] = entry
    return out


def _mb(x) -> str:
    return "—" if x is None or x != x else f"{x / 1e6:,.0f}"


def report(label: str, summary: dict, meta: dict) -> list[str]:
    lines = [f"## {label}", "",
             f"Weights (safetensors): {_mb(meta['weights_bytes'])} MB; KV cache: "
             f"{meta['kv_per_token'] / 1e3:.1f} kB per token ({meta['kv_dtype']}); {meta['pairs']} pairs.", "",
             "| phase | Squish peak RSS (MB) | mlx_lm peak RSS (MB) | ratio | p | Squish growth | mlx_lm growth | "
             "KV of the phase | Squish MLX peak | mlx_lm MLX peak |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        pr, gr, mp = e.get("peak_rss", {}), e.get("growth", {}), e.get("mlx_peak", {})
        ratio = pr.get("ratio")
        lines.append(
            f"| {name} | {_mb(pr.get('squish', {}).get('p50'))} | {_mb(pr.get('mlx_lm', {}).get('p50'))} | "
            f"{'—' if ratio is None else f'{ratio:.3f}×'} | {fmt_p(pr.get('p'))} ({pr.get('verdict', '')}) | "
            f"{_mb(gr.get('squish', {}).get('p50'))} | {_mb(gr.get('mlx_lm', {}).get('p50'))} | "
            f"{_mb(e['kv_bytes']) if name != 'load' else '—'} | {_mb(mp.get('squish', {}).get('p50'))} | "
            f"{_mb(mp.get('mlx_lm', {}).get('p50'))} |")
    peak = max((e["peak_rss"]["squish"]["max"] for e in summary.values() if "peak_rss" in e), default=None)
    lines += ["", f"Squish's whole-process peak over every phase: {_mb(peak)} MB."]
    bound = meta.get("contract")
    if bound:
        verdict = "below" if peak is not None and peak < bound else "ABOVE"
        lines.append(f"The seed's contract for this model ({bound / 1e9:.1f} GB, stated for an Apple M3 16 GB): "
                     f"Squish's peak is {verdict} it here ({meta['backend']} backend, {meta['kv_dtype']} "
                     "activations).")
    return lines + [""]


def plan_for(a, backend: str) -> dict:
    d = GPU_DEFAULTS if backend != "cpu" else CPU_DEFAULTS
    prompt = a.prompt_tokens or d["prompt_tokens"]
    contexts = d["contexts"] if a.contexts is None else [int(x) for x in a.contexts.split(",") if x]
    streams = d["streams"] if a.streams is None else a.streams
    phases = [(f"request{prompt}", [prompt])]
    phases += [(f"ctx{c}", [c]) for c in contexts]
    if streams:
        phases.append((f"streams{streams}", [a.stream_tokens or d["stream_tokens"]] * streams))
    return {"phases": phases, "gen": a.gen or d["gen"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = ap.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", type=Path, action="append", help="artifact folder (repeatable)")
    what.add_argument("--shape", action="append", help="random-weight artifact of this shape, e.g. qwen2.5:1.5b "
                      "(repeatable; with --bits)")
    ap.add_argument("--bits", default="4", help="bit widths for --shape, comma-separated (default 4)")
    ap.add_argument("--pairs", type=int, default=2, help="server runs per system, interleaved (default 2)")
    ap.add_argument("--prompt-tokens", type=int, help="the one request's prompt (default 512; CPU 64)")
    ap.add_argument("--contexts", help="long-context prompts, comma-separated (default 4096,16384; CPU none)")
    ap.add_argument("--streams", type=int, help="concurrent streams (default 8; 0 skips)")
    ap.add_argument("--stream-tokens", type=int, help="each stream's prompt (default 64; CPU 8)")
    ap.add_argument("--gen", type=int, help="tokens generated per request (default 16; CPU 4)")
    ap.add_argument("--timeout", type=float, default=7200.0, help="seconds per phase (default 7200)")
    ap.add_argument("--kv-bits", type=int, help="both servers keep the KV cache quantized to these bits "
                    "(Squish --kv-bits; mlx_lm.server --kv-bits --quantized-kv-start 0)")
    ap.add_argument("--name", default="serve_memory")
    a = ap.parse_args(argv)

    mach = machine()
    backend = mach["backend"]
    models: list[tuple[Path, str | None, int | None]] = []
    if a.shape:
        from benchmarks.random_artifact import build
        from squish.hardware import default_build_dtype

        for shape in a.shape:
            for bits in (int(b) for b in a.bits.split(",")):
                models.append((build(shape, bits, default_build_dtype()), shape, bits))
    else:
        for m in a.model:
            manifest = json.loads((m / "squish.json").read_text()) if (m / "squish.json").exists() else {}
            src = manifest.get("source", {})
            models.append((m, src.get("catalog") or src.get("shape"), manifest.get("quantization", {}).get("bits")))
    plan = plan_for(a, backend)
    out = result_dir(a.name)
    notes = []
    if backend == "cpu":
        notes.append("MLX CPU backend: prompts are scaled down from the issue's 512 / 4k / 16k tokens "
                     f"(see the phase names); activations and KV are float32 here, half precision on Metal/CUDA.")
    config = {"argv": sys.argv[1:] if argv is None else argv, "plan": plan, "pairs": a.pairs,
              "commands": {SQUISH: SQUISH_CMD, MLX_LM: MLX_LM_CMD}, "kv_bits": a.kv_bits,
              "models": [str(m) for m, _, _ in models],
              "machine": mach, "notes": notes}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    results, md = {}, [f"# Server memory, `squish serve` vs `mlx_lm.server` ({out.name})", "",
                       f"Machine: {mach.get('chip')}, {backend} backend, load average at start "
                       f"{mach.get('loadavg')}. Command: `{' '.join(['python -m benchmarks.serve_memory', *config['argv']])}`.",
                       "", *[f"- {n}" for n in notes], "",
                       "Peak RSS is the whole process (kernel VmHWM, reset before each phase); growth is the "
                       "phase's peak minus the RSS it started from; the KV column is what the phase's tokens "
                       "need in the KV cache. MB = 10^6 bytes.", ""]
    for path, shape, bits in models:
        tokens = prompts.Tokens(path)
        runs: dict[str, list] = {SQUISH: [], MLX_LM: []}
        counter = [0]
        for i in range(a.pairs):
            for system in ((SQUISH, MLX_LM) if i % 2 == 0 else (MLX_LM, SQUISH)):
                print(f"[serve_memory {time.strftime('%H:%M:%S')}] {path.name}: {system} run {i + 1}/{a.pairs}",
                      file=sys.stderr, flush=True)
                runs[system].append(one_server(system, path, out, f"{path.name}_{i}", plan, tokens, counter,
                                               a.timeout, a.kv_bits))
        kv = kv_bytes_per_token(path, a.kv_bits)
        manifest = json.loads((path / "squish.json").read_text()) if (path / "squish.json").exists() else {}
        meta = {"weights_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")), "kv_per_token": kv,
                "kv_dtype": (f"{a.kv_bits}-bit, groups of {KV_GROUP}" if a.kv_bits else
                             manifest.get("quantization", {}).get("dtype") or "half"), "pairs": a.pairs,
                "backend": backend, "contract": CONTRACT.get((shape, bits))}
        summary = summarize_runs(runs, kv)
        label = f"{shape or path.name} INT{bits}" + (" (random weights)" if manifest.get("source", {}).get(
            "kind") == "random" else "")
        results[str(path)] = {"label": label, "shape": shape, "bits": bits, "meta": meta, "raw": runs,
                              "summary": summary}
        md += report(label, summary, meta)
        (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (out / "report.md").write_text("\n".join(md) + "\n")
    mach["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    md.insert(4, f"Load average at the end: {mach['loadavg_end']}.")
    (out / "report.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
