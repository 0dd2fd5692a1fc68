"""GGUF source: turn a llama.cpp ``.gguf`` file into a :class:`Reference`.

What happens, and why:

- The header is parsed here in plain Python (:func:`read_gguf_header`) before
  MLX touches the file. MLX's reader silently converts some types it does not
  keep (BF16 → float16, losing range; Q2_K/Q4_K/Q6_K → float16), fails with
  an opaque message on others and drops MXFP4 tensors without a word. Parsing
  the tensor table ourselves lets us refuse unsupported types and truncated
  files with a message that names the tensor, and count the file's types for
  the manifest.
- Weights come from ``mx.load`` (Q4_0/Q4_1/Q8_0 arrive as MLX affine triplets,
  group size 32). ``mx.load`` on a GGUF reads the whole file eagerly (measured:
  active memory grows by the file size), so ``load_tensors`` re-reads the file
  on each call and returns *lazy* float32 expressions over it: the quantized
  file stays resident while the dict lives, the float32 weights only when a
  consumer evaluates them. BF16 tensors are read with numpy instead, since MLX
  would narrow them to float16.
- llama.cpp permutes the Q/K rows of llama-architecture models for its
  interleaved ("traditional") RoPE. We undo that so the artifact runs with
  mlx_lm's default ``rope_traditional: false``. Qwen2/Qwen3 conversions are
  not permuted (their converter class does not apply the permutation).
- The tokenizer is rebuilt from metadata by :mod:`squish.quant.gguf_tokenizer`.
"""

from __future__ import annotations

import hashlib
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from squish.quant.reference import Reference
from squish.errors import InputError

GROUP_SIZE = 32  # every GGUF type we accept has 32-element blocks

# ggml type id -> (name, elements per block, bytes per block). Complete enough to
# name what we refuse and to size every tensor for the truncation check.
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}
FLOAT_TYPES = {"F32", "F16", "BF16"}
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}  # MLX returns these as affine triplets
SUPPORTED_TYPES = FLOAT_TYPES | set(QUANT_BITS)

# GGUF metadata value types: id -> struct format (scalars), 8 = string, 9 = array.
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the GGUF tensor table; ``shape`` is row-major (MLX order)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    tensors: dict[str, TensorInfo]
    file_size: int


