"""GGUF reading on tiny hand-written files: header parsing, refusals (unsupported
types, truncation, unknown architecture), exact dequantization of Q8_0/Q4_0/Q4_1
and BF16, and a full ``load_gguf`` of a one-layer llama.

The writer below follows the GGUF v3 layout (magic, version, counts, key/values,
tensor table, alignment padding, data) so that types MLX cannot write itself
(Q4_K, ...) can be produced byte for byte.
"""

from __future__ import annotations

import hashlib
import json
import struct

import mlx.core as mx
import numpy as np
import pytest

from squish.quant.gguf import load_gguf, read_gguf_header, unpermute_qk_rows
from squish.errors import InputError

# ---- a minimal GGUF v3 writer -----------------------------------------------------------

_U32, _I32, _F32, _BOOL, _STR, _ARR = 4, 5, 6, 7, 8, 9
TYPE_IDS = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 8, "Q4_K": 12, "BF16": 30}


def _gstr(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v) -> tuple[int, bytes]:
    if isinstance(v, bool):
        return _BOOL, struct.pack("<?", v)
    if isinstance(v, int):
        return _U32, struct.pack("<I", v)
    if isinstance(v, float):
        return _F32, struct.pack("<f", v)
    if isinstance(v, str):
        return _STR, _gstr(v)
    if isinstance(v, list) and v and isinstance(v[0], str):
        return _ARR, struct.pack("<IQ", _STR, len(v)) + b"".join(_gstr(x) for x in v)
    if isinstance(v, list):
        return _ARR, struct.pack("<IQ", _I32, len(v)) + np.asarray(v, "<i4").tobytes()
    raise TypeError(v)


