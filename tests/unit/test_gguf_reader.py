"""The GGUF container on small files written with the ``gguf`` library's GGUFWriter:
every supported tensor type dequantizes exactly as the library's own reference does,
and bad files are refused with a message naming the file and the problem (also
through ``squish quantize``: exit code 1, nothing left behind)."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_tiny import blocks_for, write_gguf, write_model  # noqa: E402

from squish.errors import InputError  # noqa: E402
from squish.quant import gguf_file  # noqa: E402
from squish.quant.gguf import load_gguf  # noqa: E402
from squish.quant.gguf_file import SUPPORTED_TYPES, open_gguf  # noqa: E402

@pytest.mark.parametrize("type_name", SUPPORTED_TYPES)
def test_every_type_dequantizes_as_the_library_does(tmp_path, type_name, monkeypatch):
    rng = np.random.default_rng(list(SUPPORTED_TYPES).index(type_name))
    raw = blocks_for(type_name, 5, rng)
    if raw.dtype == np.uint8:
        tensors = {"t": (raw, type_name)}
    else:
        tensors = {"t": raw}
    path = write_gguf(tmp_path / "t.gguf", "llama", {}, tensors)
    g = open_gguf(path)
    assert g.tensors["t"].type_name == type_name
    # Two rows per dequantization step: the chunking is exercised too.
    monkeypatch.setattr(gguf_file, "CHUNK_BYTES", 2 * 4 * g.tensors["t"].shape[-1])
    got = g.read("t")
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[type_name])
    assert got.dtype == np.float32 and got.shape == want.shape == g.tensors["t"].shape
    assert np.isfinite(want).all()
    np.testing.assert_array_equal(got, want)


def test_quantized_values_are_close_to_the_source(tmp_path):
    """The reference check above compares with the library; this one with the floats."""
    x = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for type_name, tol in (("Q8_0", 0.02), ("Q5_1", 0.1), ("Q4_0", 0.3), ("BF16", 0.01)):
        raw = gguf.quants.quantize(x, gguf.GGMLQuantizationType[type_name])
        path = write_gguf(tmp_path / f"{type_name}.gguf", "llama", {}, {"t": (raw, type_name)})
        assert np.abs(open_gguf(path).read("t") - x).max() < tol, type_name


def test_metadata_values_are_decoded(tmp_path):
    meta = {"a.int": 7, "a.float": 0.5, "a.bool": True, "a.str": "héllo",
            "a.strs": ["x", "", "✓"], "a.ints": [1, 2, 3]}
    g = open_gguf(write_gguf(tmp_path / "m.gguf", "llama", meta, {"t": np.ones((1, 32), np.float32)}))
    m = g.metadata
    assert (m["a.int"], m["a.float"], m["a.bool"], m["a.str"], m["a.strs"]) == (7, 0.5, True, "héllo",
                                                                              ["x", "", "✓"])
    assert m["a.ints"].tolist() == [1, 2, 3] and m["general.architecture"] == "llama"


# --- refusals --------------------------------------------------------------------------

def _tiny(tmp_path, name="m.gguf"):
    path, _, _ = write_model(tmp_path / name, "llama")
    return path


def test_truncated_file_is_refused(tmp_path):
    data = _tiny(tmp_path).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(InputError, match=r"cut\.gguf: tensor '.*' ends at byte .* truncated"):
        load_gguf(tmp_path / "cut.gguf", tmp_path / "w")
    (tmp_path / "head.gguf").write_bytes(data[:300])  # cut inside the metadata
    with pytest.raises(InputError, match=r"head\.gguf: GGUF header is truncated"):
        load_gguf(tmp_path / "head.gguf", tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_not_a_gguf_and_missing_file_are_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(InputError, match=r"x\.gguf: not a GGUF file"):
        load_gguf(tmp_path / "x.gguf", tmp_path / "w")
    with pytest.raises(InputError, match="no such"):
        load_gguf(tmp_path / "absent.gguf", tmp_path / "w")


def _patch_type(path: Path, tensor: str, type_id: int) -> None:
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    at += 4 + 8 * n_dims
    data[at:at + 4] = type_id.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_corrupt_tensor_type_is_refused(tmp_path):
    path = _tiny(tmp_path)
    _patch_type(path, "blk.0.ffn_up.weight", 200)
    with pytest.raises(InputError, match=r"m\.gguf: tensor 'blk\.0\.ffn_up\.weight' has unknown ggml type id 200"):
        load_gguf(path, tmp_path / "w")


def test_unsupported_type_is_refused_by_name(tmp_path):
    raw = np.zeros((2, 292), np.uint8)  # one Q8_K block per row (an intermediate type)
    path = write_gguf(tmp_path / "k.gguf", "llama", {}, {"blk.0.attn_q.weight": (raw, "Q8_K")})
    with pytest.raises(InputError) as e:
        load_gguf(path, tmp_path / "w")
    msg = str(e.value)
    assert "k.gguf" in msg and "Q8_K" in msg and "blk.0.attn_q.weight" in msg
    assert "Q4_K" in msg and "IQ4_XS" in msg  # says what is supported


def test_unknown_architecture_is_refused(tmp_path):
    from gguf_tiny import bpe_vocab

    path = write_gguf(tmp_path / "r.gguf", "rwkv6", bpe_vocab(), {"token_embd.weight": np.ones((4, 32), np.float32)})
    with pytest.raises(InputError, match=r"architecture 'rwkv6' is not supported.*gemma3, llama, phi3"):
        load_gguf(path, tmp_path / "w")


def test_llama3_rope_frequencies_are_refused(tmp_path):
    path = _tiny(tmp_path)
    g = open_gguf(path)
    tensors = {n: g.read(n) for n in g.tensors} | {"rope_freqs.weight": np.ones(8, np.float32)}
    meta = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in g.metadata.items()
            if k != "general.architecture"}
    bad = write_gguf(tmp_path / "r.gguf", "llama", meta, tensors)
    with pytest.raises(InputError, match=r"r\.gguf: GGUF has 'rope_freqs.weight'"):
        load_gguf(bad, tmp_path / "w")


def test_nan_is_refused_naming_the_tensor(tmp_path):
    path = _tiny(tmp_path)
    g = open_gguf(path)
    info = g.tensors["output_norm.weight"]
    data = bytearray(path.read_bytes())
    data[info.offset:info.offset + 4] = np.array([np.nan], np.float32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"m\.gguf: tensor 'output_norm.weight' contains NaN"):
        load_gguf(path, tmp_path / "w")
    info = g.tensors["blk.0.ffn_down.weight"]  # a matrix: checked when it is read
    data[info.offset:info.offset + 4] = np.array([np.inf], np.float32).tobytes()
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="ffn_down.weight' contains NaN or Inf"):
        gguf_file.read_tensor(path, info)


@pytest.mark.parametrize("case", ["truncated", "unsupported type", "architecture"])
def test_squish_quantize_refuses_with_exit_1_and_leaves_nothing(tmp_path, capsys, case):
    from squish.cli.main import main
    from squish.config import cache_dir

    path = _tiny(tmp_path)
    if case == "truncated":
        path.write_bytes(path.read_bytes()[:-64])
        want = "truncated"
    elif case == "unsupported type":
        _patch_type(path, "blk.0.ffn_up.weight", 26)  # I32: as many bytes as F32
        want = "I32"
    else:
        data = path.read_bytes().replace(b"\x05\x00\x00\x00\x00\x00\x00\x00llama", b"\x05\x00\x00\x00\x00\x00\x00\x00bloom", 1)
        path.write_bytes(data)
        want = "architecture 'bloom'"
    out = tmp_path / "models" / "out"
    assert main(["quantize", str(path), "-o", str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and want in err, err
    assert not out.exists() and not (tmp_path / "models").exists()
    assert not cache_dir().exists() or list(cache_dir().iterdir()) == []
