"""Real SmolLM2-135M weights: calibrated INT4 beats RTN and passes the gate.

To stay well under a minute on a 2-core CPU the model is cut to its first
``N_LAYERS`` decoder blocks (real weights, real tokenizer, tied 49152-row
embedding); the reference is the same truncated model in float32, so KLD and
top-1 compare like with like. The full 30-layer build with production defaults
is exercised by the ``smollm2_artifact`` fixture (tests/conftest.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from squish.quant.evaluate import THRESHOLDS, Thresholds, evaluate
from squish.quant.quantize import UNIFORM, MixedPolicy, QuantSpec, quantize_model
from squish.quant.reference import Reference

N_LAYERS = 4


def _truncate(ref: Reference, n: int) -> Reference:
    keep = [f"model.layers.{i}." for i in range(n)]

    def tensors():
        return {k: v for k, v in ref.tensors().items()
                if not k.startswith("model.layers.") or k.startswith(tuple(keep))}

    return Reference(name=ref.name + f"-{n}l", config={**ref.config, "num_hidden_layers": n},
                     tokenizer_dir=ref.tokenizer_dir, source=ref.source, load_tensors=tensors)


def _build(ref, calib, spec, out: Path, **kw):
    out.mkdir(parents=True)
    got = {}
    outcome = quantize_model(ref, calib, spec, lambda k, v: got.__setitem__(k, v), **kw)
    for k, v in got.items():
        assert v.dtype in (mx.uint32, mx.float32), (k, v.dtype)
        assert not k.startswith("lm_head")  # tied
    mx.save_safetensors(str(out / "model.safetensors"), got, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps({**ref.config, "quantization": outcome.quantization}))
    for f in Path(ref.tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return outcome


@pytest.mark.slow
def test_int4_calibrated_beats_rtn_on_real_weights(smollm2_gguf, tmp_path):
    from mlx_lm.utils import load_tokenizer

    from squish.quant.calibrate import calibration_tokens
    from squish.quant.gguf import load_gguf

    ref = _truncate(load_gguf(Path(smollm2_gguf), tmp_path / "ref"), N_LAYERS)
    tok = load_tokenizer(ref.tokenizer_dir)
    calib_file = tmp_path / "calib.txt"
    calib_file.write_text(
        "Calibration text for the test. The engine of the old car coughed twice and then "
        "settled into a steady hum, while the driver checked the map and the children in the "
        "back seat argued about which song to play next. " * 6
    )
    calib, summary = calibration_tokens(ref, tok, calib_file=calib_file, n_samples=8, seq_len=64, seed=0)
    assert calib.shape == (8, 64) and summary["source"] == "file"

    spec = QuantSpec(bits=4, group_size=64, dtype="float32")
    ours = _build(ref, calib, spec, tmp_path / "squish", mixed=MixedPolicy(embed_bits=8))
    base = _build(ref, calib, spec, tmp_path / "rtn", method="rtn", mixed=MixedPolicy(embed_bits=8))
    assert ours.quantization["model.embed_tokens"]["bits"] == 8
    assert ours.recipe["method"] == "awq+clip+gptq" and base.recipe["method"] == "rtn"

    # a truncated model is not a chat model: distribution checks only
    r_ours = evaluate(ref, tmp_path / "squish", max_windows=2, coherence=False)
    r_base = evaluate(ref, tmp_path / "rtn", max_windows=2, coherence=False,
                      thresholds=Thresholds(max_mean_kld=1e9, min_top1=0, max_ppl_delta=1e9))
    assert r_ours.passed, r_ours.table()
    assert r_ours.metrics["mean_kld"] < r_base.metrics["mean_kld"]
    assert r_ours.metrics["runtime_consistency_max_abs"] < THRESHOLDS[4].max_runtime_diff
    d = r_ours.to_dict()
    assert d["passed"] and d["metrics"]["nonfinite_logits"] == 0


@pytest.mark.slow
def test_uniform_rtn_records_no_overrides(smollm2_gguf, tmp_path):
    from squish.quant.gguf import load_gguf

    ref = _truncate(load_gguf(Path(smollm2_gguf), tmp_path / "ref"), 1)
    calib = mx.array(np.arange(2 * 32, dtype=np.int32).reshape(2, 32))
    out = quantize_model(ref, calib, QuantSpec(bits=8, group_size=32), lambda k, v: None,
                         method="rtn", mixed=UNIFORM)
    assert out.quantization == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert out.recipe["bits_per_weight"] == pytest.approx(8 + 64 / 32)