class _Reader:
    """Bounds-checked little-endian reads; a short read means a truncated file."""

    def __init__(self, f: BinaryIO, path: Path, size: int):
        self.f, self.path, self.size = f, path, size

    def read(self, n: int) -> bytes:
        if n < 0 or self.f.tell() + n > self.size:
            raise InputError(f"{self.path}: GGUF header is truncated or corrupt "
                             f"(wants {n} bytes at offset {self.f.tell()}, file has {self.size})")
        return self.f.read(n)

    def scalar(self, fmt: str) -> Any:
        return struct.unpack("<" + fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = self.read(self.scalar("Q"))
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{self.path}: GGUF header has a string that is not UTF-8") from e

    def skip_value(self, vtype: int) -> None:
        if vtype in _SCALAR_FMT:
            self.read(struct.calcsize(_SCALAR_FMT[vtype]))
        elif vtype == _STRING:
            self._seek(self.scalar("Q"))
        elif vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype in _SCALAR_FMT:
                self._seek(count * struct.calcsize(_SCALAR_FMT[etype]))
            else:
                for _ in range(count):
                    self.skip_value(etype)
        else:
            raise InputError(f"{self.path}: GGUF metadata has unknown value type {vtype}")

    def _seek(self, n: int) -> None:
        if self.f.tell() + n > self.size:
            raise InputError(f"{self.path}: GGUF header is truncated or corrupt")
        self.f.seek(n, 1)


def read_gguf_header(path: Path) -> GGUFHeader:
    """Parse a GGUF (v2/v3) header and tensor table; check every tensor lies inside the file.

    Raises :class:`InputError` for a file that is not GGUF, an unsupported version,
    a truncated header, an unknown tensor type or tensor data past the end of the file.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        if size < 24 or r.read(4) != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (missing 'GGUF' magic)")
        version = r.scalar("I")
        if version not in (2, 3):
            raise InputError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = r.scalar("Q"), r.scalar("Q")
        if n_tensors > size // 24 or n_kv > size // 12:
            raise InputError(f"{path}: GGUF header is corrupt ({n_tensors} tensors, {n_kv} keys)")
        alignment = 32
        for _ in range(n_kv):
            key, vtype = r.string(), r.scalar("I")
            if key == "general.alignment" and vtype in _SCALAR_FMT:
                alignment = int(r.scalar(_SCALAR_FMT[vtype]))
            else:
                r.skip_value(vtype)
        raw = []
        for _ in range(n_tensors):
            name, n_dims = r.string(), r.scalar("I")
            if not 1 <= n_dims <= 4:
                raise InputError(f"{path}: tensor '{name}' has {n_dims} dimensions (corrupt header)")
            dims = [r.scalar("Q") for _ in range(n_dims)]
            raw.append((name, dims, r.scalar("I"), r.scalar("Q")))
        if alignment <= 0:
            raise InputError(f"{path}: GGUF general.alignment is {alignment}")
        data_start = -(-f.tell() // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, rel in raw:
        if type_id not in GGML_TYPES:
            raise InputError(f"{path}: tensor '{name}' has unknown ggml type id {type_id}")
        tname, block, block_bytes = GGML_TYPES[type_id]
        if dims[0] % block:
            raise InputError(f"{path}: tensor '{name}' ({tname}) row length {dims[0]} "
                             f"is not a multiple of the block size {block}")
        nbytes = int(np.prod(dims[1:], dtype=np.int64)) * (dims[0] // block) * block_bytes
        start = data_start + rel
        if start + nbytes > size:
            raise InputError(f"{path}: tensor '{name}' ends at byte {start + nbytes} but the file has "
                             f"{size} bytes: the file is truncated (incomplete download?)")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), tname, start, nbytes)
    return GGUFHeader(version, tensors, size)


# --- names -----------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_LLAMA_LAYER = {f"{k}.weight" for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                                        "ffn_up", "ffn_down", "attn_norm", "ffn_norm")}


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    architectures: str  # the HF class name, for config.json
    qk_permuted: bool  # llama.cpp permuted Q/K rows for interleaved RoPE
    layer_tensors: frozenset[str]


ARCHITECTURES = {
    "llama": ArchSpec("llama", "LlamaForCausalLM", True, frozenset(_LLAMA_LAYER)),
    "qwen2": ArchSpec("qwen2", "Qwen2ForCausalLM", False, frozenset(
        _LLAMA_LAYER | {"attn_q.bias", "attn_k.bias", "attn_v.bias"})),
    "qwen3": ArchSpec("qwen3", "Qwen3ForCausalLM", False, frozenset(
        _LLAMA_LAYER | {"attn_q_norm.weight", "attn_k_norm.weight"})),
}

_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def mlx_name(gguf_name: str, arch: str) -> str:
    """mlx_lm name of a GGUF tensor, e.g. ``blk.3.attn_output.weight`` ->
    ``model.layers.3.self_attn.o_proj.weight``. Unknown names raise :class:`InputError`."""
    spec = _arch_spec(arch)
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and f"{m[2]}.{m[3]}" in spec.layer_tensors:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"
    raise InputError(f"GGUF tensor '{gguf_name}' is not supported for architecture '{arch}' "
                     "(Squish cannot map it to an mlx_lm weight)")


def _arch_spec(arch: str) -> ArchSpec:
    if arch not in ARCHITECTURES:
        raise InputError(f"GGUF architecture '{arch}' is not supported; supported: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch]


# --- Q/K row permutation ---------------------------------------------------------------

def unpermute_qk_rows(x: Any, n_heads: int) -> Any:
    """Undo llama.cpp's Q/K row permutation (rows only; works on float weights, on
    biases and on each part of a packed quantized triplet alike).

    llama.cpp's converter maps HF row ``h*D + j*(D/2) + i`` to GGUF row
    ``h*D + 2*i + j`` (j in {0, 1}: the two RoPE halves become interleaved pairs).
    """
    rows = x.shape[0]
    if rows % (2 * n_heads):
        raise InputError(f"Q/K tensor with {rows} rows cannot be split into {n_heads} heads "
                         "of even size")
    head = rows // n_heads
    rest = tuple(x.shape[1:])
    return x.reshape(n_heads, head // 2, 2, *rest).swapaxes(1, 2).reshape(rows, *rest)


# --- config ----------------------------------------------------------------------------

def _scalar(v: Any) -> Any:
    """Metadata values from ``mx.load`` are 0-d arrays; return plain Python values."""
    return v.item() if hasattr(v, "item") else v


def _clean_float(x: float) -> float:
    """Shortest decimal that round-trips in float32 (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(x)))


