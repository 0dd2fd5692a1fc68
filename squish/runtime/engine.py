"""The inference engine: one thread owns every MLX object.

HTTP handlers never call MLX. They tokenize (pure Python / Rust, no MLX), build
a ``Request`` and call ``Engine.submit``; the engine thread runs continuous
batching with mlx_lm's ``BatchGenerator`` and pushes events into the request's
asyncio queue.

Shared structures and how each is synchronised
----------------------------------------------
``Engine._inbox`` (``queue.Queue``)
    Commands ``("submit", Request)``, ``("cancel", rid)``, ``("stop", None)``.
    Written by any thread, read only by the engine thread. The queue is the
    only way work reaches the engine.
``Engine._inflight`` (int) and ``Engine._queued`` (rid -> Request) under ``Engine._lock``
    Requests submitted and not yet finished; ``submit`` refuses with
    ``QueueFull`` once it reaches ``max_batch + max_queue`` (bounded memory).
    Incremented by ``submit`` (handler threads), decremented when a request's
    final event is emitted. ``_queued`` holds the submitted requests not yet
    admitted to the batch: whoever pops a request from it owns its ending, the
    engine thread when it admits (or expires) it, ``cancel`` (any thread) when
    the client left first, so a queued request ends at once instead of after
    the step the engine is in (``squish.runtime.pacing`` on why steps can be long).
``Request.events`` (``asyncio.Queue``)
    Belongs to the event loop that submitted the request. The engine thread
    only ever adds to it through ``loop.call_soon_threadsafe``; the handler
    reads it on its loop. The last event of a request is always a
    ``Finish`` or an ``Error``.
``Engine.ready`` / ``Engine.failed`` (``threading.Event``), ``load_error``,
``model_info``
    Written once by the engine thread after loading (before setting the
    event), read by handlers after checking the event.
``Request.constraint`` (``squish.tools.constraints.Constraint`` or None)
    Compiled on a handler thread before ``submit`` and read-only afterwards;
    the engine thread calls ``processor(prompt_len)`` once at admission, which
    deep-copies the compiled matcher, so the processor (and its matcher state)
    belongs to the engine thread alone.
The tokenizer (``model_info.tokenizer``) is shared read-only: handler threads
use it to encode prompts, the engine thread to decode. HF fast tokenizers are
safe for concurrent encode/decode.
Everything else (model, ``BatchGenerator``, KV caches, ``PrefixCache``, the
waiting deque, the active table, text streams) is touched only by the engine
thread and needs no lock. The ``observer`` (metrics) must be thread-safe;
prometheus_client's metrics are.
"""

from __future__ import annotations

import asyncio
import logging
import math
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from squish.errors import SquishError
from squish.hardware import release_free_heap
from squish.runtime.detokenizer import TextStream, detect_loop
from squish.runtime.pacing import PrefillPacer
from squish.runtime.sampling import SamplingParams, TokenLogprob, token_logprobs

log = logging.getLogger("squish.engine")

LOOP_CHECK_EVERY = 8


class QueueFull(Exception):
    """The bounded request queue is full (HTTP 503)."""


class NotReady(Exception):
    """The model is still loading or failed to load (HTTP 503)."""


@dataclass
class Delta:
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)
    tokens: int = 1  # generated tokens this text came from


@dataclass
class Finish:
    reason: str  # "stop" | "length" | "cancelled" (the client-visible finish_reason)
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    # Why generation was cut short, beyond ``reason``: "repetition" (a loop was
    # detected; ``reason`` stays "length", as the token budget was not worth
    # spending) or "grammar" (the constraint's matcher failed and forced EOS).
    problem: str | None = None
    constraint_error: str | None = None
    closed_early: str | None = None  # the constraint closed a value early: "repetition" / "length"
    reasoning_closed: bool = False  # the processor closed a reasoning section at its budget
    stop_sequence: str | None = None  # the stop string that ended generation (reason "stop")


@dataclass
class Error:
    kind: str  # "timeout" | "queue_timeout" | "numerical" | "internal" | "unavailable" (a rank failed)
    message: str


@dataclass
class Request:
    rid: str
    prompt: list[int]
    params: SamplingParams
    timeout: float
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    submitted: float = field(default_factory=time.monotonic)
    # A ``squish.tools.constraints.Constraint`` (or None): its per-request
    # ``processor(prompt_len)`` runs last among the logits processors.
    constraint: Any = None

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout


class NullObserver:
    """Receives engine measurements; the API's metrics module implements it."""

    def first_token(self, seconds: float) -> None: ...
    def token_gap(self, seconds: float) -> None: ...
    def finished(self, status: str, prompt: int, completion: int, cached: int) -> None: ...
    def step(self, batch: int, waiting: int, cache_bytes: int) -> None: ...
    def memory(self, active: int, peak: int, cache: int) -> None: ...


