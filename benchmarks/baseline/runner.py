"""Runs every experiment for one model, both systems interleaved, and returns raw samples.

Order of experiments (cheapest first, servers last so the in-process numbers
are not taken while two servers sit in memory):
start-up (dry-run RSS) → load (in-process) → mlx_lm stream_generate floor →
cold start → warm servers: warm-ups, short and long latency, memory, prefix
cache, concurrency.

Each pair of samples is taken back to back, alternating which system goes
first (A B, B A, A B ...), so drift on a shared machine hits both. An
experiment that fails records its error and the run goes on.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from benchmarks.baseline import inproc, prompts
from benchmarks.baseline.streaming import StreamResult, chat_body, concurrent_streams, stream_chat
from benchmarks.baseline.systems import MLX_LM, SQUISH, Server, SystemSpec, peak_child_rss, tree_rss

MLX_PEAK_METRIC = "squish_mlx_peak_memory_bytes"
# Per model, in this order; ``--experiments`` picks a subset (the servers one holds the HTTP
# latency, memory, prefix and concurrency measurements).
EXPERIMENTS = ("startup", "load", "inproc", "cold_start", "servers")


@dataclass(frozen=True)
class Profile:
    name: str
    pairs: int             # measured requests per system, short prompt
    long_pairs: int        # measured requests per system, long prompt
    warmups: int           # discarded requests per system before measuring (>= 5)
    warmup_tokens: int
    warmup_long: bool      # the last warm-up has the long prompt's shape
    max_tokens: int
    long_tokens_gpu: int
    long_tokens_cpu: int   # the CPU backend is ~100x slower: the long prompt is scaled down there
    import_runs: int
    load_runs: int
    inproc_runs: int       # mlx_lm stream_generate floor; 0 skips it
    cold_runs: int
    prefix_runs: int
    concurrency: tuple[int, ...]
    concurrency_reps: int
    # The level a contract checks (portable.concurrency4) gets at least this many reps:
    # fewer than 6 pairs can never reach p < 0.05, so the contract could never fail.
    contract_level: int = 4
    contract_level_reps: int = 6
    server_timeout_s: float = 300.0

    def long_tokens(self, backend: str) -> int:
        return self.long_tokens_cpu if backend == "cpu" else self.long_tokens_gpu


# quick: a smoke run sized for a shared 2-core CPU (< 5 min when the machine is not
# oversubscribed); 6 pairs is the least that can reach p < 0.05 (see stats.py).
PROFILES = {
    "quick": Profile("quick", pairs=6, long_pairs=2, warmups=5, warmup_tokens=1, warmup_long=False,
                     max_tokens=8, long_tokens_gpu=1024, long_tokens_cpu=64, import_runs=3, load_runs=2,
                     inproc_runs=0, cold_runs=1, prefix_runs=1, concurrency=(1, 4), concurrency_reps=1,
                     contract_level_reps=1),
    "standard": Profile("standard", pairs=12, long_pairs=12, warmups=5, warmup_tokens=8, warmup_long=True,
                        max_tokens=48, long_tokens_gpu=1024, long_tokens_cpu=256, import_runs=10, load_runs=5,
                        inproc_runs=6, cold_runs=8, prefix_runs=6, concurrency=(1, 2, 4, 8), concurrency_reps=2),
    "full": Profile("full", pairs=30, long_pairs=30, warmups=8, warmup_tokens=16, warmup_long=True,
                    max_tokens=128, long_tokens_gpu=1024, long_tokens_cpu=512, import_runs=20, load_runs=10,
                    inproc_runs=12, cold_runs=8, prefix_runs=12, concurrency=(1, 2, 4, 8), concurrency_reps=3),
}


def log(msg: str) -> None:
    print(f"[baseline {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def order(i: int, systems: list[str]) -> list[str]:
    """Pair ``i``'s order: as given for even ``i``, reversed for odd ``i``."""
    return list(systems) if i % 2 == 0 else list(reversed(systems))


def import_times(runs: int) -> dict:
    """``import squish`` vs ``import mlx_lm``, fresh interpreters, interleaved."""
    out = {SQUISH: [], MLX_LM: []}
    for i in range(runs):
        for s in order(i, [SQUISH, MLX_LM]):
            out[s].append(inproc.import_time("squish" if s == SQUISH else "mlx_lm"))
    return out


