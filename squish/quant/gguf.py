"""GGUF source: turn a llama.cpp ``.gguf`` file into a :class:`Reference`.

- :mod:`squish.quant.gguf_file` parses the header (refusing truncated or corrupt
  files, unknown types and types Squish cannot dequantize, by name) and reads one
  tensor at a time in float32 with the ``gguf`` package's dequantizers.
- :mod:`squish.quant.gguf_arch` maps each supported architecture to its mlx_lm
  model type: tensor names, config fields, and the layout changes llama.cpp made
  (Q/K row permutation for llama, +1 folded into Gemma norms), undone on the
  float rows.
- :mod:`squish.quant.gguf_tokenizer` rebuilds ``tokenizer.json`` (byte-level BPE
  or SentencePiece) and the chat template from the metadata.

The reference's ``tensors()`` is a :class:`GGUFTensors` mapping: a lookup returns
one float32 tensor in mlx_lm naming (MLX's own reader for files it can open, the
``gguf`` package for the rest; see the class), so walking it layer by layer never
holds the model in float32.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from squish.errors import InputError
from squish.quant.gguf_arch import LAYER_RE, Family, build_config, family
from squish.quant.gguf_file import SUPPORTED_TYPES, GGUFFile, TensorInfo, open_gguf, read_tensor
from squish.quant.reference import Reference


# Types MLX's own GGUF reader returns as they are (F32/F16) or as its affine triplets
# (Q4_0/Q4_1/Q8_0, group size 32). MLX cannot open a file holding any other type.
MLX_NATIVE_BITS = {"F32": None, "F16": None, "Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


class GGUFTensors(Mapping):
    """Lazy ``{mlx_lm name: float32 mx.array}`` over a GGUF file.

    Two readers, chosen per file, because the calibration pipeline walks the whole
    reference once per generated token and the second costs about twice the first
    per walk (``benchmarks/gguf_read.py``, SmolLM2 Q4_1; bit-identical values):

    - a file whose tensors are all F32/F16/Q4_0/Q4_1/Q8_0 is opened with ``mx.load``
      on the first lookup (the quantized file stays resident while the mapping
      lives) and each lookup returns a lazy ``mx.dequantize`` expression;
    - any other file (K-quants, IQ types, BF16, ...) is read with the ``gguf``
      package: a lookup dequantizes that one tensor in numpy from the memory-mapped
      file (:func:`~squish.quant.gguf_file.read_tensor`) and keeps nothing.

    Either way llama.cpp's layout changes are undone per tensor. ``pop`` forgets the
    name, so a consumer that takes each layer once cannot read it twice by mistake."""

    def __init__(self, gguf: GGUFFile, fam: Family, config: dict[str, Any], *,
                 native: bool | None = None):
        self._gguf, self._fam, self._config = gguf, fam, config
        self._names = {fam.mlx_name(n): n for n in gguf.tensors if n not in fam.side_tensors}
        if native is None:
            native = all(i.type_name in MLX_NATIVE_BITS and (MLX_NATIVE_BITS[i.type_name] is None
                                                             or i.name.endswith(".weight"))
                         for i in gguf.tensors.values())
        self.native = native
        self._arrays: dict[str, Any] | None = None

    def __getitem__(self, name: str) -> Any:
        import mlx.core as mx

        gname = self._names[name]
        info = self._gguf.tensors[gname]
        if not self.native:
            return mx.array(self._fam.transform(gname, read_tensor(self._gguf.path, info), self._config))
        if self._arrays is None:
            try:
                self._arrays = mx.load(str(self._gguf.path))
            except (RuntimeError, ValueError) as e:
                raise InputError(f"{self._gguf.path}: MLX could not read the GGUF: {e}") from e
        bits = MLX_NATIVE_BITS[info.type_name]
        if bits is None:
            x = self._arrays[gname].astype(mx.float32)
        else:
            base = gname.removesuffix(".weight")
            w, s, b = (self._arrays[k] for k in (gname, f"{base}.scales", f"{base}.biases"))
            # float32 scales first: dequantizing with float16 ones would round every
            # weight to float16, which GGML itself does not do.
            x = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), group_size=32, bits=bits)
        return self._fam.transform(gname, x, self._config)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names

    _missing = object()

    def pop(self, name: str, default: Any = _missing) -> Any:
        if name not in self._names:
            if default is self._missing:
                raise KeyError(name)
            return default
        value = self[name]
        del self._names[name]
        return value

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading it."""
        return self._gguf.tensors[self._names[name]].shape

    def raw(self, name: str) -> tuple[Path, TensorInfo, Any]:
        """``(file, table entry, row order)`` of a tensor, for reading its stored codes
        (:mod:`squish.quant.gguf_codes`); the row order is what :meth:`__getitem__` applies
        to the rows (None: as stored)."""
        info = self._gguf.tensors[self._names[name]]
        rows = int(np.prod(info.shape[:-1], dtype=np.int64))
        return self._gguf.path, info, self._fam.row_order(info.name, rows, self._config)


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


