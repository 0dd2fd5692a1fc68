"""The real pipeline on the real model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI) →
INT4 artifact with production defaults (fixture ``smollm2_artifact``) → loaded by Squish
and by unchanged ``mlx_lm.load`` → logits within the gate vs the float32 reference,
coherent greedy chat answer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from squish.quant.evaluate import THRESHOLDS, repetition_loop
from squish.cli.main import main
from squish.runtime.loader import load_artifact

# Held-out text for this test (not the calibration text, not heldout.txt).
TEXT = ("The old lighthouse keeper climbed the spiral stairs every evening at dusk. "
        "From the top he could see the fishing boats returning to the harbour, their "
        "lamps swaying gently as the tide turned and the wind came in from the west.")
FRUITS = ("apple", "banana", "orange", "grape", "strawberr", "mango", "pear", "cherr", "lemon",
          "pineapple", "peach", "kiwi", "watermelon", "blueberr")


@pytest.fixture(scope="module")
def loaded(smollm2_artifact):
    return load_artifact(smollm2_artifact)


def test_manifest_records_the_build(smollm2_artifact):
    m = json.loads((smollm2_artifact / "squish.json").read_text())
    assert m["format_version"] == 1
    q = m["quantization"]
    assert (q["bits"], q["group_size"], q["dtype"], q["experimental"]) == (4, 64, "float32", False)
    assert m["quality"]["passed"] is True
    assert m["source"]["kind"] == "gguf" and len(m["source"]["sha256"]) == 64
    assert m["calibration"]
    cfg = json.loads((smollm2_artifact / "config.json").read_text())
    assert cfg["quantization"]["model.embed_tokens"]["bits"] == 8  # mixed precision, recorded
    assert "model.embed_tokens" in json.dumps(q["recipe"])


def test_squish_and_mlx_lm_load_the_same_model(smollm2_artifact, loaded):
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(str(smollm2_artifact))
    ids = mx.array([loaded.tokenizer.encode(TEXT)[:32]])
    a, b = loaded.model(ids), model(ids)
    assert a.dtype == b.dtype == mx.float32
    assert mx.array_equal(a, b).item()


def test_logits_within_gate_vs_float_reference(smollm2_gguf, loaded, tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import _get_classes

    from squish.quant.gguf import load_gguf

    ref = load_gguf(smollm2_gguf, tmp_path)
    cls, args = _get_classes(ref.config)
    reference = cls(args.from_dict(ref.config))
    reference.load_weights(list(ref.tensors().items()))
    ids = mx.array([loaded.tokenizer.encode(TEXT)])
    lr = np.array(reference(ids)[0], dtype=np.float64)
    lq = np.array(loaded.model(ids)[0], dtype=np.float64)
    assert np.isfinite(lq).all()

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    pr, pq = log_softmax(lr), log_softmax(lq)
    kld = float((np.exp(pr) * (pr - pq)).sum(-1).mean())
    top1 = float((lr.argmax(-1) == lq.argmax(-1)).mean())
    gate = THRESHOLDS[4]
    assert kld <= gate.max_mean_kld, kld
    assert top1 >= gate.min_top1, top1


def test_greedy_chat_answer_is_coherent(loaded):
    from mlx_lm import generate

    tok = loaded.tokenizer
    prompt = tok.apply_chat_template([{"role": "user", "content": "List three fruits."}],
                                     add_generation_prompt=True)
    text = generate(loaded.model, tok, prompt, max_tokens=40, verbose=False)
    named = [f for f in FRUITS if f in text.lower()]
    assert len(named) >= 2, text
    assert not repetition_loop(tok.encode(text)), text


def test_verify_cli_on_real_artifact(smollm2_artifact, capsys):
    assert main(["verify", str(smollm2_artifact)]) == 0
    assert "ok:" in capsys.readouterr().out