def write_gguf(path, meta: dict, tensors: list[tuple[str, tuple[int, ...], str, bytes]]) -> None:
    """``tensors``: (name, row-major shape, type name, raw bytes)."""
    out = bytearray(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(meta)))
    for k, v in meta.items():
        t, payload = _value(v)
        out += _gstr(k) + struct.pack("<I", t) + payload
    offsets, pos = [], 0
    for _, _, _, data in tensors:
        offsets.append(pos)
        pos = -(-(pos + len(data)) // 32) * 32
    for (name, shape, tname, _), off in zip(tensors, offsets):
        dims = list(reversed(shape))
        out += _gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", TYPE_IDS[tname], off)
    out += b"\0" * (-len(out) % 32)
    base = len(out)
    for (_, _, _, data), off in zip(tensors, offsets):
        out += b"\0" * (base + off - len(out)) + data
    path.write_bytes(bytes(out))


# ---- reference quantizers (GGML block layouts) ------------------------------------------

def q8_0(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Q8_0 bytes and the exact values GGML dequantizes them to."""
    blocks = x.reshape(-1, 32).astype(np.float32)
    d = (np.abs(blocks).max(1) / 127).astype(np.float16)
    q = np.round(blocks / np.where(d == 0, 1, d.astype(np.float32))[:, None]).astype(np.int8)
    raw = b"".join(di.tobytes() + qi.tobytes() for di, qi in zip(d, q))
    return raw, (d.astype(np.float32)[:, None] * q).reshape(x.shape)


def _pack4(q: np.ndarray) -> bytes:
    return (q[:, :16] | (q[:, 16:] << 4)).astype(np.uint8).tobytes()


def q4_1(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    blocks = x.reshape(-1, 32).astype(np.float32)
    lo, hi = blocks.min(1), blocks.max(1)
    d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
    df, mf = d.astype(np.float32)[:, None], m.astype(np.float32)[:, None]
    q = np.clip(np.round((blocks - mf) / np.where(df == 0, 1, df)), 0, 15).astype(np.uint8)
    raw = b"".join(d[i].tobytes() + m[i].tobytes() + _pack4(q[i:i + 1]) for i in range(len(q)))
    return raw, (df * q + mf).reshape(x.shape)


def q4_0(x: np.ndarray) -> tuple[bytes, np.ndarray]:
    blocks = x.reshape(-1, 32).astype(np.float32)
    amax = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(1)]
    d = (amax / -8).astype(np.float16)
    df = d.astype(np.float32)[:, None]
    q = np.clip(np.round(blocks / np.where(df == 0, 1, df)) + 8, 0, 15).astype(np.uint8)
    raw = b"".join(d[i].tobytes() + _pack4(q[i:i + 1]) for i in range(len(q)))
    return raw, (df * (q.astype(np.float32) - 8)).reshape(x.shape)


def f32(x: np.ndarray) -> bytes:
    return x.astype("<f4").tobytes()


# ---- a tiny llama -----------------------------------------------------------------------

def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable-character table, in byte order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY = dict(hidden=64, heads=2, kv_heads=1, ffn=96, layers=1)


def tiny_meta(arch="llama", **over):
    tokens = SPECIALS + byte_alphabet() + ["Ġt", "he"]
    meta = {
        "general.architecture": arch, "general.basename": "tiny", "general.size_label": "1K",
        f"{arch}.embedding_length": TINY["hidden"], f"{arch}.block_count": TINY["layers"],
        f"{arch}.feed_forward_length": TINY["ffn"], f"{arch}.attention.head_count": TINY["heads"],
        f"{arch}.attention.head_count_kv": TINY["kv_heads"], f"{arch}.context_length": 128,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.rope.freq_base": 10000.0,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.token_type": [3] * 3 + [1] * (len(tokens) - 3),
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}",
    }
    meta.update(over)
    return meta


def tiny_tensors(rng, q_type="Q8_0"):
    """(tensor list for the writer, {gguf name: exact float32 values})."""
    h, kv, hd = TINY["hidden"], TINY["kv_heads"], TINY["hidden"] // TINY["heads"]
    vocab = len(tiny_meta()["tokenizer.ggml.tokens"])
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,),
              "blk.0.attn_norm.weight": (h,), "blk.0.ffn_norm.weight": (h,),
              "blk.0.attn_q.weight": (h, h), "blk.0.attn_k.weight": (kv * hd, h),
              "blk.0.attn_v.weight": (kv * hd, h), "blk.0.attn_output.weight": (h, h),
              "blk.0.ffn_gate.weight": (TINY["ffn"], h), "blk.0.ffn_up.weight": (TINY["ffn"], h),
              "blk.0.ffn_down.weight": (h, TINY["ffn"])}
    quantizer = {"Q8_0": q8_0, "Q4_0": q4_0, "Q4_1": q4_1}
    out, exact = [], {}
    for name, shape in shapes.items():
        x = rng.standard_normal(shape).astype(np.float32) * (1.0 if len(shape) == 1 else 0.05)
        if name in ("blk.0.attn_q.weight", "blk.0.attn_k.weight"):
            raw, exact[name] = quantizer[q_type](x)
            out.append((name, shape, q_type, raw))
        else:
            out.append((name, shape, "F32", f32(x)))
            exact[name] = x
    return out, exact


# ---- tests ------------------------------------------------------------------------------

def test_header_reports_shapes_types_and_offsets(tmp_path):
    x = np.arange(64, dtype=np.float32).reshape(2, 32)
    raw, _ = q8_0(x)
    write_gguf(tmp_path / "a.gguf", {"general.architecture": "llama"},
               [("a", (2, 32), "F32", f32(x)), ("b", (2, 32), "Q8_0", raw)])
    h = read_gguf_header(tmp_path / "a.gguf")
    assert h.version == 3
    assert [(t.name, t.shape, t.type_name, t.nbytes) for t in h.tensors.values()] == [
        ("a", (2, 32), "F32", 256), ("b", (2, 32), "Q8_0", 68)]
    data = (tmp_path / "a.gguf").read_bytes()
    assert data[h.tensors["a"].offset:h.tensors["a"].offset + 256] == f32(x)


@pytest.mark.parametrize("kind,dequant", [("Q8_0", q8_0), ("Q4_0", q4_0), ("Q4_1", q4_1)])
def test_quantized_types_dequantize_exactly(tmp_path, kind, dequant):
    rng = np.random.default_rng(0)
    tensors, exact = tiny_tensors(rng, q_type=kind)
    write_gguf(tmp_path / "m.gguf", tiny_meta(), tensors)
    got = load_gguf(tmp_path / "m.gguf", tmp_path / "work").tensors()
    k = got["model.layers.0.self_attn.k_proj.weight"]
    assert k.dtype == mx.float32
    want = unpermute_qk_rows(mx.array(exact["blk.0.attn_k.weight"]), TINY["kv_heads"])
    np.testing.assert_array_equal(np.array(k), np.array(want))


def test_bf16_is_read_exactly_not_narrowed_to_float16(tmp_path):
    x = np.array([[1.5, -3.0e20, 1e-30, 7.0] * 16], np.float32)  # out of float16 range
    bf = (x.view(np.uint32) >> 16).astype("<u2")
    rng = np.random.default_rng(1)
    tensors, _ = tiny_tensors(rng)
    tensors = [(n, s, t, d) if n != "blk.0.attn_norm.weight" else (n, (64,), "BF16", bf.tobytes())
               for n, s, t, d in tensors]
    write_gguf(tmp_path / "m.gguf", tiny_meta(), tensors)
    got = load_gguf(tmp_path / "m.gguf", tmp_path / "w").tensors()["model.layers.0.input_layernorm.weight"]
    want = (bf.astype(np.uint32) << 16).view(np.float32).reshape(64)
    np.testing.assert_array_equal(np.array(got), want)


def test_unsupported_type_is_refused_by_name(tmp_path):
    write_gguf(tmp_path / "k.gguf", {"general.architecture": "llama"},
               [("blk.0.attn_q.weight", (2, 256), "Q4_K", bytes(2 * 144))])
    with pytest.raises(InputError) as e:
        load_gguf(tmp_path / "k.gguf", tmp_path / "w")
    msg = str(e.value)
    assert "Q4_K" in msg and "blk.0.attn_q.weight" in msg and "k.gguf" in msg
    assert "Q8_0" in msg and "BF16" in msg  # lists what is supported


def test_truncated_file_is_refused(tmp_path):
    tensors, _ = tiny_tensors(np.random.default_rng(2))
    write_gguf(tmp_path / "m.gguf", tiny_meta(), tensors)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:-100])
    with pytest.raises(InputError, match=r"cut\.gguf.*ffn_down\.weight.*truncated"):
        load_gguf(tmp_path / "cut.gguf", tmp_path / "w")
    (tmp_path / "head.gguf").write_bytes(data[:300])  # cut inside the metadata
    with pytest.raises(InputError, match=r"head\.gguf.*truncated"):
        load_gguf(tmp_path / "head.gguf", tmp_path / "w")


def test_not_a_gguf_and_missing_file_are_refused(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(InputError, match="not a GGUF"):
        load_gguf(tmp_path / "x.gguf", tmp_path / "w")
    with pytest.raises(InputError, match="no such"):
        load_gguf(tmp_path / "absent.gguf", tmp_path / "w")


def test_unknown_architecture_is_refused(tmp_path):
    tensors, _ = tiny_tensors(np.random.default_rng(3))
    write_gguf(tmp_path / "g.gguf", tiny_meta(arch="gemma3"), tensors)
    with pytest.raises(InputError, match=r"architecture 'gemma3'.*llama, qwen2, qwen3"):
        load_gguf(tmp_path / "g.gguf", tmp_path / "w")


def test_unknown_tensor_is_refused(tmp_path):
    tensors, _ = tiny_tensors(np.random.default_rng(4))
    tensors.append(("rope_freqs.weight", (16,), "F32", f32(np.ones(16, np.float32))))
    write_gguf(tmp_path / "r.gguf", tiny_meta(), tensors)
    with pytest.raises(InputError, match="rope_freqs.weight.*llama3-style"):
        load_gguf(tmp_path / "r.gguf", tmp_path / "w")


def test_nan_in_norm_is_refused(tmp_path):
    tensors, _ = tiny_tensors(np.random.default_rng(5))
    bad = np.ones(64, np.float32)
    bad[3] = np.nan
    tensors = [(n, s, t, f32(bad) if n == "output_norm.weight" else d) for n, s, t, d in tensors]
    write_gguf(tmp_path / "n.gguf", tiny_meta(), tensors)
    with pytest.raises(InputError, match="output_norm.weight.*NaN"):
        load_gguf(tmp_path / "n.gguf", tmp_path / "w")


def test_tiny_llama_loads_end_to_end(tmp_path):
    from mlx_lm.utils import _get_classes

    tensors, exact = tiny_tensors(np.random.default_rng(6))
    path = tmp_path / "Tiny-Instruct.Q8_0.gguf"
    write_gguf(path, tiny_meta(), tensors)
    ref = load_gguf(path, tmp_path / "work")

    assert ref.name == "tiny-1k-instruct"
    assert ref.source == {"kind": "gguf", "id": path.name,
                          "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                          "file_types": {"F32": 9, "Q8_0": 2}}
    c = ref.config
    assert (c["model_type"], c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"],
            c["head_dim"], c["rms_norm_eps"], c["tie_word_embeddings"], c["bos_token_id"]) == (
        "llama", 64, 2, 1, 32, 1e-5, True, 1)
    assert "quantization" not in c

    w = ref.tensors()
    assert all(v.dtype == mx.float32 for v in w.values())
    assert "lm_head.weight" not in w
    q = np.array(w["model.layers.0.self_attn.q_proj.weight"])
    # Row 1 of head 0 in HF layout is GGUF row 2 (pairs interleaved by llama.cpp).
    np.testing.assert_array_equal(q[1], exact["blk.0.attn_q.weight"][2])
    np.testing.assert_array_equal(q[16], exact["blk.0.attn_q.weight"][1])
    np.testing.assert_array_equal(np.array(w["model.layers.0.mlp.down_proj.weight"]),
                                  exact["blk.0.ffn_down.weight"])

    model_cls, args_cls = _get_classes(c)
    model = model_cls(args_cls.from_dict(c))
    model.load_weights(list(w.items()), strict=True)
    logits = model(mx.array([[3, 4, 5]]))
    assert logits.shape == (1, 3, c["vocab_size"]) and bool(mx.all(mx.isfinite(logits)))

    tok_dir = ref.tokenizer_dir
    assert tok_dir == tmp_path / "work" / "tokenizer"
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>"
    assert "chat_template" in cfg and (tok_dir / "tokenizer.json").is_file()


def test_qwen2_biases_map_and_are_not_permuted(tmp_path):
    rng = np.random.default_rng(7)
    tensors, exact = tiny_tensors(rng)
    bias = rng.standard_normal(64).astype(np.float32)
    tensors.append(("blk.0.attn_q.bias", (64,), "F32", f32(bias)))
    for b in ("k", "v"):
        tensors.append((f"blk.0.attn_{b}.bias", (32,), "F32", f32(np.zeros(32, np.float32))))
    write_gguf(tmp_path / "q.gguf", tiny_meta(arch="qwen2"), tensors)
    ref = load_gguf(tmp_path / "q.gguf", tmp_path / "w")
    w = ref.tensors()
    assert ref.config["model_type"] == "qwen2" and not ref.notes
    np.testing.assert_array_equal(np.array(w["model.layers.0.self_attn.q_proj.bias"]), bias)
    np.testing.assert_array_equal(np.array(w["model.layers.0.self_attn.q_proj.weight"]),
                                  exact["blk.0.attn_q.weight"])


def test_qwen3_q_k_norms_map(tmp_path):
    rng = np.random.default_rng(8)
    tensors, _ = tiny_tensors(rng)
    norms = {n: rng.standard_normal(32).astype(np.float32) for n in ("attn_q_norm", "attn_k_norm")}
    tensors += [(f"blk.0.{n}.weight", (32,), "F32", f32(v)) for n, v in norms.items()]
    write_gguf(tmp_path / "q3.gguf", tiny_meta(arch="qwen3", **{"qwen3.attention.key_length": 32}),
               tensors)
    ref = load_gguf(tmp_path / "q3.gguf", tmp_path / "w")
    w = ref.tensors()
    assert ref.config["model_type"] == "qwen3" and ref.config["head_dim"] == 32
    np.testing.assert_array_equal(np.array(w["model.layers.0.self_attn.k_norm.weight"]),
                                  norms["attn_k_norm"])
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(ref.config)
    model_cls(args_cls.from_dict(ref.config)).load_weights(list(w.items()), strict=True)