def build_config(meta: dict[str, Any], header: GGUFHeader) -> dict[str, Any]:
    """HF / mlx_lm ``config.json`` dict (no quantization block) from ``<arch>.*`` metadata."""
    arch = str(meta.get("general.architecture", ""))
    spec = _arch_spec(arch)

    def get(key: str, default: Any = None, required: bool = True) -> Any:
        full = f"{arch}.{key}"
        if full not in meta:
            if required and default is None:
                raise InputError(f"GGUF metadata key '{full}' is missing")
            return default
        return _scalar(meta[full])

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    embed = header.tensors.get("token_embd.weight")
    if embed is None:
        raise InputError("GGUF has no 'token_embd.weight' tensor")
    vocab = int(get("vocab_size", embed.shape[0]))
    if embed.shape != (vocab, hidden):
        raise InputError(f"GGUF token_embd.weight has shape {embed.shape}, expected "
                         f"(vocab_size {vocab}, embedding_length {hidden})")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise InputError(f"GGUF partial RoPE ({rope_dims} of {head_dim} dims) is not supported")
    if "rope_freqs.weight" in header.tensors:
        raise InputError("GGUF has 'rope_freqs.weight' (llama3-style RoPE frequency factors), "
                         "which Squish cannot turn back into an mlx_lm rope_scaling config")
    config: dict[str, Any] = {
        "model_type": spec.model_type,
        "architectures": [spec.architectures],
        "hidden_act": "silu",
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _clean_float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _clean_float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length")),
        "vocab_size": vocab,
        "tie_word_embeddings": "output.weight" not in header.tensors,
    }
    scaling = str(get("rope.scaling.type", "none"))
    if scaling == "linear":
        config["rope_scaling"] = {"type": "linear", "factor": _clean_float(get("rope.scaling.factor"))}
    elif scaling == "yarn":
        config["rope_scaling"] = {"type": "yarn", "factor": _clean_float(get("rope.scaling.factor")),
                                  "original_max_position_embeddings":
                                      int(get("rope.scaling.original_context_length"))}
    elif scaling != "none":
        raise InputError(f"GGUF rope scaling type '{scaling}' is not supported (none, linear, yarn)")
    for key in ("bos_token_id", "eos_token_id"):
        if f"tokenizer.ggml.{key}" in meta:
            config[key] = int(_scalar(meta[f"tokenizer.ggml.{key}"]))
    _check_instantiable(config)
    return config


def _check_instantiable(config: dict[str, Any]) -> None:
    from mlx_lm.utils import _get_classes

    try:
        _, args_cls = _get_classes(config)
        args_cls.from_dict(config)
    except (ValueError, TypeError, KeyError) as e:
        raise InputError(f"GGUF config does not instantiate as mlx_lm "
                         f"'{config['model_type']}': {e}") from e


# --- tensors ---------------------------------------------------------------------------

def _mx_load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    import mlx.core as mx

    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise InputError(f"{path}: MLX could not read the GGUF: {e}") from e


def _read_bf16(path: Path, info: TensorInfo) -> Any:
    """BF16 tensor as float32, read with numpy (MLX's reader would narrow it to float16)."""
    import mlx.core as mx

    raw = np.fromfile(path, dtype="<u2", count=info.nbytes // 2, offset=info.offset)
    return mx.array((raw.astype(np.uint32) << 16).view(np.float32).reshape(info.shape))


def _float_tensor(arrays: dict[str, Any], info: TensorInfo, path: Path) -> Any:
    """Lazy float32 array for one GGUF tensor (dequantized if stored as Q4_0/Q4_1/Q8_0)."""
    import mlx.core as mx

    if info.type_name == "BF16":
        return _read_bf16(path, info)
    if info.type_name in FLOAT_TYPES:
        return arrays[info.name].astype(mx.float32)
    base = info.name.removesuffix(".weight")
    w, s, b = arrays[info.name], arrays[f"{base}.scales"], arrays[f"{base}.biases"]
    bits = QUANT_BITS[info.type_name]
    if w.shape[-1] * 32 // bits != s.shape[-1] * GROUP_SIZE:
        raise InputError(f"{path}: tensor '{info.name}' came back from MLX with inconsistent "
                         f"shapes {w.shape} / {s.shape} for {info.type_name}")
    # Scales/biases to float32 first: dequantizing with float16 scales would round
    # every weight to float16, which GGML itself does not do.
    return mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32),
                         group_size=GROUP_SIZE, bits=bits)


