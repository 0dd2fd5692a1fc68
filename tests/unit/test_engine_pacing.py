"""An engine step cannot be interrupted, so on a slow backend (MLX's CPU backend prefills
a quantized model at ~0.1 s per token) a cancel must not wait behind it: a queued request
ends at once, and the prefill of an admitted one is cut into steps of ~``TARGET_S``.
The tiny random-weight model is slowed down in its forward pass (lifecycle, not quality)."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.runtime import engine as eng  # noqa: E402
from squish.runtime.pacing import MIN_TOKENS, TARGET_S, PrefillPacer  # noqa: E402
from squish.runtime.sampling import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("tiny") / "tiny-4bit")


def slow_loader(path: Path, *, per_token_s: float = 0.0, per_call_s: float = 0.0, busy: threading.Event = None,
                widths: list | None = None):
    """The model sleeps ``per_call_s`` + ``per_token_s`` x its input tokens per forward pass
    (and appends each pass's width to ``widths``)."""
    def load():
        from squish.runtime.loader import load_artifact

        info = load_artifact(path)
        base = type(info.model)

        class Slow(base):
            def __call__(self, inputs, cache=None, **kw):
                if busy is not None:
                    busy.set()
                if widths is not None:
                    widths.append(inputs.shape[1])
                time.sleep(per_call_s + per_token_s * inputs.size)
                return super().__call__(inputs, cache=cache, **kw)

        info.model.__class__ = Slow
        return info

    return load


def _start(loader, **kw) -> eng.Engine:
    e = eng.Engine(loader, **kw)
    e.start()
    assert e.ready.wait(120), e.load_error
    return e


def _request(loop, rid: str, prompt: list[int], max_tokens: int = 400) -> eng.Request:
    return eng.Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), 60.0, loop,
                       asyncio.Queue())


async def _final(req: eng.Request):
    while True:
        ev = await asyncio.wait_for(req.events.get(), 60)
        if not isinstance(ev, eng.Delta):
            return ev


def test_plan_starts_small_and_follows_the_measured_speed():
    p = PrefillPacer(max_batch=8, max_step=512)
    assert p.plan() == (1, MIN_TOKENS)  # nothing measured yet: one short step finds out
    p.observe(MIN_TOKENS, MIN_TOKENS * 1e-5)  # a fast backend: 10 µs per token
    assert p.plan() == (8, 512)  # the whole budget at once
    slow = PrefillPacer(max_batch=8, max_step=512)
    slow.observe(8, 8 * 0.1)  # the CPU backend: 0.1 s per token
    assert slow.plan() == (1, max(MIN_TOKENS, round(TARGET_S / 0.1)))  # one prompt, a few tokens per step
    assert slow.plan(alone=True) == (1, 512)  # nobody waits: no pacing (each step has a fixed cost)
    slow.observe(8, 8 * 10.0)  # slower than any budget: still MIN_TOKENS per step
    assert slow.plan() == (1, MIN_TOKENS)
    mid = PrefillPacer(max_batch=8, max_step=512)
    mid.observe(100, 100 * TARGET_S / 100)  # 100 tokens fit the target
    batch, step = mid.plan()
    assert batch * step <= 100 and batch == 100 // 16 and step >= 16
    mid.observe(0, 5.0)  # a step without prefill says nothing about prefill
    assert mid.plan() == (batch, step)


def test_a_queued_request_ends_at_once_while_the_engine_is_in_a_step(tiny_artifact):
    busy = threading.Event()
    e = _start(slow_loader(tiny_artifact, per_call_s=1.0, busy=busy), max_batch=1, max_queue=4)
    try:
        async def main():
            loop = asyncio.get_running_loop()
            a, b = _request(loop, "a", [1, 20, 30, 40]), _request(loop, "b", [1, 50, 60, 70])
            busy.clear()
            e.submit(a)
            e.submit(b)
            await asyncio.to_thread(busy.wait, 10)  # a's first forward pass has begun: 1 s to go
            t0 = time.monotonic()
            e.cancel("b")
            fin_b = await _final(b)
            waited = time.monotonic() - t0
            assert e.inflight == 1  # a is still running
            e.cancel("a")
            fin_a = await _final(a)
            return fin_b, waited, fin_a

        fin_b, waited, fin_a = asyncio.run(main())
        assert isinstance(fin_b, eng.Finish) and fin_b.reason == "cancelled" and fin_b.completion_tokens == 0
        assert waited < 0.5, f"the queued request waited {waited:.2f} s for the engine's step"
        assert isinstance(fin_a, eng.Finish) and fin_a.reason == "cancelled"
        assert e.inflight == 0
    finally:
        e.stop()


def test_a_long_prefill_on_a_slow_backend_is_cancelled_within_a_step(tiny_artifact):
    """Two prompts of 200 tokens at 50 ms each: one unpaced step would take 20 s. With others
    in flight a step is ~TARGET_S."""
    clients, bound = 2, TARGET_S + 0.5
    e = _start(slow_loader(tiny_artifact, per_token_s=0.05), max_batch=4)
    try:
        async def main():
            loop = asyncio.get_running_loop()
            reqs = [_request(loop, f"long{i}", [1] + [10 + (i + j) % 300 for j in range(199)], max_tokens=4)
                    for i in range(clients)]
            for r in reqs:
                e.submit(r)
            await asyncio.sleep(0.6)  # well into the prefill
            t0 = time.monotonic()
            for r in reqs:
                e.cancel(r.rid)
            fins = [await _final(r) for r in reqs]
            return fins, time.monotonic() - t0

        fins, waited = asyncio.run(main())
        assert all(isinstance(f, eng.Finish) and f.reason == "cancelled" and f.completion_tokens == 0 for f in fins)
        assert waited < bound, f"the cancel waited {waited:.2f} s for the prefill (bound {bound} s)"
        assert e._pacer.seconds_per_token >= 0.05
        assert e.inflight == 0
    finally:
        e.stop()


def test_paced_prefill_gives_the_same_greedy_reply(tiny_artifact):
    """Prefill in small steps (slow backend, two requests: paced) and in one step (fast backend,
    one request): same greedy tokens."""
    prompt = [1] + [10 + (7 * i) % 300 for i in range(60)]
    replies = []
    for per_token_s in (0.01, 0.0):
        widths: list[int] = []
        e = _start(slow_loader(tiny_artifact, per_token_s=per_token_s, widths=widths), max_batch=2)
        try:
            async def main():
                req = _request(asyncio.get_running_loop(), "g", prompt, max_tokens=12)
                e.submit(req)
                if per_token_s:  # a second request, so that the first is not alone (paced)
                    e.submit(_request(asyncio.get_running_loop(), "h", prompt, max_tokens=12))
                text = []
                while True:
                    ev = await asyncio.wait_for(req.events.get(), 60)
                    if not isinstance(ev, eng.Delta):
                        return "".join(text), ev
                    text.append(ev.text)

            replies.append(asyncio.run(main()))
            if per_token_s:
                assert max(widths) < len(prompt) - 1, f"the slow engine prefilled in one step: {widths}"
            else:
                assert max(widths) == len(prompt) - 1  # alone on a fast backend: the prompt in one pass
        finally:
            e.stop()
    (slow_text, slow_fin), (fast_text, fast_fin) = replies
    assert slow_fin.completion_tokens == fast_fin.completion_tokens == 12
    assert slow_text == fast_text