# --- checks ----------------------------------------------------------------------------

def _check_types(gguf: GGUFFile) -> None:
    bad = {i.name: i.type_name for i in gguf.tensors.values() if i.type_name not in SUPPORTED_TYPES}
    if bad:
        first = sorted(bad.items())[:5]
        raise InputError(
            f"{gguf.path}: unsupported GGUF tensor type(s) {sorted(set(bad.values()))} "
            f"(e.g. {', '.join(f'{n}: {t}' for n, t in first)}); Squish reads "
            f"{', '.join(SUPPORTED_TYPES)}. Use a GGUF quantized to one of those.")


def _check_layers(gguf: GGUFFile, fam: Family, config: dict[str, Any]) -> None:
    for name in gguf.tensors:
        if name not in fam.side_tensors:
            fam.mlx_name(name)
    n_layers = config["num_hidden_layers"]
    layers = {int(m[1]) for n in gguf.tensors if (m := LAYER_RE.fullmatch(n))}
    if layers != set(range(n_layers)):
        raise InputError(f"{gguf.path}: block_count is {n_layers} but tensors exist for "
                         f"{len(layers)} layers")


def _check_small_tensors(gguf: GGUFFile) -> None:
    """Read every 1-D tensor (norms, biases) up front: NaN/Inf there is refused before
    any work. Larger tensors are checked when they are read."""
    for info in gguf.tensors.values():
        if len(info.shape) == 1:
            read_tensor(gguf.path, info)


def load_gguf(path: Path, workdir: Path) -> Reference:
    """Read a GGUF file into a :class:`Reference` (config, lazy float32 tensors in
    mlx_lm naming, tokenizer files under ``workdir/tokenizer``, source record).

    Every refusal is an :class:`InputError` naming the file and the problem, raised
    before anything is written to ``workdir``."""
    path = Path(path)
    try:
        return _load(path, Path(workdir))
    except InputError as e:
        if str(path) in str(e):
            raise
        raise InputError(f"{path}: {e}") from e


def _load(path: Path, workdir: Path) -> Reference:
    from squish.quant.gguf_tokenizer import build_tokenizer_files

    gguf = open_gguf(path)
    _check_types(gguf)
    meta = gguf.metadata
    fam = family(str(meta.get("general.architecture", "")))
    config = build_config(meta, gguf)
    _check_layers(gguf, fam, config)
    _check_small_tensors(gguf)
    files = build_tokenizer_files(meta, config)
    eos = files.eos_token_ids
    if files.bos_token_id is not None:
        config["bos_token_id"] = files.bos_token_id
    config["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    tokenizer_dir = files.write(workdir / "tokenizer")
    tables = dataclasses.replace(gguf, metadata={})  # the reference keeps no vocabulary
    counts: dict[str, int] = {}
    for info in gguf.tensors.values():
        counts[info.type_name] = counts.get(info.type_name, 0) + 1
    notes = list(files.notes)
    if fam.qk_permuted:
        notes.append("undid llama.cpp's Q/K row permutation (standard RoPE layout)")
    if fam.norm_plus_one:
        notes.append("subtracted the +1 llama.cpp folds into Gemma RMSNorm weights")
    return Reference(
        name=model_name(meta, path),
        config=config,
        tokenizer_dir=tokenizer_dir,
        source={"kind": "gguf", "id": path.name, "sha256": file_sha256(path),
                "file_types": dict(sorted(counts.items()))},
        load_tensors=lambda: GGUFTensors(tables, fam, config),
        notes=notes,
        chat=files.chat,
    )