@dataclass
class _Active:
    req: Request
    uid: int
    stream: TextStream
    cached: int
    generated: list[int] = field(default_factory=list)
    first_at: float | None = None
    last_at: float | None = None
    processor: Any = None  # the constraint's processor, to read its ``error``
    problem: str | None = None
    unsent: int = 0  # tokens whose text is still held back (no Delta sent for them yet)


class Engine:
    def __init__(
        self,
        load: Callable[[], Any],
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        queue_timeout: float = 60.0,
        prefix_cache_bytes: int | None = None,
        prefill_step: int = 512,
        kv_bits: int | None = None,
        observer: Any = None,
    ):
        self._load = load
        self.kv_bits = kv_bits  # None: mlx_lm's own KV cache; else quantized (runtime.kv_cache; serve offers 8)
        self._kv_quant: tuple[int, int] | None = None  # (bits, group size) once the model is checked
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._prefix_bytes = prefix_cache_bytes
        self._prefill_step = prefill_step
        self._pacer = PrefillPacer(max_batch, prefill_step)
        self.obs = observer or NullObserver()
        self._inbox: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._inflight = 0
        self._queued: dict[str, Request] = {}
        self.ready = threading.Event()
        self.failed = threading.Event()
        self.load_error: str | None = None
        self.load_exit_code = 2  # 1 when the model itself is at fault (squish.errors.InputError)
        self.model_info: Any = None
        self._thread = threading.Thread(target=self._main, name="squish-engine", daemon=True)

    # ---- any thread ------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._inbox.put(("stop", None))
        self._thread.join(timeout)

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def submit(self, req: Request) -> None:
        if not self.ready.is_set():
            raise NotReady(self.load_error or "the model is still loading")
        with self._lock:
            if self._inflight >= self.max_batch + self.max_queue:
                raise QueueFull(
                    f"server busy: {self._inflight} requests in flight "
                    f"(limit {self.max_batch + self.max_queue}); retry shortly"
                )
            self._inflight += 1
            self._queued[req.rid] = req
        self._inbox.put(("submit", req))

    def cancel(self, rid: str) -> None:
        """A queued request ends here and now; an admitted one after the engine's current step."""
        with self._lock:
            req = self._queued.pop(rid, None)
        if req is None:
            self._inbox.put(("cancel", rid))
        else:
            self._emit_final(req, Finish("cancelled", len(req.prompt), 0, 0), "cancelled")

    def _claim(self, req: Request) -> bool:
        """Take over a queued request's ending; False if ``cancel`` ended it already."""
        with self._lock:
            return self._queued.pop(req.rid, None) is not None

    # ---- engine thread ---------------------------------------------------
    def _main(self) -> None:
        try:
            self.model_info = self._load()
            self._setup()
        except SquishError as exc:  # a bad artifact, a failed rank: the message says what is wrong
            log.error("model failed to load: %s", exc)
            self.load_error, self.load_exit_code = f"model failed to load: {exc}", exc.exit_code
            self.failed.set()
            return
        except Exception as exc:  # noqa: BLE001 - reported via /health and logs
            log.exception("model failed to load")
            self.load_error = f"model failed to load: {exc}"
            self.failed.set()
            return
        release_free_heap()  # loading left freed parse buffers behind (~34 MB on SmolLM2)
        self._report_memory()
        self.ready.set()
        load_s = getattr(self.model_info, "load_seconds", None)
        log.info("model %s ready (loaded in %s)", self.model_info.name,
                 f"{load_s:.2f} s" if load_s is not None else "an unknown time")
        try:
            self._loop()
        except Exception:  # noqa: BLE001 - never leave clients waiting forever
            log.exception("engine thread crashed; failing all requests")
            self.load_error = "the inference engine crashed; see the server log"
            self.ready.clear()
            self.failed.set()
            self._shutdown()
        finally:
            self._gen.close()

    def _setup(self) -> None:
        from mlx_lm.generate import BatchGenerator

        from squish.runtime.prompt_cache import PrefixCache, auto_bound

        info = self.model_info
        if self.kv_bits:
            from squish.runtime.kv_cache import check

            self._kv_quant = check(info.model, self.kv_bits)  # InputError: this model cannot use one
        self._eos = set(info.tokenizer.eos_token_ids)
        self._gen = BatchGenerator(
            info.model,
            stop_tokens=[[t] for t in sorted(self._eos)],
            completion_batch_size=self.max_batch,
            prefill_batch_size=self.max_batch,
            prefill_step_size=self._prefill_step,
        )
        if self._prefix_bytes is None:  # auto: scaled to the model
            self._prefix_bytes = auto_bound(info.model)
        log.info("prefix cache bound: %.0f MiB", self._prefix_bytes / 2**20)
        self._prefix = PrefixCache(self._prefix_bytes, self._kv_quant)
        self._prepare_preamble(info)
        self._waiting: deque[Request] = deque()
        self._active: dict[int, _Active] = {}
        self._by_rid: dict[str, int] = {}

    def _prepare_preamble(self, info) -> None:
        """The chat template's preamble into the prefix cache, so the first request is no slower."""
        from squish.runtime.preamble import prepare

        prepare(info, self._prefix)

    def _release_memory(self) -> None:
        """The batch just drained: drop MLX's buffer cache and hand freed heap back to
        the OS, so an idle server holds only the model and the prefix cache. The next
        request re-allocates its buffers (cheap next to a prefill)."""
        import mlx.core as mx

        mx.clear_cache()
        release_free_heap()
        self._report_memory()

    def _report_memory(self) -> None:
        import mlx.core as mx

        self.obs.memory(mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory())

    def _loop(self) -> None:
        busy = False
        while True:
            idle = not self._active and not self._waiting
            if idle and busy:
                self._release_memory()
            busy = not idle
            try:
                cmd = self._inbox.get(timeout=0.25) if idle else self._inbox.get_nowait()
            except queue.Empty:
                cmd = None
            while cmd is not None:
                if cmd[0] == "stop":
                    self._shutdown()
                    return
                self._command(cmd)
                try:
                    cmd = self._inbox.get_nowait()
                except queue.Empty:
                    cmd = None
            self._expire()
            self._admit()
            self.obs.step(len(self._active), len(self._waiting), self._prefix.nbytes)
            if self._active:
                self._step()
                self._report_memory()

    def _command(self, cmd) -> None:
        kind, arg = cmd
        if kind == "submit":
            self._waiting.append(arg)
        elif kind == "cancel":
            uid = self._by_rid.get(arg)  # None: it has ended already
            if uid is not None:
                self._end(self._active[uid], Finish("cancelled", 0, 0, 0), remove=True)

    def _expire(self) -> None:
        now = time.monotonic()
        for req in list(self._waiting):
            if now > req.deadline:
                final, status = Error("timeout", f"request timed out after {req.timeout:g}s"), "timeout"
            elif now - req.submitted > self.queue_timeout:
                final = Error("queue_timeout", f"waited {self.queue_timeout:g}s in the queue; server overloaded")
                status = "queue_timeout"
            else:
                continue
            self._waiting.remove(req)
            if self._claim(req):
                self._emit_final(req, final, status)
        for st in list(self._active.values()):
            if now > st.req.deadline:
                log.warning("request %s timed out after %gs", st.req.rid, st.req.timeout)
                self._end(st, Error("timeout", f"request timed out after {st.req.timeout:g}s"), remove=True)

    def _admit(self) -> None:
        from squish.runtime.sampling import build_processors, build_sampler

        while self._waiting and len(self._active) < self.max_batch:
            req = self._waiting.popleft()
            if not self._claim(req):
                continue  # cancelled while it waited
            cache, cached = self._prefix.lookup(req.prompt)
            if cache is None and self._kv_quant:
                from squish.runtime.kv_cache import new_cache

                cache = new_cache(self.model_info.model, self._kv_quant)
            p = req.params
            procs = build_processors(p, len(req.prompt))
            constrained = None
            if req.constraint is not None:
                constrained = req.constraint.processor(len(req.prompt), p.max_tokens)
                procs.append(constrained)  # last: the mask sees every other adjustment
            uid = self._gen.insert(
                [req.prompt[cached:]],
                max_tokens=[p.max_tokens],
                caches=[cache],
                all_tokens=[req.prompt[:cached]],
                samplers=[build_sampler(p, p.resolved_seed())],
                logits_processors=[procs],
            )[0]
            stream = TextStream(self.model_info.tokenizer, p.stop)
            self._active[uid] = _Active(req, uid, stream, cached, processor=constrained)
            self._by_rid[req.rid] = uid

    def _step(self) -> None:
        import mlx.core as mx

        try:
            responses = self._pacer.step(self._gen, alone=len(self._active) == 1 and not self._queued)
            if not responses:
                return
            chosen = mx.stack([r.logprobs[r.token] for r in responses]).tolist()
        except Exception as exc:  # noqa: BLE001 - keep serving other requests
            kind = getattr(exc, "kind", "internal")  # squish.runtime.distributed: "unavailable"
            if kind == "internal":
                log.exception("decode step failed; failing %d active requests", len(self._active))
            else:  # a known failure (a rank of a multi-machine server): its message says it all
                log.error("decode step failed: %s; failing %d active requests", exc, len(self._active))
            for st in list(self._active.values()):
                self._end(st, Error(kind, f"inference failed: {exc}"), remove=True)
            return
        now = time.monotonic()
        for r, lp in zip(responses, chosen):
            st = self._active.get(r.uid)
            if st is None:
                continue
            done = r.finish_reason is not None
            if not math.isfinite(lp):
                log.error("request %s: non-finite logits at token %d; aborted", st.req.rid, len(st.generated))
                self._end(st, Error("numerical", "the model produced NaN/Inf logits; request aborted"), remove=not done)
                continue
            if st.first_at is None:
                st.first_at = now
                self.obs.first_token(now - st.req.submitted)
            else:
                self.obs.token_gap(now - st.last_at)
            st.last_at = now
            if r.finish_reason == "stop" and r.token in self._eos:
                self._finish(st, "stop", st.stream.finish(), remove=False, cache=(r.prompt_cache, r.all_tokens))
                continue
            st.generated.append(r.token)
            text = st.stream.push(r.token)
            st.unsent += 1
            delta = Delta(text, token_logprobs(self.model_info.tokenizer, r, lp, st.req.params), st.unsent)
            if st.stream.stopped:
                self._finish(st, "stop", text, remove=not done, cache=(r.prompt_cache, r.all_tokens), delta=delta)
            elif done:
                text += st.stream.finish()
                delta.text = text
                self._finish(st, r.finish_reason, text, remove=False, cache=(r.prompt_cache, r.all_tokens), delta=delta)
            elif len(st.generated) % LOOP_CHECK_EVERY == 0 and detect_loop(st.generated):
                log.warning("request %s: repetition loop after %d tokens; stopped", st.req.rid, len(st.generated))
                st.problem = "repetition"
                text += st.stream.finish()
                delta.text = text
                self._finish(st, "length", text, remove=True, delta=delta)
            elif delta.text or delta.logprobs:
                self._put(st.req, delta)

    def _finish(self, st, reason, text, *, remove, cache=(None, None), delta=None) -> None:
        if delta is None:
            delta = Delta(text)
        if delta.text or delta.logprobs:
            self._put(st.req, delta)
        self._end(st, Finish(reason, 0, 0, 0), remove=remove, cache=cache)

    def _end(self, st: _Active, final, *, remove: bool, cache=(None, None)) -> None:
        self._active.pop(st.uid, None)
        self._by_rid.pop(st.req.rid, None)
        kv, tokens = cache
        if remove:
            got = self._gen.remove([st.uid], return_prompt_caches=True).get(st.uid)
            if got is not None:
                kv, tokens = got
        if kv is not None and tokens is not None and not isinstance(final, Error):
            self._keep_prefix(st.uid, list(tokens), kv)
        if isinstance(final, Finish):
            err = getattr(st.processor, "error", None)
            problem = st.problem or ("grammar" if err is not None else None)
            final = Finish(final.reason, len(st.req.prompt), len(st.generated), st.cached, problem, err,
                           getattr(st.processor, "closed_early", None),
                           bool(getattr(st.processor, "reasoning_closed", False)),
                           st.stream.stop_hit if final.reason == "stop" else None)
            status = problem or final.reason  # metrics outcome: "repetition" / "grammar" when set
        else:
            status = final.kind
        self._emit_final(st.req, final, status)

    def _keep_prefix(self, uid: int, tokens: list[int], kv) -> None:
        """Offer a finished sequence's KV cache to the prefix cache (a hook: the
        distributed leader also tells the other ranks to keep theirs)."""
        self._prefix.store(tokens, kv)

    def _emit_final(self, req: Request, final, status: str) -> None:
        if isinstance(final, Finish):
            self.obs.finished(status, final.prompt_tokens, final.completion_tokens, final.cached_tokens)
        else:
            self.obs.finished(status, len(req.prompt), 0, 0)
        with self._lock:
            self._inflight -= 1
        self._put(req, final)

    def _put(self, req: Request, event) -> None:
        if isinstance(event, Delta):
            st = self._active.get(self._by_rid.get(req.rid, -1))
            if st is not None:
                st.unsent = 0
        try:
            req.loop.call_soon_threadsafe(req.events.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass

    def _shutdown(self) -> None:
        for st in list(self._active.values()):
            self._end(st, Error("internal", "server shutting down"), remove=True)
        for req in list(self._waiting):
            if self._claim(req):
                self._emit_final(req, Error("internal", "server shutting down"), "internal")
        self._waiting.clear()
