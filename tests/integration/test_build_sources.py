"""`squish quantize` from Hugging Face folders of every catalog architecture (tiny random
weights: structure only), plus the build's failure paths: nothing is left behind."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_hf_folder  # noqa: E402

from squish.quant.pipeline import BuildOptions, build  # noqa: E402
from squish.cli.main import main  # noqa: E402
from squish.errors import InputError  # noqa: E402
from squish.runtime.loader import load_artifact  # noqa: E402

FAST = dict(calib_samples=2, calib_seq_len=32, quiet=True, keep_failed=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_hf_folder_round_trip(tmp_path, arch):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    src = make_hf_folder(tmp_path / f"src-{arch}", arch)
    out = tmp_path / "art"
    result = build(str(src), BuildOptions(output=out, dtype="float32", **FAST))
    assert result.path == out
    loaded = load_artifact(out)
    cfg = loaded.config
    assert cfg["model_type"] == arch and cfg["quantization"]["bits"] == 4
    params = dict(tree_flatten(loaded.model.parameters()))
    q = params["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == mx.uint32
    heads_dim = cfg["num_attention_heads"] * cfg.get("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
    assert q.shape == (heads_dim, cfg["hidden_size"] * 4 // 32)
    assert params["model.layers.0.self_attn.q_proj.scales"].dtype == mx.float32
    assert params["model.norm.weight"].dtype == mx.float32
    if arch == "qwen2":
        assert params["model.layers.0.self_attn.q_proj.bias"].dtype == mx.float32
    if arch == "qwen3":
        assert "model.layers.0.self_attn.q_norm.weight" in params
    manifest = loaded.manifest
    assert manifest["source"]["kind"] == "hf_dir"
    assert manifest["quantization"]["dtype"] == "float32"
    assert "passed" in manifest["quality"]
    assert manifest["calibration"]
    logits = loaded.model(mx.array([[1, 2, 3, 4]]))
    assert bool(mx.all(mx.isfinite(logits)))


def test_build_shows_a_progress_bar_per_stage_and_quiet_silences_them(tmp_path, capsys):
    src = make_hf_folder(tmp_path / "src", "llama")
    opts = {**FAST, "quiet": False}
    build(str(src), BuildOptions(output=tmp_path / "loud", dtype="float32", **opts))
    err = capsys.readouterr().err
    stages = [("calibration text", "token/s"), ("quantize", "block/s"), ("evaluation", "step/s")]
    for stage, rate in stages:
        assert f"{stage}: 100%" in err and rate in err, stage
    # in the order the build runs them, each closed before the next stage's message
    at = [err.rindex(f"{stage}: 100%") for stage, _ in stages]
    assert at == sorted(at)
    assert err.index("quantizing to INT4") > at[0] and err.index("evaluating against") > at[1]
    assert "[quantize]" not in err  # the old line per block is gone
    build(str(src), BuildOptions(output=tmp_path / "quiet", dtype="float32", **FAST))
    assert capsys.readouterr().err == ""


def test_already_quantized_folder_refused(tmp_path):
    src = make_hf_folder(tmp_path / "src", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"] = {"bits": 4, "group_size": 64}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="already quantized"):
        build(str(src), BuildOptions(output=tmp_path / "out", **FAST))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_refused(tmp_path, capsys):
    src = make_hf_folder(tmp_path / "src", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = "no_such_arch"
    (src / "config.json").write_text(json.dumps(cfg))
    assert main(["quantize", str(src), "-o", str(tmp_path / "out"), "--quiet"]) == 1
    assert "unsupported architecture" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_not_enough_disk(tmp_path, monkeypatch, capsys):
    import squish.hardware

    src = make_hf_folder(tmp_path / "src", "llama")
    monkeypatch.setattr(squish.hardware, "free_disk_bytes", lambda path: 1000)
    assert main(["quantize", str(src), "-o", str(tmp_path / "models" / "out")]) == 2
    assert "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import squish.quant.quantize as quantize

    src = make_hf_folder(tmp_path / "src", "llama")
    real = quantize.quantize_model

    def interrupted(ref, calib, spec, emit, progress=None):
        def emit_then_stop(name, array):
            emit(name, array)
            raise KeyboardInterrupt

        return real(ref, calib, spec, emit_then_stop, progress)

    monkeypatch.setattr(quantize, "quantize_model", interrupted)
    out = tmp_path / "models" / "out"
    with pytest.raises(KeyboardInterrupt):
        build(str(src), BuildOptions(output=out, **FAST))
    assert list((tmp_path / "models").iterdir()) == []


def test_existing_artifact_needs_force(tmp_path):
    src = make_hf_folder(tmp_path / "src", "llama")
    out = tmp_path / "out"
    build(str(src), BuildOptions(output=out, **FAST))
    with pytest.raises(InputError, match="already exists"):
        build(str(src), BuildOptions(output=out, **FAST))
    build(str(src), BuildOptions(output=out, force=True, **FAST))
    assert (out / "squish.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []




def _impossible_gate(monkeypatch):
    import squish.quant.evaluate as evaluate

    gate = evaluate.Thresholds(max_mean_kld=-1.0, min_top1=1.01, max_ppl_delta=-1.0)
    monkeypatch.setitem(evaluate.THRESHOLDS, 4, gate)


def test_failed_quality_gate_exits_1_and_leaves_nothing(tmp_path, monkeypatch, capsys):
    _impossible_gate(monkeypatch)
    src = make_hf_folder(tmp_path / "src", "llama")
    out = tmp_path / "models" / "out"
    args = ["quantize", str(src), "-o", str(out), "--calib-samples", "2", "--calib-seq-len", "32"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "failed its quality gate" in err and "no artifact was written" in err
    assert "mean KLD" in err  # the report table is printed
    assert list((tmp_path / "models").iterdir()) == []


def test_keep_failed_marks_the_artifact_failed(tmp_path, monkeypatch, capsys):
    from squish.config import models_dir
    from squish.models import resolve_model

    _impossible_gate(monkeypatch)
    src = make_hf_folder(tmp_path / "src", "llama")
    out = models_dir() / "tiny-4bit"
    args = ["quantize", str(src), "-o", str(out), "--calib-samples", "2", "--calib-seq-len", "32",
            "--keep-failed", "--quiet"]
    assert main(args) == 1  # kept, but the build still failed its gate
    manifest = json.loads((out / "squish.json").read_text())
    assert manifest["quality"]["passed"] is False
    capsys.readouterr()
    assert main(["models"]) == 0
    assert "FAILED" in capsys.readouterr().out
    with pytest.raises(InputError, match="no local model fits"):
        resolve_model(None)  # a failed build is never picked by zero-config serve
