"""Real Gemma 3 270M, the catalog's gemma3:270m (a Q4_K_M GGUF from four PyPI wheels), built
the way `squish quantize gemma3:270m` builds it (the file's own codes kept): the artifact
passes its quality gate, its head stays tied to the embedding, it loads unchanged in mlx_lm
and in Squish (the same logits), completes text coherently, and `squish serve` answers a
chat request with it.

The file holds the pretrained (base) model, so coherence is checked on completions.
benchmarks/quant_quality.py measures kept codes against calibrated INT4/INT8 and RTN."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest

from serving import Server

pytestmark = pytest.mark.slow


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    from mlx_lm.generate import generate

    return generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=n)


def test_build_passes_its_gate_with_a_tied_head(gemma3_artifact):
    manifest = json.loads((gemma3_artifact / "squish.json").read_text())
    assert manifest["quality"]["passed"], manifest["quality"]
    assert manifest["source"]["kind"] == "gguf"
    recipe = manifest["quantization"]["recipe"]
    assert recipe["architecture"] == "gemma3_text" and recipe["method"] == "gguf-codes"
    # Q4_K_M: Q4_K, Q5_0 and Q8_0 kept as they are; Q6_K (16-value sub-blocks) at 8 bits
    assert recipe["kept_gguf_types"] == {"Q4_K": 27, "Q5_0": 81, "Q8_0": 10}
    assert {r["type"] for r in recipe["rounded"].values()} == {"Q6_K"} and len(recipe["rounded"]) == 9
    keys = set(json.loads((gemma3_artifact / "model.safetensors.index.json").read_text())["weight_map"]) \
        if (gemma3_artifact / "model.safetensors.index.json").exists() else set(mx.load(
            str(gemma3_artifact / "model.safetensors")))
    assert not any(k.startswith("lm_head") for k in keys)
    assert "model.embed_tokens.scales" in keys  # the tied head is the quantized embedding


def test_mlx_lm_loads_it_unchanged_and_completes_coherently(gemma3_artifact):
    from mlx_lm import load

    model, tokenizer = load(str(gemma3_artifact))
    assert model.tie_word_embeddings
    answer = _greedy(model, tokenizer, "Question: What is 2+2?\nAnswer:", 6)
    assert "4" in answer.split("\n")[0], answer
    fruits = _greedy(model, tokenizer, "Here is a list of three fruits: apple,", 6)
    assert any(f in fruits.lower() for f in ("pear", "banana", "orange", "grape", "peach", "cherr",
                                              "mango", "strawberr", "plum", "lemon")), fruits


def test_squish_loads_the_same_model(gemma3_artifact):
    from mlx_lm import load

    from squish.runtime.loader import load_artifact

    ours = load_artifact(gemma3_artifact)
    theirs, _ = load(str(gemma3_artifact))
    ids = mx.array([ours.tokenizer.encode("The capital of France is")])
    a, b = ours.model(ids), theirs(ids)
    assert bool(mx.all(mx.isfinite(a)))
    assert float(mx.max(mx.abs(a - b))) < 1e-3


def test_squish_serve_answers_a_chat_request(gemma3_artifact):
    server = Server(gemma3_artifact)
    try:
        reply = server.client().chat.completions.create(
            model=server.model, messages=[{"role": "user", "content": "Name three fruits."}],
            max_tokens=8, temperature=0)
        choice = reply.choices[0]
        assert choice.message.content.strip() and choice.finish_reason in ("stop", "length")
        assert reply.usage.completion_tokens <= 8
    finally:
        assert server.stop() == 0
