"""Engine behaviour on a tiny random-weight model (lifecycle, not quality):
batching, seeds, cancel, timeout, NaN abort, bounded queue, prefix cache."""

from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.runtime import engine as eng  # noqa: E402
from squish.runtime.sampling import SamplingParams  # noqa: E402

POISON = 7  # prompts containing this token get NaN logits (see poisoned_loader)


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "tiny-4bit")


def poisoned_loader(path: Path):
    def load():
        import mlx.core as mx

        from squish.runtime.loader import load_artifact

        info = load_artifact(path)
        base = type(info.model)

        class Poisoned(base):
            def __call__(self, inputs, cache=None, **kw):
                out = super().__call__(inputs, cache=cache, **kw)
                # The model never samples POISON itself (a finite, very low logit), so
                # only a prompt that contains it is poisoned, however long a run lasts.
                never = mx.where(mx.arange(out.shape[-1]) == POISON, -1e9, 0.0).astype(out.dtype)
                out = out + never
                bad = mx.any(inputs == POISON, axis=1, keepdims=True)[..., None]
                return mx.where(bad, mx.array(float("nan"), out.dtype), out)

        info.model.__class__ = Poisoned
        return info

    return load


class Recorder(eng.NullObserver):
    def __init__(self):
        self.max_batch = 0
        self.lock = threading.Lock()

        self.memory_reports: list[tuple[int, int, int]] = []

    def step(self, batch, waiting, cache_bytes):
        with self.lock:
            self.max_batch = max(self.max_batch, batch)

    def memory(self, active, peak, cache):
        with self.lock:
            self.memory_reports.append((active, peak, cache))


@pytest.fixture(scope="module")
def engine(tiny_artifact):
    e = eng.Engine(poisoned_loader(tiny_artifact), max_batch=4, max_queue=2, observer=Recorder())
    e.start()
    assert e.ready.wait(120), e.load_error
    yield e
    e.stop()


async def generate(e, prompt, params, timeout=60.0, rid=None, cancel_after=None):
    q: asyncio.Queue = asyncio.Queue()
    rid = rid or f"r{id(q)}"
    e.submit(eng.Request(rid, list(prompt), params, timeout, asyncio.get_running_loop(), q))
    text, n = [], 0
    while True:
        ev = await asyncio.wait_for(q.get(), 60)
        if isinstance(ev, eng.Delta):
            text.append(ev.text)
            n += 1
            if cancel_after is not None and n == cancel_after:
                e.cancel(rid)
        else:
            return "".join(text), ev


PROMPT = [1, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120]


def sampled(seed, max_tokens=12):
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)


def test_seed_gives_same_output_alone_and_in_a_batch(engine):
    async def main():
        alone = await generate(engine, PROMPT, sampled(7))
        together = await asyncio.gather(
            generate(engine, PROMPT, sampled(7)),
            *[generate(engine, PROMPT[:-1] + [200 + i], sampled(i)) for i in range(3)])
        return alone, together

    alone, together = asyncio.run(main())
    assert alone[1].reason == "length" and alone[1].completion_tokens == 12
    assert together[0][0] == alone[0]
    assert engine.obs.max_batch >= 2  # the four requests shared decode steps
    active, peak, _ = engine.obs.memory_reports[-1]
    assert 0 < active <= peak


def test_idle_engine_drops_mlx_buffer_cache(engine):
    import time

    import mlx.core as mx

    asyncio.run(generate(engine, PROMPT, sampled(5, max_tokens=6)))
    deadline = time.monotonic() + 5  # the engine drains the batch right after the final event
    while time.monotonic() < deadline and mx.get_cache_memory() != 0:
        time.sleep(0.05)
    assert mx.get_cache_memory() == 0


def test_greedy_output_identical_with_prefix_cache_hit(engine):
    prompt = [1] + list(range(150, 190))
    greedy = SamplingParams(max_tokens=8, temperature=0.0)

    async def main():
        return await generate(engine, prompt, greedy), await generate(engine, prompt, greedy)

    (t1, f1), (t2, f2) = asyncio.run(main())
    assert f2.cached_tokens >= len(prompt) - 1 > f1.cached_tokens
    assert t1 == t2


def test_cancel_ends_request_and_frees_the_slot(engine):
    async def main():
        return await generate(engine, PROMPT, sampled(1, max_tokens=400), cancel_after=2)

    _, fin = asyncio.run(main())
    assert isinstance(fin, eng.Finish) and fin.reason == "cancelled"
    assert fin.completion_tokens < 10
    assert engine.inflight == 0


def test_timeout_fires(engine):
    async def main():
        no_eos = SamplingParams(max_tokens=100_000, temperature=1.0, seed=2, logit_bias={2: -100.0})
        return await generate(engine, PROMPT, no_eos, timeout=0.5)

    _, ev = asyncio.run(main())
    assert isinstance(ev, eng.Error) and ev.kind == "timeout", ev
    assert engine.inflight == 0


