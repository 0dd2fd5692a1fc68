"""End to end: ``squish serve --kv-bits 8`` (the quantized KV cache) with the SmolLM2 INT4
artifact, driven by the official ``openai`` client: it answers sensibly, streams what it
returns whole, reuses a quantized prefix, and answers a request the same alone and in a
batch with others (so the batched cache's padding, merging and filtering lose nothing)."""

from __future__ import annotations

import concurrent.futures as cf
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving import Server  # noqa: E402

FRUITS = [{"role": "user", "content": "List three fruits."}]
OTHERS = ["Name a color.", "What is the capital of France?", "Say hello in French."]


@pytest.fixture(scope="module")
def server(smollm2_artifact):
    s = Server(smollm2_artifact, "--kv-bits", "8", "--rate-limit", "600", "--rate-burst", "60")
    yield s
    assert s.stop() == 0
    out = Path(s.log.name).read_text()
    s.cleanup()
    assert "List three fruits" not in out  # prompts never reach the log


def test_answers_streams_alike_and_reuses_the_quantized_prefix(server):
    c = server.client()
    full = c.chat.completions.create(model=server.model, messages=FRUITS, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    assert sum(f in text.lower() for f in ("apple", "banana", "orange", "grape", "strawberr", "mango")) >= 2, text
    chunks = list(c.chat.completions.create(model=server.model, messages=FRUITS, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    usage = chunks[-1].usage
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1  # all but the last prompt token
    server.healthy()


def test_a_request_answers_the_same_alone_and_batched(server):
    c = server.client()

    def ask(q: str) -> str:
        r = c.chat.completions.create(model=server.model, messages=[{"role": "user", "content": q}],
                                      max_tokens=12, temperature=0)
        return r.choices[0].message.content

    alone = [ask(q) for q in OTHERS]
    with cf.ThreadPoolExecutor(len(OTHERS)) as pool:
        together = list(pool.map(ask, OTHERS))
    assert together == alone
    assert server.metric("squish_prefix_cache_hits_total") >= 2 * len(OTHERS)  # the batched ones reused theirs
    server.healthy()
