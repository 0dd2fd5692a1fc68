"""One model served across several machines: rank 0 decides, every rank computes.

The ranks are processes started by MLX's launcher (``mlx.launch``; ``squish.cli.cluster``
builds its command line) and connected by MLX's own distributed backend (``ring`` over
TCP, ``jaccl`` over Thunderbolt RDMA). How they start and talk is ``squish.runtime.ranks``;
the model is split with mlx_lm's own methods (``squish.runtime.sharding``); every byte
between the ranks goes through MLX's collectives, and nothing here implements a transport.

Rank 0 runs the whole server (HTTP, every protocol, the serving core, limits, the
scheduler) on a ``LeaderEngine``: the ordinary engine whose ``BatchGenerator`` is
wrapped in ``LeaderGen``. Every call that changes the batch (``insert``, ``remove``)
and every prefix-cache store is written to a journal; before each ``next()`` (the only
call that computes, and the only one with collectives in it) the journal is broadcast,
and every other rank (``Follower``) applies the same calls in the same order to its own
``BatchGenerator`` and prefix cache (bounded so that every rank evicts alike:
``pipeline_prefix``), then runs the same ``next()`` on its shard. So
every rank holds the same batch, in the same order, with the same uids, the same
prefix-cache hits (a follower's lookup must return rank 0's reuse length, or it stops:
``Diverged``) and the same caches; the model's own collectives then line up.

Only rank 0 samples. Logits processors (penalties, logit bias, grammar constraints)
and samplers (temperature, top-p, seeds) run on rank 0 alone; each sampled token
reaches the other ranks inside the step's graph as an ``all_sum`` (rank 0 adds the
token, the others add zero), chained row after row with ``mx.depends`` so that every
rank issues the same collectives in the same order whatever its local graph looks
like. Requests, cancellations and timeouts are decided by rank 0's engine; the other
ranks see them only as journal entries.

Failure (measured facts and the health channel: ``squish.runtime.liveness``): a rank
that dies or stops answering is named by the health channel within ``TIMEOUT_S``
(at once when its process is gone); ``LeaderEngine.fail`` then ends every request in
flight with an ``unavailable`` error (503) from the health channel's thread, even
while the engine thread is stuck in a collective that will never return, and
``/health`` reports 503 with the rank. A collective that raises on rank 0 is a
failure too: after it the ranks can no longer be in step. Workers exit when they lose
rank 0. The CLI (``squish.cli.cluster``) then ends the processes.

Shared structures besides the engine's own (engine.py):
``LeaderEngine._live`` (dict, under ``Engine._lock``)
    Requests submitted and not yet ended, so that ``fail`` (on a health-channel
    thread) can end them while the engine thread is blocked. The engine thread's
    ``_emit_final`` removes a request; one ``fail`` already ended is not sent twice.
``LeaderEngine.cluster_error`` / ``cluster_failed``
    Set once, under ``_lock``, by whichever thread sees the failure first.
Everything else here (``Comm``, the journal, ``Follower``) belongs to the one thread
that drives MLX on its rank: the engine thread on rank 0, the main thread elsewhere.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Callable

from squish.errors import SquishError, SystemFailure
from squish.runtime.engine import Engine, Error
from squish.runtime.liveness import Beacon, Monitor
from squish.runtime.ranks import ClusterSpec, Comm, agree, init_group, load_rank, pipeline_prefix

log = logging.getLogger("squish.cluster")

STARTUP_S = 120.0  # rank 0 waits this long for every worker to join the health channel
STOP_S = 10.0  # at an orderly stop, rank 0 waits this long for the other ranks to exit
NAME_FAILURE_S = 2.0  # after a collective fails, wait this long for the health channel to name the rank


class ClusterFailure(RuntimeError):
    """A rank failed; the engine ends the step's requests with this kind (HTTP 503)."""

    kind = "unavailable"


class Diverged(Exception):
    """A follower's state no longer matches rank 0's (a bug, never expected)."""


