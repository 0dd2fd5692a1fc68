"""The prefix cache's radix tree: shared prefixes stored once, reuse as far as the
prompt matches, splits, byte bound, stale generated tails evicted first.

Each layer's keys encode the token ids they belong to (keys[..., t, 0] = token t,
values = keys + layer), so a reused cache can be checked against the prompt."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache

from squish.runtime.prompt_cache import MIN_REUSE_TOKENS, PrefixCache

LAYERS, HEADS, DIM = 2, 2, 4
PER_TOKEN = LAYERS * 2 * HEADS * DIM * 4  # float32 keys + values, every layer


def kv_for(tokens: list[int], pad: int = 0) -> list[KVCache]:
    """A finished sequence's cache (``pad`` extra unused slots, as a growing cache has)."""
    col = mx.array(tokens + [0] * pad, dtype=mx.float32)[None, None, :, None]
    out = []
    for layer in range(LAYERS):
        c = KVCache()
        c.keys = mx.broadcast_to(col, (1, HEADS, len(tokens) + pad, DIM)) + 0
        c.values = c.keys + layer
        c.offset = len(tokens)
        out.append(c)
    return out


def check(cache: list[KVCache], tokens: list[int]) -> None:
    for layer, c in enumerate(cache):
        assert c.offset == len(tokens)
        assert c.keys[0, 1, :, 0].tolist() == tokens
        assert c.values[0, 0, :, 2].tolist() == [t + layer for t in tokens]


def run(pc: PrefixCache, prompt: list[int], reply: list[int]) -> int:
    """What the engine does for one request: look up, then store prompt + reply."""
    cache, n = pc.lookup(prompt)
    if cache is not None:
        check(cache, prompt[:n])
    pc.store(prompt + reply, kv_for(prompt + reply))
    return n


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


def test_reuse_stops_one_token_short_of_the_prompt_and_needs_a_minimum():
    pc = PrefixCache(1 << 30)
    a = seq(100, 40)
    pc.store(a, kv_for(a, pad=7))
    cache, n = pc.lookup(a)
    assert n == len(a) - 1  # the last prompt token is prefilled for the first logits
    check(cache, a[:-1])
    assert pc.lookup(a[:MIN_REUSE_TOKENS - 1] + [999, 1000])[1] == 0
    assert pc.nbytes == len(a) * PER_TOKEN  # padding is not stored


def test_shared_prefix_is_stored_once_and_both_branches_are_reused():
    pc = PrefixCache(1 << 30)
    system = seq(1000, 50)
    a, b = system + seq(1, 20), system + seq(500, 30)
    pc.store(a, kv_for(a))
    pc.store(b, kv_for(b))  # splits a's run after the system prompt
    assert pc.nbytes == (50 + 20 + 30) * PER_TOKEN
    assert len(pc) == 2
    for s in (a, b):
        cache, n = pc.lookup(s + [7, 7])
        assert n == len(s)
        check(cache, s)
    cache, n = pc.lookup(system + [4242, 4243])  # another agent with the same system prompt
    assert n == len(system)
    check(cache, system)


def test_a_continued_conversation_adds_only_its_new_tokens():
    pc = PrefixCache(1 << 30)
    turn1 = seq(10, 60)
    pc.store(turn1, kv_for(turn1))
    turn2 = turn1 + seq(300, 25)
    pc.store(turn2, kv_for(turn2))
    assert pc.nbytes == len(turn2) * PER_TOKEN and len(pc) == 1
    pc.store(turn1[:30], kv_for(turn1[:30]))  # already held: nothing new
    assert pc.nbytes == len(turn2) * PER_TOKEN


def test_least_recently_used_leaf_goes_first_and_shared_runs_outlive_it():
    system = seq(1000, 40)
    convs = [system + seq(100 * k, 20) for k in range(1, 4)]
    pc = PrefixCache((40 + 3 * 20) * PER_TOKEN)
    for c in convs:
        pc.store(c, kv_for(c))
    assert pc.nbytes == (40 + 60) * PER_TOKEN
    pc.lookup(convs[0] + [1])  # conversation 0 is used again
    d = system + seq(5000, 20)
    pc.store(d, kv_for(d))  # over the bound by 20 tokens: the LRU leaf (conversation 1) goes
    assert pc.nbytes <= pc.max_bytes
    assert pc.lookup(convs[1] + [1])[1] == len(system)
    assert pc.lookup(convs[0] + [1])[1] == len(convs[0])
    assert pc.lookup(convs[2] + [1])[1] == len(convs[2])


@pytest.mark.parametrize("where", ["reply", "prompt"])
def test_a_replaced_generated_tail_is_evicted_before_live_entries(where):
    """Conversation A's turn 2 re-renders A's reply differently (re-serialized tool
    arguments, dropped reasoning): A's old generated tail can never be hit again, so
    under pressure it goes before conversation B, which is older but alive. When the
    two prompts part inside the prompt (a fork), both stay live and LRU decides."""
    a1 = seq(100, 40)
    pc = PrefixCache(1 << 30)
    b = seq(5000, 40)
    run(pc, b, seq(6000, 10))
    run(pc, a1, seq(200, 10))
    if where == "reply":
        a2 = a1 + [200, 201, 9999] + seq(300, 20)  # the reply as the client sent it back
    else:
        a2 = a1[:30] + seq(7000, 33)
    pc.max_bytes = pc.nbytes + 23 * PER_TOKEN  # a2 adds 31 tokens: room if 8 others go
    reused = run(pc, a2, seq(400, 10))
    assert reused == (len(a1) + 2 if where == "reply" else 30)
    b_hit = pc.lookup(b + seq(6000, 10) + [1])[1]
    a1_hit = pc.lookup(a1 + seq(200, 10) + [1])[1]
    if where == "reply":
        assert b_hit == 50 and a1_hit == len(a1) + 2  # A's old tail went, B stayed
    else:
        assert b_hit == 0 and a1_hit == 50  # B was least recently used


def test_byte_bound_holds_and_zero_disables():
    pc = PrefixCache(100 * PER_TOKEN)
    for k in range(10):
        s = seq(1000 * (k + 1), 30)
        pc.store(s, kv_for(s))
        assert pc.nbytes <= pc.max_bytes
    assert pc.nbytes == sum(n.nbytes for n in pc._nodes())
    off = PrefixCache(0)
    off.store(seq(1, 30), kv_for(seq(1, 30)))
    assert off.nbytes == 0 and off.lookup(seq(1, 30))[1] == 0
