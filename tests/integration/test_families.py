"""Every family builds the same way: a tiny random-weight model of each (the catalog's
families and others mlx_lm runs, mixtures of experts included) is quantized through its
own mlx_lm modules, loads unchanged with ``mlx_lm.load``, and has a lower mean KLD
than round-to-nearest at the same bits and group size; starved experts fall back to
clip-searched RTN, recorded; an architecture mlx_lm cannot run is refused clearly."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import MOE_ARCHS, make_hf_folder  # noqa: E402

from squish.cli.main import main  # noqa: E402
from squish.errors import InputError  # noqa: E402
from squish.quant.quantize import MixedPolicy, QuantSpec, quantize_model  # noqa: E402
from squish.quant.sources import load_hf_dir  # noqa: E402

# catalog families first (smollm2 = llama, qwen2.5 = qwen2, qwen3, gemma 3 = gemma3_text)
FAMILIES = ["llama", "qwen2", "qwen3", "gemma3_text", "phi3", "starcoder2", "gemma2", "granite", "qwen3_moe",
            "mixtral"]
SPEC = QuantSpec(bits=4, group_size=64, dtype="float32")
# random token ids: a random-weight model has no text distribution to prefer; GPTQ needs
# several times more calibration tokens than the widest linear input (256 here)
CALIB = np.random.default_rng(0).integers(3, 384, (32, 48)).astype(np.int32)


def _build(ref, src: Path, out: Path, method: str, **kw):
    import mlx.core as mx

    got = {}
    outcome = quantize_model(ref, mx.array(CALIB), SPEC, got.__setitem__, method=method, mixed=MixedPolicy(), **kw)
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "model.safetensors"), got, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps({**ref.config, "quantization": outcome.quantization}))
    for f in src.glob("tokenizer*"):
        shutil.copy(f, out / f.name)
    return outcome


@pytest.mark.parametrize("arch", FAMILIES)
def test_family_builds_loads_and_beats_rtn(tmp_path, arch):
    import mlx.core as mx
    from mlx_lm import load

    from squish.quant.evaluate import compare_models, heldout_windows

    src = make_hf_folder(tmp_path / "src", arch)
    ref = load_hf_dir(src)
    ours = _build(ref, src, tmp_path / "squish", "squish")
    _build(ref, src, tmp_path / "rtn", "rtn")
    assert ours.recipe["architecture"] == arch and ours.recipe["awq_folds"]
    if arch == "qwen3_moe":  # the model's quant_predicate: 8-bit routers, as mlx_lm.convert does
        assert ours.quantization["model.layers.0.mlp.gate"]["bits"] == 8
    if arch in MOE_ARCHS:  # 32 x 48 tokens, top-2 of 4 experts: every expert sees enough
        assert ours.recipe["expert_fallback"] == {}
    kld = {}
    for name in ("squish", "rtn"):
        model, tok = load(str(tmp_path / name))  # unchanged mlx_lm: config + safetensors as written
        logits = model(mx.array([[1, 2, 3, 4]]))
        assert bool(mx.all(mx.isfinite(logits)))
        kld[name] = compare_models(ref, model, heldout_windows(tok, 96, 2))[0]["mean_kld"]
    assert kld["squish"] < 0.85 * kld["rtn"], kld


def test_tied_head_that_the_model_class_infers_from_the_weights(tmp_path):
    """gemma3_text (Gemma 3 270M, the catalog's gemma3:270m) builds an lm_head and drops
    it in ``sanitize`` when the weights have none: the build's graph must do the same."""
    import mlx.core as mx
    from mlx_lm import load

    src = make_hf_folder(tmp_path / "src", "gemma3_text")
    weights = mx.load(str(src / "model.safetensors"))
    del weights["lm_head.weight"]
    mx.save_safetensors(str(src / "model.safetensors"), weights, metadata={"format": "pt"})
    ref = load_hf_dir(src)
    _build(ref, src, tmp_path / "squish", "squish")
    model, _ = load(str(tmp_path / "squish"))
    assert model.tie_word_embeddings and "lm_head" not in model
    assert bool(mx.all(mx.isfinite(model(mx.array([[1, 2, 3, 4]])))))


def test_starved_experts_fall_back_and_are_recorded(tmp_path):
    src = make_hf_folder(tmp_path / "src", "qwen3_moe")
    ref = load_hf_dir(src)
    need = 10 ** 6  # more tokens than any expert sees: every expert falls back
    out = _build(ref, src, tmp_path / "q", "squish", min_expert_tokens=need)
    fb = out.recipe["expert_fallback"]
    assert set(fb) == {f"model.layers.{i}.mlp.switch_mlp.{p}" for i in range(2)
                       for p in ("gate_proj", "up_proj", "down_proj")}
    for entry in fb.values():
        assert entry["experts"] == [0, 1, 2, 3] and all(0 <= t < need for t in entry["tokens"])
        assert "clip-searched round-to-nearest" in entry["why"]


def test_unfoldable_modules_are_recorded_in_the_manifest(tmp_path):
    from squish.quant.pipeline import BuildOptions, build

    src = make_hf_folder(tmp_path / "src", "starcoder2")
    out = tmp_path / "art"
    build(str(src), BuildOptions(output=out, dtype="float32", calib_samples=4, calib_seq_len=32, quiet=True,
                                 keep_failed=True))
    recipe = json.loads((out / "squish.json").read_text())["quantization"]["recipe"]
    assert recipe["awq_unscaled"]["mlp.c_proj"]["blocks"] == "0-1"
    assert "not a per-channel linear" in recipe["awq_unscaled"]["mlp.c_proj"]["why"]


def test_architecture_mlx_lm_cannot_run_is_refused(tmp_path, capsys):
    src = make_hf_folder(tmp_path / "src", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "not_a_real_arch"
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "models" / "out"
    assert main(["quantize", str(src), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not_a_real_arch" in err and "unsupported architecture" in err
    assert not out.exists() and not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []
    cfg["model_type"] = "llama"
    with pytest.raises(InputError, match="not_a_real_arch"):
        from squish.quant.graph import build_model

        build_model({**cfg, "model_type": "not_a_real_arch"})
