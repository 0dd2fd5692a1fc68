"""``squish quantize FILE.gguf --keep-gguf-codes``: the GGUF file's own codes carried into
MLX's affine format. Every exact type gives, through ``mx.dequantize``, the values the
``gguf`` library's own dequantizer gives; a tiny model built this way computes the
logits of its dequantized reference (llama's Q/K rows reordered as codes); the types
MLX cannot hold are rounded at 8 bits and named in the recipe; misuse is refused."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_tiny import blocks_for, mlx_model, write_gguf, write_model  # noqa: E402

from squish.errors import InputError, SystemFailure  # noqa: E402
from squish.quant import gguf_codes  # noqa: E402
from squish.quant.gguf import load_gguf  # noqa: E402
from squish.quant.gguf_codes import keep_codes, kept_bits, read_codes  # noqa: E402
from squish.quant.gguf_file import open_gguf  # noqa: E402
from squish.quant.packing import pack  # noqa: E402

EXACT = {"Q4_0": 4, "Q4_1": 4, "Q5_0": 5, "Q5_1": 5, "Q8_0": 8, "Q4_K": 4, "Q5_K": 5}
IDS = mx.array([[5, 40, 41, 7, 90, 3, 12, 60, 61, 62, 63, 9]])


@pytest.mark.parametrize("type_name", sorted(EXACT))
def test_kept_codes_dequantize_to_the_librarys_values(tmp_path, type_name, monkeypatch):
    rng = np.random.default_rng(sorted(EXACT).index(type_name))
    raw = blocks_for(type_name, 6, rng)
    if type_name in ("Q4_K", "Q5_K"):  # one sub-block with scale 0: its codes carry nothing
        raw[0, 4] &= 0xC0
    path = write_gguf(tmp_path / "t.gguf", "llama", {}, {"t": (raw, type_name)})
    info = open_gguf(path).tensors["t"]
    monkeypatch.setattr(gguf_codes, "CHUNK_BYTES", 2 * 4 * info.shape[-1])  # chunked too
    q, s, b, bits = read_codes(path, info)
    assert bits == EXACT[type_name] == kept_bits(type_name)
    assert q.dtype == np.uint8 and int(q.max()) < 2 ** bits
    assert s.shape == b.shape == (info.shape[0], info.shape[1] // 32)
    got = mx.dequantize(mx.array(pack(q, bits)), mx.array(s), mx.array(b), group_size=32, bits=bits)
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    np.testing.assert_array_equal(np.array(got), want)


@pytest.mark.parametrize("type_name", ["Q6_K", "Q3_K", "Q2_K", "IQ4_NL", "F16", "BF16"])
def test_types_mlx_cannot_hold_are_not_kept(type_name):
    assert kept_bits(type_name) is None


def test_a_layout_change_in_the_library_is_caught(tmp_path, monkeypatch):
    raw = blocks_for("Q4_1", 2, np.random.default_rng(0))
    path = write_gguf(tmp_path / "t.gguf", "llama", {}, {"t": (raw, "Q4_1")})
    monkeypatch.setitem(gguf_codes._EXACT, "Q4_1", (4, 0, None, 0, False))  # forget the min
    with pytest.raises(SystemFailure, match="do not reproduce"):
        read_codes(path, open_gguf(path).tensors["t"])


def _build(ref):
    out: dict[str, mx.array] = {}
    outcome = keep_codes(ref, "float32", out.__setitem__)
    return outcome, out


def _quantized_model(config: dict, qcfg: dict, weights: dict):
    """The model as mlx_lm.load builds it from an artifact's config and weights."""
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)

    def pred(path, module):
        if f"{path}.scales" not in weights:
            return False
        c = qcfg.get(path)
        return c if isinstance(c, dict) else True

    nn.quantize(model, group_size=qcfg["group_size"], bits=qcfg["bits"], class_predicate=pred)
    model.load_weights(list(weights.items()), strict=True)
    model.eval()
    return model


QTYPES = {"attn_q": "Q4_0", "attn_k": "Q5_0", "attn_v": "Q5_1", "attn_output": "Q4_1",
          "ffn_gate": "Q8_0", "ffn_up": "Q4_0", "ffn_down": "Q4_1", "token_embd": "Q8_0"}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_a_kept_model_computes_its_references_logits(tmp_path, family):
    path, _, _ = write_model(tmp_path / f"{family}.gguf", family, qtypes=QTYPES)
    ref = load_gguf(path, tmp_path / "work")
    outcome, weights = _build(ref)
    recipe, qcfg = outcome.recipe, outcome.quantization
    assert recipe["method"] == "gguf-codes" and recipe["rounded"] == {}
    assert recipe["kept_gguf_types"]["Q4_0"] == 4 and recipe["kept_gguf_types"]["Q8_0"] == 3
    assert qcfg["bits"] == 4 and qcfg["group_size"] == 32
    assert qcfg["model.layers.0.self_attn.k_proj"] == {"group_size": 32, "bits": 5, "mode": "affine"}
    assert weights["model.layers.1.mlp.gate_proj.weight"].dtype == mx.uint32
    t = ref.tensors()
    want = mlx_model(ref.config, {k: t[k] for k in t})(IDS)
    got = _quantized_model(ref.config, qcfg, weights)(IDS)
    assert bool(mx.all(mx.isfinite(got)))
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=1e-4)