class LeaderGen:
    """Rank 0's ``BatchGenerator``, journaled: the other ranks replay every call."""

    def __init__(self, gen, comm: Comm, failed: Callable[[Exception], Exception]):
        self._gen, self._comm, self._failed = gen, comm, failed
        self._ops: list = []
        self.stream = gen.stream

    def insert(self, prompts, *, max_tokens, caches, all_tokens, samplers, logits_processors):
        uids = self._gen.insert(prompts, max_tokens=max_tokens, caches=caches, all_tokens=all_tokens,
                                samplers=[self._comm.leader_sampler(s) for s in samplers],
                                logits_processors=logits_processors)
        for uid, tail, head, n in zip(uids, prompts, all_tokens, max_tokens):
            self._ops.append(["i", uid, list(head) + list(tail), len(head), n])
        return uids

    def remove(self, uids, return_prompt_caches=False):
        self._ops.append(["r", list(uids)])
        return self._gen.remove(uids, return_prompt_caches=return_prompt_caches)

    def journal(self, op: list) -> None:
        self._ops.append(op)

    def stats(self):
        return self._gen.stats()

    @property
    def prefill_batch_size(self) -> int:
        return self._gen.prefill_batch_size

    @prefill_batch_size.setter
    def prefill_batch_size(self, n: int) -> None:  # squish.runtime.pacing: the ranks follow suit
        self._ops.append(["p", "prefill_batch_size", n])
        self._gen.prefill_batch_size = n

    @property
    def prefill_step_size(self) -> int:
        return self._gen.prefill_step_size

    @prefill_step_size.setter
    def prefill_step_size(self, n: int) -> None:
        self._ops.append(["p", "prefill_step_size", n])
        self._gen.prefill_step_size = n

    def next(self):
        try:
            self._send("n")
            return self._gen.next()
        except Exception as exc:  # noqa: BLE001 - after this the ranks cannot be in step
            raise self._failed(exc) from exc

    def finish(self) -> None:
        """Tell the other ranks to stop (an orderly shutdown)."""
        self._send("x")

    def close(self) -> None:
        self._gen.close()

    def _send(self, last: str) -> None:
        ops, self._ops = self._ops + [[last]], []
        self._comm.broadcast(ops)


