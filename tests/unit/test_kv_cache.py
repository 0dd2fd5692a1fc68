"""The quantized KV cache (``squish serve --kv-bits``): batched through mlx_lm's own
``BatchGenerator`` it gives what one sequence at a time through mlx_lm's own
``QuantizedKVCache`` gives; it holds the bytes it should; the prefix cache reuses it;
a model or a setting it cannot serve is refused at start with the reason.

Tiny random-weight models (structure, not quality; the quality cost on the real
model is ``benchmarks/kv_quality.py``)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache, QuantizedKVCache, RotatingKVCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.errors import InputError  # noqa: E402
from squish.runtime import engine as eng  # noqa: E402
from squish.runtime.kv_cache import BatchQuantizedKV, QuantizedKV, check, new_cache  # noqa: E402
from squish.runtime.prompt_cache import PrefixCache  # noqa: E402
from squish.runtime.sampling import SamplingParams  # noqa: E402

PROMPTS = [[5, 17, 42, 9, 33, 8, 21], [11, 3, 50, 19, 27, 44, 2, 60, 31, 12, 6], [40, 23, 7, 14]]
MAX_TOKENS = [5, 8, 6]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from squish.runtime.loader import load_artifact

    path = make_tiny_artifact(tmp_path_factory.mktemp("kv") / "tiny-4bit")
    return path, load_artifact(path)


def one_at_a_time(model, prompt, n, quant):
    """Greedy tokens, one sequence, mlx_lm's own single-sequence cache (quantized when
    ``quant`` = (bits, group size), plain when None)."""
    cache = [QuantizedKVCache(group_size=quant[1], bits=quant[0]) if quant else KVCache() for _ in model.layers]
    logits = model(mx.array([prompt]), cache=cache)[:, -1]
    out = []
    for _ in range(n):
        out.append(int(mx.argmax(logits, axis=-1).item()))
        logits = model(mx.array([[out[-1]]]), cache=cache)[:, -1]
    return out


def batched(model, quant, late: bool):
    """The same prompts through BatchGenerator with Squish's caches; the last one joins
    while the others decode when ``late`` (the batch is extended, then filtered as
    sequences finish at their own max_tokens)."""
    gen = BatchGenerator(model, stop_tokens=[], completion_batch_size=4, prefill_batch_size=4)
    got: dict[int, list[int]] = {}
    uids = gen.insert(PROMPTS[:2] if late else PROMPTS, max_tokens=MAX_TOKENS[:2] if late else MAX_TOKENS,
                      caches=[new_cache(model, quant) for _ in (PROMPTS[:2] if late else PROMPTS)])
    steps = 0
    while True:
        responses = gen.next_generated()
        steps += 1
        if late and steps == 2:
            uids += gen.insert([PROMPTS[2]], max_tokens=[MAX_TOKENS[2]], caches=[new_cache(model, quant)])
        if not responses and steps > 2:
            break
        for r in responses:
            got.setdefault(r.uid, []).append(r.token)
    gen.close()
    return [got[u] for u in uids]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("late", [False, True])
def test_batched_quantized_cache_gives_what_one_sequence_at_a_time_gives(tiny, bits, late):
    _, info = tiny
    quant = check(info.model, bits)
    assert quant == (bits, 32)  # the tiny model's heads are 32 wide: groups of 64 do not fit
    want = [one_at_a_time(info.model, p, n, quant) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert batched(info.model, quant, late) == want
    plain = [one_at_a_time(info.model, p, n, None) for p, n in zip(PROMPTS, MAX_TOKENS)]
    assert plain != want or bits == 8  # 4 bits changes this random model's choices somewhere


def test_merge_extract_round_trip_keeps_every_sequence_exactly():
    mx.random.seed(0)
    singles = []
    for n in (3, 7, 5):
        c = QuantizedKV(32, 8)
        c.update_and_fetch(mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64)))
        singles.append(c)
    batch = BatchQuantizedKV.merge(singles)
    assert batch.left_padding.tolist() == [4, 0, 2] and batch.size() == 7
    batch.filter([0, 2])  # drop the longest: the common left padding is cut
    assert batch.left_padding.tolist() == [2, 0] and batch.size() == 5
    other = BatchQuantizedKV.merge([singles[1]])
    batch.extend(other)
    for i, src in enumerate((singles[0], singles[2], singles[1])):
        got = batch.extract(i)
        assert isinstance(got, QuantizedKV) and got.offset == src.offset
        for a, b in zip((*got.keys, *got.values), (*src.keys, *src.values)):
            assert mx.array_equal(a, b[..., : src.offset, :])


def test_quantized_cache_holds_the_bytes_it_should(tiny):
    _, info = tiny
    quant = check(info.model, 8)
    n = 300
    plain, q8 = KVCache(), BatchQuantizedKV([0], quant[1], quant[0])
    k = mx.random.normal((1, 4, n, 32))
    plain.update_and_fetch(k, k)
    q8.update_and_fetch(k, k)
    values = 2 * 4 * n * 32  # keys + values
    bits, group = quant
    per_value = (bits + 2 * 32 / group) / 8  # the data, and a float32 scale and bias per group
    assert q8.nbytes * n // q8.keys[0].shape[2] == values * per_value  # both grow in steps of 256
    assert plain.nbytes * n // plain.keys.shape[2] == values * 4
    assert q8.nbytes / plain.nbytes == per_value / 4 == 0.3125


def test_prefix_cache_reuses_quantized_layers_through_splits(tiny):
    _, info = tiny
    quant = check(info.model, 8)
    model = info.model
    pc = PrefixCache(1 << 30, quant)

    def run(tokens):
        cache = new_cache(model, quant)
        model(mx.array([tokens]), cache=cache)
        return cache

    a = list(range(30, 60))
    b = a[:20] + list(range(70, 80))
    full_a = run(a)
    pc.store(a, full_a)
    pc.store(b, run(b))  # splits a's run after 20 tokens
    got, n = pc.lookup(b + [5])
    assert n == len(b) and all(type(c) is QuantizedKV for c in got)
    ref = run(b)
    for g, r in zip(got, ref):
        for x, y in zip((*g.keys, *g.values), (*r.keys, *r.values)):
            assert mx.allclose(x[..., :n, :].astype(mx.float32), y[..., :n, :].astype(mx.float32), atol=1e-5)
    got, n = pc.lookup(a[:25] + [1, 2])
    assert n == 25  # across the split: the shared 20 and 5 of a's own
    for g, r in zip(got, full_a):
        assert mx.array_equal(g.keys[0], r.keys[0][..., :25, :])


async def _generate(e, prompt, max_tokens=8):
    q: asyncio.Queue = asyncio.Queue()
    e.submit(eng.Request(f"r{id(q)}", list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0),
                         60.0, asyncio.get_running_loop(), q))
    text = []
    while True:
        ev = await asyncio.wait_for(q.get(), 60)
        if not isinstance(ev, eng.Delta):
            assert isinstance(ev, eng.Finish), ev
            return "".join(text), ev
        text.append(ev.text)


def test_engine_with_kv_bits_reuses_its_prefix_and_answers_alike(tiny):
    path, _ = tiny
    from squish.runtime.loader import load_artifact

    e = eng.Engine(lambda: load_artifact(path), max_batch=2, kv_bits=8)
    e.start()
    assert e.ready.wait(120), e.load_error
    try:
        prompt = list(range(20, 50))
        first, f1 = asyncio.run(_generate(e, prompt))
        again, f2 = asyncio.run(_generate(e, prompt))
        assert f2.cached_tokens >= len(prompt) - 1 > 0 == f1.cached_tokens
        assert again == first  # the reused quantized prefix is the one a fresh prefill makes
        assert all(type(c) is QuantizedKV for c in e._prefix.lookup(prompt)[0])
    finally:
        e.stop()


def test_what_cannot_be_served_quantized_is_refused_with_the_reason(tiny, monkeypatch):
    _, info = tiny
    monkeypatch.setattr(type(info.model), "make_cache",
                        lambda self: [RotatingKVCache(max_size=16) for _ in self.layers], raising=False)
    with pytest.raises(InputError, match="no plain KV cache layer"):
        check(info.model, 8)
