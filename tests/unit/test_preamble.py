"""The chat template's preamble: found from the template, prefilled at start-up, kept on
disk and read back by the next start, and a first request that reuses it generates
exactly what it would without any prefix cache."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402

from squish.runtime import engine as eng  # noqa: E402
from squish.runtime import preamble  # noqa: E402
from squish.runtime.prompt_cache import PrefixCache  # noqa: E402
from squish.runtime.sampling import SamplingParams  # noqa: E402

# ChatML with a default system prompt when the chat has none (as SmolLM2's template does).
TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a tiny test model that answers "
    "every question about foxes, dogs and fruit.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> Path:
    path = make_tiny_artifact(tmp_path_factory.mktemp("pre") / "tiny-4bit")
    cfg_file = path / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "chat_template": TEMPLATE}))
    manifest = json.loads((path / "squish.json").read_text())
    from squish.artifact import sha256_file

    manifest["files"]["tokenizer_config.json"] = {"size": cfg_file.stat().st_size, "sha256": sha256_file(cfg_file)}
    (path / "squish.json").write_text(json.dumps(manifest))
    return path


@pytest.fixture(scope="module")
def loaded(artifact):
    from squish.runtime.loader import load_artifact

    return load_artifact(artifact)


def test_preamble_is_what_every_chat_without_a_system_message_starts_with(loaded):
    tokens = preamble.preamble_tokens(loaded.tokenizer)
    text = loaded.tokenizer.decode(tokens)
    assert text.startswith("<|im_start|>system\nYou are a tiny test model") and text.endswith("<|im_start|>user\n")
    chat = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "Anything at all"}],
                                                add_generation_prompt=True)
    assert list(chat[:len(tokens)]) == tokens and len(chat) > len(tokens)


@pytest.mark.parametrize("quant", [None, (8, 32)], ids=["plain", "kv8"])
def test_prepared_once_then_read_from_disk(loaded, monkeypatch, quant):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    first = PrefixCache(64 << 20, quant)
    n = preamble.prepare(loaded, first)
    tokens = preamble.preamble_tokens(loaded.tokenizer)
    assert n == len(tokens) > 8
    file = preamble.cache_file(loaded, tokens, quant)
    assert file.exists()
    assert not preamble.cache_file(loaded, tokens).exists() or quant is None  # a quantized KV is kept apart
    computed, hit = first.lookup(tokens + [5])
    assert hit == n

    def no_prefill(*a, **k):
        raise AssertionError("the preamble was prefilled again instead of read from disk")

    monkeypatch.setattr(preamble, "_compute", no_prefill)
    second = PrefixCache(64 << 20, quant)
    assert preamble.prepare(loaded, second) == n
    again, hit = second.lookup(tokens + [5])
    assert hit == n
    for a, b in zip(computed, again):
        assert type(a) is type(b) and isinstance(a.keys, tuple) == (quant is not None)
        pairs = zip(tree_flatten((a.keys, a.values)), tree_flatten((b.keys, b.values)))
        assert all(mx.array_equal(x, y) for (_, x), (_, y) in pairs)


def test_a_damaged_file_is_recomputed(loaded, monkeypatch):
    tokens = preamble.preamble_tokens(loaded.tokenizer)
    file = preamble.cache_file(loaded, tokens)
    preamble.prepare(loaded, PrefixCache(64 << 20))
    file.write_bytes(b"not a safetensors file")
    computed = []
    real = preamble._compute
    monkeypatch.setattr(preamble, "_compute", lambda *a: computed.append(1) or real(*a))
    assert preamble.prepare(loaded, PrefixCache(64 << 20)) == len(tokens)
    assert computed == [1] and file.stat().st_size > 100


def test_nothing_to_prepare_without_a_cache_or_a_preamble(loaded):
    assert preamble.prepare(loaded, PrefixCache(0)) == 0


def test_first_request_reuses_the_preamble_and_generates_the_same(artifact, loaded):
    """Greedy output with the preamble prefilled at start = output with no prefix cache at all."""
    from squish.runtime.loader import load_artifact

    prompt = list(loaded.tokenizer.apply_chat_template([{"role": "user", "content": "The quick brown fox"}],
                                                       add_generation_prompt=True))
    n = len(preamble.preamble_tokens(loaded.tokenizer))

    async def first_request(e):
        q: asyncio.Queue = asyncio.Queue()
        e.submit(eng.Request("r1", prompt, SamplingParams(max_tokens=8, temperature=0.0), 60.0,
                             asyncio.get_running_loop(), q))
        text = []
        while True:
            ev = await asyncio.wait_for(q.get(), 60)
            if isinstance(ev, eng.Delta):
                text.append(ev.text)
            else:
                return "".join(text), ev

    out = {}
    for bound in (64 << 20, 0):
        e = eng.Engine(lambda: load_artifact(artifact), prefix_cache_bytes=bound)
        e.start()
        assert e.ready.wait(120), e.load_error
        try:
            out[bound] = asyncio.run(first_request(e))
        finally:
            e.stop()
    (with_cache, fin), (without, fin0) = out[64 << 20], out[0]
    assert fin.cached_tokens == n and fin0.cached_tokens == 0
    assert with_cache == without and fin.completion_tokens == fin0.completion_tokens == 8