def _check_finite(arrays: dict[str, Any], header: GGUFHeader, path: Path) -> None:
    """NaN/Inf check on the cheap parts: 1-D tensors (norms, biases) and quantization scales."""
    import mlx.core as mx

    for info in header.tensors.values():
        if info.type_name in QUANT_BITS:
            base = info.name.removesuffix(".weight")
            parts = {f"{base}.{k}": arrays[f"{base}.{k}"] for k in ("scales", "biases")}
        elif len(info.shape) == 1:
            bf16 = info.type_name == "BF16"
            parts = {info.name: _read_bf16(path, info) if bf16 else arrays[info.name]}
        else:
            continue
        for name, a in parts.items():
            if not mx.all(mx.isfinite(a)).item():
                raise InputError(f"{path}: tensor '{name}' contains NaN or Inf values")


def _tensor_loader(path: Path, header: GGUFHeader, config: dict[str, Any], arch: str):
    spec = ARCHITECTURES[arch]
    names = {n: mlx_name(n, arch) for n in header.tensors}
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}

    def load_tensors() -> dict[str, Any]:
        arrays, _ = _mx_load(path)
        out = {}
        for gname, info in header.tensors.items():
            x = _float_tensor(arrays, info, path)
            m = _LAYER_RE.fullmatch(gname)
            if spec.qk_permuted and m and m[2] in heads:
                x = unpermute_qk_rows(x, heads[m[2]])
            out[names[gname]] = x
        return out

    return load_tensors


# --- identity --------------------------------------------------------------------------

def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def model_name(meta: dict[str, Any], path: Path) -> str:
    """``basename-size[-instruct]``, lower-case and filesystem-safe; the file stem as fallback."""
    base = str(meta.get("general.basename", "")).strip()
    size = str(meta.get("general.size_label", "")).strip()
    if base:
        parts = [base] + ([size] if size and size.lower() not in base.lower() else [])
        hints = " ".join(str(meta.get(k, "")) for k in ("general.finetune", "general.name"))
        if "instruct" in f"{hints} {path.stem}".lower() and "instruct" not in base.lower():
            parts.append("instruct")
        name = "-".join(parts)
    else:
        name = path.stem
    safe = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return safe or "gguf-model"


def load_gguf(path: Path, workdir: Path) -> Reference:
    """Read a GGUF file into a :class:`Reference` (config, lazy float32 tensors in
    mlx_lm naming, tokenizer files under ``workdir/tokenizer``, source record)."""
    from squish.quant.gguf_tokenizer import write_tokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    header = read_gguf_header(path)
    bad = {i.name: i.type_name for i in header.tensors.values() if i.type_name not in SUPPORTED_TYPES}
    if bad:
        first = sorted(bad.items())[:5]
        raise InputError(
            f"{path}: unsupported GGUF tensor type(s) {sorted(set(bad.values()))} "
            f"(e.g. {', '.join(f'{n}: {t}' for n, t in first)}); supported: "
            f"{', '.join(sorted(SUPPORTED_TYPES))}. Use a Q8_0, Q4_0, Q4_1, F16, BF16 or F32 GGUF.")
    bad_q = [i.name for i in header.tensors.values()
             if i.type_name in QUANT_BITS and not i.name.endswith(".weight")]
    if bad_q:
        raise InputError(f"{path}: quantized tensor '{bad_q[0]}' is not a weight; not supported")
    arrays, meta = _mx_load(path)
    arch = str(meta.get("general.architecture", ""))
    config = build_config(meta, header)  # refuses unknown architectures first
    for name in header.tensors:
        mlx_name(name, arch)
    n_layers = config["num_hidden_layers"]
    layers = {int(m[1]) for n in header.tensors if (m := _LAYER_RE.fullmatch(n))}
    if layers != set(range(n_layers)):
        raise InputError(f"{path}: block_count is {n_layers} but tensors exist for "
                         f"{len(layers)} layers")
    _check_finite(arrays, header, path)
    del arrays
    tokenizer_dir = write_tokenizer(meta, Path(workdir) / "tokenizer", config)
    counts: dict[str, int] = {}
    for info in header.tensors.values():
        counts[info.type_name] = counts.get(info.type_name, 0) + 1
    notes = []
    if ARCHITECTURES[arch].qk_permuted:
        notes.append("undid llama.cpp's Q/K row permutation (standard RoPE layout)")
    return Reference(
        name=model_name(meta, path),
        config=config,
        tokenizer_dir=tokenizer_dir,
        source={"kind": "gguf", "id": path.name, "sha256": file_sha256(path),
                "file_types": dict(sorted(counts.items()))},
        load_tensors=_tensor_loader(path, header, config, arch),
        notes=notes,
    )