class ModelRun:
    """All experiments for one artifact folder."""

    def __init__(self, model: Path, specs: dict[str, SystemSpec], systems: list[str], profile: Profile,
                 backend: str, out_dir: Path, seed: int = 0):
        self.model, self.specs, self.systems = model, specs, systems
        self.p, self.backend, self.out, self.seed = profile, backend, out_dir, seed
        self.tokens = prompts.Tokens(model)
        self.raw: dict = {"errors": {}}
        self._tag = 0
        self.long_context = prompts.prose(profile.long_tokens(backend), self.tokens, seed)

    # -- helpers ------------------------------------------------------------------------
    def tag(self) -> str:
        self._tag += 1
        return f"run {self._tag}"

    def _guard(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        log(f"{self.model.name}: {name} ...")
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - one failed experiment must not lose the rest
            self.raw["errors"][name] = f"{type(e).__name__}: {e}"
            log(f"{self.model.name}: {name} FAILED: {e}")
            (self.out / f"error_{name}.txt").write_text(traceback.format_exc())
        log(f"{self.model.name}: {name} done in {time.perf_counter() - t0:.1f} s")

    def run(self, experiments: tuple[str, ...] = EXPERIMENTS) -> dict:
        steps = {"startup": self.startup, "load": self.load, "inproc": self.inproc_floor,
                 "cold_start": self.cold_start, "servers": self.servers}
        skipped = [e for e in EXPERIMENTS if e not in experiments]
        if skipped:
            self.raw["skipped"] = skipped
        for name in EXPERIMENTS:
            if name in experiments and (name != "inproc" or self.p.inproc_runs):
                self._guard(name, steps[name])
        return self.raw

    # -- start-up -----------------------------------------------------------------------
    def startup(self) -> None:
        res = {s: [] for s in self.systems}
        for i in range(max(2, self.p.cold_runs)):  # cheap: no model load
            for s in order(i, self.systems):
                spec = self.specs[s]
                if spec.dry_run_cmd is None:
                    continue
                r = peak_child_rss(spec.argv(spec.dry_run_cmd, self.model))
                if r["rc"] != 0:
                    raise RuntimeError(f"{s} dry run exited {r['rc']}: {r['stderr'][-500:]}")
                res[s].append({"peak_rss_bytes": r["peak_rss_bytes"], "seconds": r["seconds"],
                               "stdout": r["stdout"][-1000:]})
        self.raw["dry_run"] = res

    def load(self) -> None:
        res = {SQUISH: [], MLX_LM: []}
        for i in range(self.p.load_runs):
            for s in order(i, [SQUISH, MLX_LM]):
                res[s].append(inproc.load(self.model, s))
        self.raw["load"] = res

    def inproc_floor(self) -> None:
        n = self.p.inproc_runs
        short = [prompts.tagged(self.tag(), prompts.SHORT) for _ in range(n)]
        long = [prompts.long_prompt(self.tag(), self.long_context) for _ in range(n)]
        warm = [prompts.tagged(self.tag(), prompts.SHORT) for _ in range(self.p.warmups)]
        self.raw["inproc_mlx_lm"] = inproc.mlx_lm_generate(self.model, short, long, warm,
                                                           self.p.warmup_tokens, self.p.max_tokens)

    # -- cold start ---------------------------------------------------------------------
    def cold_start(self) -> None:
        res = {s: [] for s in self.systems}
        for s in self.systems:  # unmeasured: the page cache, bytecode and MLX's kernel cache warm for both
            self._one_cold(s, -1)
        for i in range(self.p.cold_runs):
            for s in order(i, self.systems):
                res[s].append(self._one_cold(s, i))
        self.raw["cold_start"] = res

    def _one_cold(self, system: str, i: int) -> dict:
        name = f"server_{system}_cold{i}.log" if i >= 0 else f"server_{system}_cold_warmup.log"
        server = Server(self.specs[system], self.model, self.out / name).start()
        try:
            server.wait_ready(self.p.server_timeout_s)
            ready = time.perf_counter() - server.started_at
            # The second request has the first one's shape (same token count) and shares no
            # token of its text: what the two share is the chat template's own preamble, which
            # a server may prepare at start. A first request slower than the second pays for
            # work left to it.
            bodies = [chat_body(server.model_field, text, 4)
                      for text in prompts.disjoint_pair(self.tokens, prompts.SHORT, i)]
            with httpx.Client(timeout=self.p.server_timeout_s) as c:
                first, second = (stream_chat(c, server.base_url, b, self.tokens.count) for b in bodies)
            if first.ttft is None or second.ttft is None:
                raise RuntimeError(f"{system}: a cold-start request streamed no content")
            return {"ready_s": ready, "first_token_s": first.t_send + first.ttft - server.started_at,
                    "first_ttft_s": first.ttft, "second_ttft_s": second.ttft}
        finally:
            server.stop()

    # -- warm servers -------------------------------------------------------------------
    def servers(self) -> None:
        running: dict[str, Server] = {}
        try:
            for s in self.systems:
                running[s] = Server(self.specs[s], self.model, self.out / f"server_{s}.log").start()
                running[s].start_sampling()  # from launch: the whole-process peak includes the load
            for s, srv in list(running.items()):
                try:
                    srv.wait_ready(self.p.server_timeout_s)
                except (RuntimeError, TimeoutError) as e:  # measure the other system anyway
                    self.raw["errors"][f"server_{s}"] = str(e)
                    log(f"{self.model.name}: {s} server did not start: {e}")
                    running.pop(s).stop()
                    continue
            if not running:
                raise RuntimeError("no server started; see server_*.log")
            self.raw["server_commands"] = {s: srv.spec.argv(srv.spec.serve_cmd, self.model, srv.port)
                                           for s, srv in running.items()}
            with httpx.Client(timeout=self.p.server_timeout_s) as client:
                self._warmups(running, client)
                for kind in ("short", "long"):
                    self._guard(f"http_{kind}", lambda k=kind: self._latency(running, client, k))
                self._guard("memory_steady", lambda: self._steady(running, client))
                self._guard("prefix", lambda: self._prefix(running, client))
            self._guard("concurrency", lambda: self._concurrency(running))
        finally:
            for srv in running.values():
                srv.stop()

    def _request(self, srv: Server, client: httpx.Client, text: str, max_tokens: int) -> dict:
        srv.sampler.mark()
        r = stream_chat(client, srv.base_url, chat_body(srv.model_field, text, max_tokens),
                        self.tokens.count)
        return {**_result_dict(r), "server_peak_rss": srv.sampler.window_peak()}

    def _warmups(self, running: dict[str, Server], client: httpx.Client) -> None:
        for i in range(self.p.warmups):
            for s in order(i, list(running)):
                last = self.p.warmup_long and i == self.p.warmups - 1
                text = (prompts.long_prompt(self.tag(), self.long_context) if last
                        else prompts.tagged(self.tag(), prompts.WARMUP))
                self._request(running[s], client, text, self.p.warmup_tokens)

    def _latency(self, running: dict[str, Server], client: httpx.Client, kind: str) -> None:
        res = {s: [] for s in running}
        for i in range(self.p.pairs if kind == "short" else self.p.long_pairs):
            for s in order(i, list(running)):
                text = (prompts.tagged(self.tag(), prompts.SHORT) if kind == "short"
                        else prompts.long_prompt(self.tag(), self.long_context))
                res[s].append(self._request(running[s], client, text, self.p.max_tokens))
        self.raw.setdefault("http", {})[kind] = res

    def _steady(self, running: dict[str, Server], client: httpx.Client) -> None:
        time.sleep(2.0)
        res = {s: {"rss": [], "overall_peak_rss": srv.sampler.overall_peak} for s, srv in running.items()}
        for _ in range(5):
            for s, srv in running.items():
                res[s]["rss"].append(tree_rss(srv.sampler.proc))
            time.sleep(0.2)
        for s, srv in running.items():
            res[s]["mlx_peak_bytes"] = _scrape_metric(client, srv.base_url, MLX_PEAK_METRIC)
            res[s]["process_peak"] = srv.process_peak()
        self.raw["memory"] = res

    def _prefix(self, running: dict[str, Server], client: httpx.Client) -> None:
        res = {s: [] for s in running}
        for i in range(self.p.prefix_runs):
            context = prompts.prose(self.p.long_tokens(self.backend), self.tokens, self.seed + 1000 + i)
            for s in order(i, list(running)):
                tag = self.tag()
                cold, warm = (prompts.tagged(tag, f"{context}\n\n{q}") for q in prompts.PREFIX_QUESTIONS)
                a = self._request(running[s], client, cold, self.p.warmup_tokens)
                b = self._request(running[s], client, warm, self.p.warmup_tokens)
                res[s].append({"cold_ttft": a["ttft"], "warm_ttft": b["ttft"],
                               "cold_prompt_tokens": a["prompt_tokens"], "warm_prompt_tokens": b["prompt_tokens"]})
        self.raw["prefix"] = res

    def _concurrency(self, running: dict[str, Server]) -> None:
        res: dict = {}
        for level in self.p.concurrency:
            res[str(level)] = {s: [] for s in running}
            reps = self.p.concurrency_reps
            if level == self.p.contract_level:
                reps = max(reps, self.p.contract_level_reps)
            for rep in range(reps):
                for s in order(rep, list(running)):
                    srv = running[s]
                    bodies = [chat_body(srv.model_field, prompts.tagged(self.tag(), prompts.SHORT),
                                        self.p.max_tokens) for _ in range(level)]
                    srv.sampler.mark()
                    results, wall = concurrent_streams(srv.base_url, bodies, self.tokens.count,
                                                       timeout=self.p.server_timeout_s * 2)
                    tokens = sum(r.completion_tokens for r in results)
                    res[str(level)][s].append({
                        "wall_s": wall, "tokens": tokens, "aggregate_tok_s": tokens / wall if wall else None,
                        "per_stream_decode_tok_s": [r.decode_tok_s for r in results],
                        "per_stream_tok_s": [r.completion_tokens / r.total for r in results],
                        "ttft": [r.ttft for r in results], "server_peak_rss": srv.sampler.window_peak()})
        self.raw["concurrency"] = res


def _result_dict(r: StreamResult) -> dict:
    d = asdict(r)
    d.pop("text")
    d["itl"], d["decode_tok_s"] = r.itl, r.decode_tok_s
    gaps = sorted(r.chunk_gaps)
    d["chunk_gaps"] = None
    d["max_chunk_gap"] = gaps[-1] if gaps else None
    return d


def _scrape_metric(client: httpx.Client, base_url: str, name: str) -> float | None:
    """A gauge from the server's Prometheus ``/metrics``, or None if it has none."""
    try:
        r = client.get(base_url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    for line in r.text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            try:
                return float(line.split()[-1])
            except ValueError:
                return None
    return None