class LeaderEngine(Engine):
    """The engine of rank 0: forms the cluster while it loads, then runs the ordinary
    scheduler with its generator journaled (``LeaderGen``)."""

    def __init__(self, spec: ClusterSpec, model: str, resolve: Callable[[str], Path], **engine_kw):
        super().__init__(self._form, **engine_kw)
        self.spec, self._model, self._resolve = spec, model, resolve
        self.monitor: Monitor | None = None
        self.comm: Comm | None = None
        self.mode: str | None = None
        self.cluster_error: str | None = None
        self.cluster_failed = threading.Event()
        self._live: dict[int, object] = {}

    # ---- start-up (engine thread) ---------------------------------------------------------
    def _form(self):
        spec = self.spec
        try:
            self.monitor = Monitor(spec.leader, spec.health_port, spec.token, spec.hosts,
                                   on_failure=lambda rank, msg: self.fail(msg), on_beat=self._beat)
        except OSError as exc:
            raise SystemFailure(f"cannot open the health channel on {spec.leader}:{spec.health_port}: {exc}") from exc
        self.monitor.start()
        log.info("waiting for %d worker ranks to join", len(spec.hosts) - 1)
        missing = self.monitor.wait_for_workers(time.monotonic() + STARTUP_S)
        if self.cluster_error:
            raise SystemFailure(self.cluster_error)
        if missing:
            raise SystemFailure(f"{', '.join(spec.name(r) for r in missing)} did not join within {STARTUP_S:g} s: "
                                f"the process did not start there or cannot reach {spec.leader}:{spec.health_port} "
                                "(see its output above)")
        try:
            t0 = time.perf_counter()
            self.comm = Comm(init_group(spec, self.fail))
            log.info("MLX's %s backend connected %d ranks in %.1f s", spec.backend, len(spec.hosts),
                     time.perf_counter() - t0)
            t0 = time.perf_counter()
            path = agree(self.comm, spec, self._model, self._resolve)
            log.info("every rank holds the same artifact (checked in %.1f s)", time.perf_counter() - t0)
            t0 = time.perf_counter()
            info, self.mode = load_rank(self.comm, spec, path)
        except RuntimeError as exc:  # a collective failed: a rank is gone
            raise SystemFailure(str(self._collective_failed(exc))) from exc
        log.info("every rank holds its %s-parallel share of %s (loaded in %.1f s)", self.mode, info.name,
                 time.perf_counter() - t0)
        return info

    def _prepare_preamble(self, info) -> None:
        """None across ranks: every rank's prefix cache must hold the same entries (the
        followers replay rank 0's reuse), and a preamble cached on disk by a one-process
        server holds every head, not this rank's share."""

    def _setup(self) -> None:
        super()._setup()
        self.comm.stream = self._gen.stream
        try:
            per_layer = pipeline_prefix(self.comm, self.model_info.model, self.mode, self._prefix_bytes)
            if per_layer is not None:
                self._prefix.max_bytes = per_layer * len(self.model_info.model.layers)
            self.comm.broadcast({"prefix_bytes": self._prefix.max_bytes, "prefix_per_layer": per_layer,
                                 "max_batch": self.max_batch, "prefill_step": self._prefill_step,
                                 "stop": sorted(self._eos)})
        except RuntimeError as exc:
            raise SystemFailure(str(self._collective_failed(exc))) from exc
        self._gen = LeaderGen(self._gen, self.comm, self._collective_failed)

    # ---- any thread -----------------------------------------------------------------------
    def submit(self, req) -> None:
        with self._lock:
            self._live[id(req)] = req  # before the engine thread can end it
        try:
            super().submit(req)
        except Exception:
            with self._lock:
                self._live.pop(id(req), None)
            raise

    def fail(self, message: str) -> None:
        """A rank failed: /health says so, every request in flight ends with a 503 now."""
        with self._lock:
            if self.cluster_error is not None:
                return
            self.cluster_error = message
            live, self._live = list(self._live.values()), {}
        self.load_error = message
        self.ready.clear()
        self.failed.set()
        self.cluster_failed.set()
        for req in live:
            self.obs.finished("unavailable", len(req.prompt), 0, 0)
            self._put(req, Error("unavailable", f"{message}; the request was aborted"))

    def stop(self, timeout: float = 10.0) -> None:
        # After a failure the engine thread may be blocked in a collective for good.
        super().stop(1.0 if self.cluster_failed.is_set() else timeout)

    def health(self) -> dict:
        """What /health adds: the parallelism and every rank's state."""
        ranks = self.monitor.status() if self.monitor else [{"rank": 0, "host": self.spec.hosts[0], "up": True}]
        return {"parallel": self.mode, "ranks": ranks}

    def _beat(self, rank: int, beat: dict) -> None:
        if "active" in beat and hasattr(self.obs, "rank_memory"):
            self.obs.rank_memory(rank, beat["active"], beat["peak"], beat["cache"])

    # ---- engine thread --------------------------------------------------------------------
    def _emit_final(self, req, final, status: str) -> None:
        with self._lock:
            ended = self._live.pop(id(req), None) is None  # ``fail`` ended it already
            if ended:
                self._inflight -= 1
        if not ended:
            super()._emit_final(req, final, status)

    def _keep_prefix(self, uid: int, tokens: list[int], kv) -> None:
        self._gen.journal(["s", uid])
        super()._keep_prefix(uid, tokens, kv)

    def _report_memory(self) -> None:
        super()._report_memory()
        if hasattr(self.obs, "rank_memory"):
            import mlx.core as mx

            self.obs.rank_memory(0, mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory())

    def _collective_failed(self, exc: Exception) -> Exception:
        deadline = time.monotonic() + NAME_FAILURE_S
        while self.cluster_error is None and time.monotonic() < deadline:
            time.sleep(0.05)  # a dead peer's health connection closes at once: let it be named
        self.fail(self.cluster_error or f"a step failed on rank 0 ({type(exc).__name__}: {exc}); "
                  "the ranks can no longer stay in step")
        return ClusterFailure(self.cluster_error)

    def _shutdown(self) -> None:
        super()._shutdown()
        if self.cluster_error is None and isinstance(getattr(self, "_gen", None), LeaderGen):
            self.monitor.stopping()
            try:
                self._gen.finish()
            except Exception as exc:  # noqa: BLE001 - stopping anyway
                log.warning("could not tell the other ranks to stop: %s", exc)
            if not self.monitor.wait_closed(STOP_S):  # rank 0 ends last: workers expect it
                log.warning("a rank did not stop within %g s", STOP_S)


