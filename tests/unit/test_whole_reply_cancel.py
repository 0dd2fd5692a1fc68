"""A whole (non-streamed) reply is cancelled when its client leaves, however fast the model
produces tokens: the disconnect is polled on a clock, not only when the engine is quiet.
A fake engine stands in (this is lifecycle, not inference): it streams a token every 5 ms,
faster than the poll period, and never finishes on its own."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from squish.runtime import engine as eng
from squish.serving import core as core_mod
from squish.serving.core import Core, Plan
from squish.serving.errors import ClientGone


class FastEngine:
    def __init__(self):
        self.cancelled: list[str] = []
        self.stop = threading.Event()

    def submit(self, req):
        def run():
            while not self.stop.is_set() and req.rid not in self.cancelled:
                req.loop.call_soon_threadsafe(req.events.put_nowait, eng.Delta("x"))
                time.sleep(0.005)

        threading.Thread(target=run, daemon=True).start()

    def cancel(self, rid):
        self.cancelled.append(rid)


def _plan() -> Plan:
    job = SimpleNamespace(sampling=eng.SamplingParams(max_tokens=10_000))
    return Plan(job=job, rid="req-1", ids=[1, 2, 3], messages=None, task=None, constraint=None,
                max_tokens=10_000, deadline=time.monotonic() + 30, facts=None)


@pytest.mark.parametrize("gone_after_s", [0.3, 0.6])
def test_a_busy_stream_is_still_polled_for_the_disconnect(gone_after_s):
    engine = FastEngine()
    core = Core(engine)

    async def main():
        t0 = time.monotonic()

        async def is_gone():
            return time.monotonic() - t0 > gone_after_s

        n = 0
        with pytest.raises(ClientGone):
            async for _ in core._submit(_plan(), [1, 2, 3], 10_000, None, 1, is_gone):
                n += 1
        return n, time.monotonic() - t0

    try:
        n, took = asyncio.run(main())
    finally:
        engine.stop.set()
    assert n > 10  # tokens did arrive faster than the poll period
    assert took < gone_after_s + 3 * core_mod.DISCONNECT_POLL_S
    assert engine.cancelled == ["req-1"]