def test_without_the_row_order_llama_logits_differ(tmp_path, monkeypatch):
    """The check above can fail: keep llama's Q/K codes in the file's row order."""
    from squish.quant import gguf_arch

    path, _, _ = write_model(tmp_path / "l.gguf", "llama", qtypes=QTYPES)
    ref = load_gguf(path, tmp_path / "work")
    t = ref.tensors()
    want = mlx_model(ref.config, {k: t[k] for k in t})(IDS)
    monkeypatch.setattr(gguf_arch.Family, "row_order", lambda self, name, rows, config: None)
    outcome, weights = _build(load_gguf(path, tmp_path / "work2"))
    got = _quantized_model(ref.config, outcome.quantization, weights)(IDS)
    assert float(mx.abs(got - want).max()) > 1e-2


def test_other_types_are_rounded_at_8_bits_and_named(tmp_path):
    path, _, _ = write_model(tmp_path / "q.gguf", "qwen2", qtypes={**QTYPES, "ffn_down": "BF16"})
    ref = load_gguf(path, tmp_path / "work")
    outcome, weights = _build(ref)
    rounded = outcome.recipe["rounded"]
    assert set(rounded) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert rounded["model.layers.0.mlp.down_proj"]["type"] == "BF16"
    q = outcome.quantization
    assert q.get("model.layers.0.mlp.down_proj", q)["bits"] == 8
    t = ref.tensors()
    want = mlx_model(ref.config, {k: t[k] for k in t})(IDS)
    got = _quantized_model(ref.config, outcome.quantization, weights)(IDS)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=0, atol=5e-2)


def test_a_file_missing_a_weight_is_refused(tmp_path):
    path, _, _ = write_model(tmp_path / "m.gguf", "llama", qtypes=QTYPES)
    ref = load_gguf(path, tmp_path / "work")
    whole = ref.load_tensors

    def fewer():
        t = whole()
        t.pop("model.layers.1.mlp.up_proj.weight")
        return t

    ref.load_tensors = fewer
    with pytest.raises(InputError, match="lacks 1 tensor"):
        keep_codes(ref, "float32", lambda k, v: None)


def test_a_safetensors_source_is_refused(tmp_path):
    from squish.quant.reference import Reference

    ref = Reference("m", {"model_type": "llama"}, tmp_path, {"kind": "hf_dir"}, lambda: {})
    with pytest.raises(InputError, match="needs a GGUF source"):
        keep_codes(ref, "float32", lambda k, v: None)


@pytest.mark.parametrize("extra", [["--bits", "4"], ["--group-size", "32"], ["--calib-samples", "8"]])
def test_the_cli_refuses_options_that_cannot_apply(tmp_path, capsys, extra, monkeypatch):
    from squish.cli.main import main

    monkeypatch.setenv("SQUISH_HOME", str(tmp_path / "home"))
    path, _, _ = write_model(tmp_path / "m.gguf", "llama", qtypes=QTYPES)
    code = main(["quantize", str(path), "--keep-gguf-codes", *extra, "-o", str(tmp_path / "out")])
    assert code == 1
    assert "--keep-gguf-codes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_cli_builds_and_records_the_recipe(tmp_path, monkeypatch):
    from squish.cli.main import main

    monkeypatch.setenv("SQUISH_HOME", str(tmp_path / "home"))
    path, _, _ = write_model(tmp_path / "m.gguf", "qwen2", qtypes=QTYPES)
    out = tmp_path / "out"
    assert main(["quantize", str(path), "--keep-gguf-codes", "-q", "--keep-failed", "-o", str(out)]) in (0, 1)
    manifest = json.loads((out / "squish.json").read_text())
    q = manifest["quantization"]
    assert q["recipe"]["method"] == "gguf-codes" and (q["bits"], q["group_size"]) == (4, 32)
    assert manifest["calibration"] is None
    assert json.loads((out / "config.json").read_text())["quantization"]["group_size"] == 32


def test_the_cli_refuses_a_folder_source(tmp_path, capsys, monkeypatch):
    from tiny import make_hf_folder

    from squish.cli.main import main

    monkeypatch.setenv("SQUISH_HOME", str(tmp_path / "home"))
    folder = make_hf_folder(tmp_path / "hf", "llama")
    assert main(["quantize", str(folder), "--keep-gguf-codes", "-o", str(tmp_path / "out")]) == 1
    assert "--keep-gguf-codes needs a GGUF file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