class Follower:
    """A worker rank's engine: replays rank 0's journal on its own generator and cache."""

    def __init__(self, model, comm: Comm, cfg: dict, state: dict):
        from mlx_lm.generate import BatchGenerator

        from squish.runtime.prompt_cache import PrefixCache

        self.comm, self.state = comm, state
        self.gen = BatchGenerator(model, stop_tokens=[[t] for t in cfg["stop"]],
                                  completion_batch_size=cfg["max_batch"], prefill_batch_size=cfg["max_batch"],
                                  prefill_step_size=cfg["prefill_step"])
        comm.stream = self.gen.stream
        per_layer = cfg["prefix_per_layer"]
        self.prefix = PrefixCache(cfg["prefix_bytes"] if per_layer is None else per_layer * len(model.layers))
        self._ended: dict = {}  # uid -> (kv, tokens): ended since the last step, for "s"
        self._live: set[int] = set()

    def run(self) -> None:
        """Until rank 0 says stop."""
        while True:
            for op in self.comm.broadcast():
                if op[0] == "x":
                    return
                self._apply(op)

    def _apply(self, op: list) -> None:
        kind = op[0]
        if kind == "i":
            _, uid, prompt, cached, max_tokens = op
            cache, got = self.prefix.lookup(prompt)
            if got != cached:
                raise Diverged(f"prefix cache reuse {got} tokens, rank 0 reused {cached}")
            mine = self.gen.insert([prompt[cached:]], max_tokens=[max_tokens], caches=[cache],
                                   all_tokens=[prompt[:cached]], samplers=[self.comm.follower_sampler()],
                                   logits_processors=[[]])[0]
            if mine != uid:
                raise Diverged(f"uid {mine}, rank 0 has {uid}")
            self._live.add(uid)
        elif kind == "r":
            self._ended.update(self.gen.remove(op[1], return_prompt_caches=True))
            self._live.difference_update(op[1])
        elif kind == "s":
            kv, tokens = self._ended.pop(op[1])
            self.prefix.store(list(tokens), kv)
        elif kind == "n":
            self._step()
        elif kind == "p" and op[1] in ("prefill_batch_size", "prefill_step_size"):
            setattr(self.gen, op[1], op[2])
        else:
            raise Diverged(f"unknown journal entry {kind!r}")

    def _step(self) -> None:
        import mlx.core as mx

        self._ended.clear()
        _, responses = self.gen.next()
        for r in responses:
            if r.finish_reason is not None:
                self._ended[r.uid] = (r.prompt_cache, r.all_tokens)
                self._live.discard(r.uid)
        if not self._live:
            mx.clear_cache()  # as rank 0 does when its batch drains
        self.state.update(active=mx.get_active_memory(), peak=mx.get_peak_memory(), cache=mx.get_cache_memory())


def run_worker(spec: ClusterSpec, rank: int, model: str, resolve: Callable[[str], Path],
               on_lost: Callable[[str], None]) -> None:
    """A worker rank, from joining to rank 0's stop. Raises SquishError on a start-up failure."""
    import mlx.core as mx

    state: dict = {"phase": "starting"}
    beacon = Beacon(spec.leader, spec.health_port, spec.token, rank, stats=lambda: dict(state), on_lost=on_lost)
    try:
        beacon.connect(time.monotonic() + STARTUP_S)
    except OSError as exc:
        raise SystemFailure(str(exc)) from exc
    beacon.start()
    try:
        comm = Comm(init_group(spec, on_lost))
        path = agree(comm, spec, model, resolve)
        state["phase"] = "loading"
        info, mode = load_rank(comm, spec, path)
        pipeline_prefix(comm, info.model, mode, 0)  # rank 0 decides; this rank reports its layers
        cfg = comm.broadcast()
        follower = Follower(info.model, comm, cfg, state)
        state.update(phase="ready", active=mx.get_active_memory(), peak=mx.get_peak_memory(),
                     cache=mx.get_cache_memory())
        log.info("%s ready (%s parallel)", spec.name(rank), mode)
        follower.run()
    except (SquishError, Diverged):
        raise  # a refusal every rank reports alike, or a bug (keep its traceback)
    except Exception as exc:  # noqa: BLE001 - a collective failed or returned nothing: a rank is gone
        raise SystemFailure(f"lost the other ranks ({type(exc).__name__}: {exc})") from exc
    beacon.quiet()