def test_nan_logits_abort_only_that_request(engine):
    async def main():
        return await asyncio.gather(generate(engine, PROMPT[:-1] + [POISON], sampled(3)),
                                    generate(engine, PROMPT, sampled(4)))

    bad, good = asyncio.run(main())
    assert isinstance(bad[1], eng.Error) and bad[1].kind == "numerical"
    assert isinstance(good[1], eng.Finish) and good[1].reason == "length"
    _, after = asyncio.run(generate(engine, PROMPT, sampled(5)))
    assert after.reason == "length"  # still serving


def test_bounded_queue_refuses_when_full(engine):
    async def main():
        loop = asyncio.get_running_loop()
        reqs = [eng.Request(f"q{i}", PROMPT, sampled(i, max_tokens=200), 60, loop, asyncio.Queue())
                for i in range(engine.max_batch + engine.max_queue + 1)]
        for r in reqs[:-1]:
            engine.submit(r)
        with pytest.raises(eng.QueueFull):
            engine.submit(reqs[-1])
        for r in reqs[:-1]:
            engine.cancel(r.rid)
        for r in reqs[:-1]:
            while not isinstance(await asyncio.wait_for(r.events.get(), 60), (eng.Finish, eng.Error)):
                pass

    asyncio.run(main())
    assert engine.inflight == 0


def test_stop_string_and_max_tokens(engine):
    async def main():
        free = await generate(engine, PROMPT, SamplingParams(max_tokens=12, temperature=0.0))
        stop = free[0][2:5]
        stopped = await generate(engine, PROMPT, SamplingParams(max_tokens=12, temperature=0.0,
                                                                stop=(stop,)))
        return free, stop, stopped

    (text, fin), stop, (text2, fin2) = asyncio.run(main())
    assert fin.reason == "length" and fin.completion_tokens == 12
    if stop.strip():
        assert fin2.reason == "stop"
        assert text2 == text[: text.find(stop)]


def test_repetition_loop_is_distinguishable_from_length(engine):
    async def main():
        stuck = SamplingParams(max_tokens=300, temperature=0.0, logit_bias={5: 100.0})
        return await generate(engine, PROMPT, stuck)

    _, fin = asyncio.run(main())
    assert fin.reason == "length"  # what the client sees: the budget was not worth spending
    assert fin.problem == "repetition" and fin.completion_tokens < 300


class OnlyToken:
    """A stand-in constraint: its processor allows one token, records what it saw, and
    reports a grammar error after ``fail_after`` calls."""

    def __init__(self, token, fail_after=None):
        self.token, self.fail_after, self.seen = token, fail_after, []

    def processor(self, prompt_len, max_tokens=None):
        outer = self

        class Proc:
            error = None

            def __call__(self, tokens, logits):
                import mlx.core as mx

                outer.seen.append((prompt_len, tokens.tolist()))
                if outer.fail_after is not None and len(outer.seen) > outer.fail_after:
                    self.error = "rejected"
                keep = mx.arange(logits.shape[-1]) == outer.token
                return mx.where(keep, logits, mx.array(float("-inf"), logits.dtype))

        return Proc()


def test_constraint_processor_runs_last_on_prompt_plus_completion(engine):
    only = OnlyToken(11, fail_after=3)

    async def main():
        q: asyncio.Queue = asyncio.Queue()
        # logit_bias pushes token 12; the constraint (applied after it) still wins.
        params = SamplingParams(max_tokens=6, temperature=0.0, logit_bias={12: 100.0})
        engine.submit(eng.Request("c1", PROMPT, params, 60, asyncio.get_running_loop(), q, constraint=only))
        events = []
        while not events or isinstance(events[-1], eng.Delta):
            events.append(await asyncio.wait_for(q.get(), 60))
        return events

    events = asyncio.run(main())
    fin = events[-1]
    assert isinstance(fin, eng.Finish) and fin.completion_tokens == 6
    assert fin.problem == "grammar" and fin.constraint_error == "rejected"
    prompt_len, last = only.seen[-1]
    assert prompt_len == len(PROMPT) and last[:len(PROMPT)] == PROMPT
    assert last[len(PROMPT):] == [11] * (len(last) - len(PROMPT))  # every sampled token obeyed the mask


def test_prefix_cache_bound_scales_with_the_model(engine):
    from mlx.utils import tree_flatten

    from squish.hardware import total_memory_bytes
    from squish.runtime.prompt_cache import AUTO_MIN_BYTES, auto_max_bytes

    weights = sum(v.nbytes for _, v in tree_flatten(engine.model_info.model.parameters()))
    assert engine._prefix.max_bytes == auto_max_bytes(weights, total_memory_bytes())
    assert auto_max_bytes(1 << 20, 16 << 30) == AUTO_MIN_BYTES  # a tiny model still gets 64 MiB
    assert auto_max_bytes(2 << 30, 64 << 30) == 2 << 30  # weights-sized
    assert auto_max_bytes(5 << 30, 16 << 30) == int(0.1 * (16 << 30))  # at most 10% of RAM
