"""The GGUF container: header, metadata, tensor table, and one tensor at a time in float32.

Why a parser of our own for the header and the `gguf` package for the tensors:

- The header is parsed here in plain Python before anything touches the tensor
  data, so that a truncated or corrupt file, an unknown tensor type or a tensor
  that runs past the end of the file is refused with a message naming the file
  and the tensor. ``gguf.GGUFReader`` would do the same job, but it builds one
  numpy view per array element in Python: 30 s for the metadata of Gemma 3's
  262k-token vocabulary on this machine, against well under a second here.
  ``mx.load`` reads the whole file eagerly and fails outright on K-quants
  (``gguf_tensor_to_f16 failed`` on a Q4_K_M file); files it can open are still
  read with it for speed (:class:`squish.quant.gguf.GGUFTensors`).
- Tensor data is memory-mapped and dequantized with ``gguf.quants.dequantize``
  (numpy, maintained with llama.cpp) a block of rows at a time into one float32
  array, so reading a tensor holds that tensor in float32 plus one block of
  temporaries, never the file.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from squish.errors import InputError

# The types Squish reads, each checked against the library's own dequantization in
# tests/unit/test_gguf_types.py. The rest of ggml's types (Q8_1, Q8_K: never stored
# in model files; I8..I64, F64: not weights) are refused by name.
SUPPORTED_TYPES = (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
    "TQ1_0", "TQ2_0", "MXFP4",
)

CHUNK_BYTES = 32 << 20  # float32 output per dequantization step

# GGUF metadata value types: id -> struct format (scalars); 8 = string, 9 = array.
_SCALAR_FMT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
               12: "d"}
_NP_DTYPE = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
             10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table; ``shape`` is row-major (numpy / MLX order)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    type_id: int
    offset: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # scalars as Python values, numeric arrays as numpy, strings as str
    tensors: dict[str, TensorInfo]
    file_size: int

    def read(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a float32 numpy array of its row-major shape."""
        return read_tensor(self.path, self.tensors[name])


class _Cursor:
    """Bounds-checked little-endian reads from a mapped file; a short read means truncation."""

    def __init__(self, buf: Any, path: Path, size: int):
        self.buf, self.path, self.size, self.pos = buf, path, size, 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise InputError(f"{self.path}: GGUF header is truncated or corrupt "
                             f"(wants {n} bytes at offset {self.pos}, the file has {self.size})")

    def scalar(self, fmt: str) -> Any:
        n = struct.calcsize("<" + fmt)
        self.need(n)
        (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("Q")
        self.need(n)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        try:
            return str(raw, "utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{self.path}: GGUF {what} is not valid UTF-8") from e

    def strings(self, count: int, key: str) -> list[str]:
        """An array of strings (a vocabulary: 262k entries for Gemma), in one tight loop."""
        buf, pos, size, unpack = self.buf, self.pos, self.size, struct.Struct("<Q").unpack_from
        out = []
        try:
            for _ in range(count):
                if pos + 8 > size:
                    break
                (n,) = unpack(buf, pos)
                if pos + 8 + n > size:
                    break
                out.append(buf[pos + 8:pos + 8 + n].decode("utf-8"))
                pos += 8 + n
        except UnicodeDecodeError as e:
            raise InputError(f"{self.path}: GGUF metadata array '{key}' has a string that is "
                             "not valid UTF-8") from e
        self.pos = pos
        if len(out) < count:
            self.need(size)  # raises: the array runs past the end of the file
        return out

    def value(self, vtype: int, key: str) -> Any:
        if vtype in _SCALAR_FMT:
            return self.scalar(_SCALAR_FMT[vtype])
        if vtype == _STRING:
            return self.string(f"metadata value '{key}'")
        if vtype == _ARRAY:
            etype, count = self.scalar("I"), self.scalar("Q")
            if etype in _NP_DTYPE:
                width = np.dtype(_NP_DTYPE[etype]).itemsize
                self.need(count * width)
                arr = np.frombuffer(self.buf, _NP_DTYPE[etype], count, self.pos).copy()
                self.pos += count * width
                return arr
            if count > self.size - self.pos:  # every element takes at least one byte
                raise InputError(f"{self.path}: GGUF metadata array '{key}' is corrupt "
                                 f"({count} elements)")
            if etype == _STRING:
                return self.strings(count, key)
            return [self.value(etype, key) for _ in range(count)]
        raise InputError(f"{self.path}: GGUF metadata '{key}' has unknown value type {vtype}")


def type_name(type_id: int) -> str | None:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return None


def _block(type_name_: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml type, from the gguf package."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name_]]


def open_gguf(path: Path) -> GGUFFile:
    """Parse the header, metadata and tensor table of a GGUF v2/v3 file.

    Raises :class:`InputError` for a file that is not GGUF (or is big-endian), a
    truncated or corrupt header, an unknown tensor type, a row length that is not a
    whole number of blocks, or tensor data past the end of the file (naming it)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such GGUF file")
    size = path.stat().st_size
    if size < 24:
        raise InputError(f"{path}: not a GGUF file ({size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        c = _Cursor(mm, path, size)
        if mm[:4] != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (missing 'GGUF' magic)")
        c.pos = 4
        version = c.scalar("I")
        if version & 0xFFFF == 0 and version:
            raise InputError(f"{path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise InputError(f"{path}: GGUF version {version} is not supported (need 2 or 3)")
        n_tensors, n_kv = c.scalar("Q"), c.scalar("Q")
        if n_tensors > size // 24 or n_kv > size // 12:
            raise InputError(f"{path}: GGUF header is truncated or corrupt ({n_tensors} tensors "
                             f"and {n_kv} keys cannot fit in {size} bytes)")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string("metadata key")
            meta[key] = c.value(c.scalar("I"), key)
        raw = []
        for _ in range(n_tensors):
            name = c.string("tensor name")
            n_dims = c.scalar("I")
            if not 1 <= n_dims <= 4:
                raise InputError(f"{path}: tensor '{name}' has {n_dims} dimensions (corrupt header)")
            dims = [c.scalar("Q") for _ in range(n_dims)]
            raw.append((name, dims, c.scalar("I"), c.scalar("Q")))
        header_end = c.pos
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise InputError(f"{path}: GGUF general.alignment {alignment!r} is not a power of two")
    data_start = -(-header_end // alignment) * alignment
    tensors: dict[str, TensorInfo] = {}
    for name, dims, type_id, rel in raw:
        tname = type_name(type_id)
        if tname is None:
            raise InputError(f"{path}: tensor '{name}' has unknown ggml type id {type_id}")
        block, block_bytes = _block(tname)
        if dims[0] % block:
            raise InputError(f"{path}: tensor '{name}' ({tname}) row length {dims[0]} "
                             f"is not a multiple of the block size {block}")
        if name in tensors:
            raise InputError(f"{path}: tensor '{name}' appears twice (corrupt header)")
        nbytes = int(np.prod(dims[1:], dtype=np.int64)) * (dims[0] // block) * block_bytes
        start = data_start + rel
        if start + nbytes > size:
            raise InputError(f"{path}: tensor '{name}' ends at byte {start + nbytes} but the file has "
                             f"{size} bytes: the file is truncated (incomplete download?)")
        tensors[name] = TensorInfo(name, tuple(reversed(dims)), tname, type_id, start, nbytes)
    return GGUFFile(path, version, meta, tensors, size)


def read_tensor(path: Path, info: TensorInfo) -> np.ndarray:
    """Dequantize one tensor to float32, ``CHUNK_BYTES`` of output at a time.

    Raises :class:`InputError` for a type Squish does not read and for NaN/Inf values
    (naming the file and the tensor)."""
    if info.type_name not in SUPPORTED_TYPES:
        raise InputError(f"{path}: tensor '{info.name}' has GGUF type {info.type_name}, which "
                         f"Squish cannot read; supported: {', '.join(SUPPORTED_TYPES)}")
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize

    qtype = GGMLQuantizationType[info.type_name]
    row_len = info.shape[-1]
    rows = int(np.prod(info.shape[:-1], dtype=np.int64))
    out = np.empty((rows, row_len), np.float32)
    if out.size:
        mapped = np.memmap(path, np.uint8, "r", offset=info.offset, shape=(info.nbytes,))
        # A plain ndarray view: slicing a memmap subclass costs more than dequantizing.
        data = np.asarray(mapped).reshape(rows, info.nbytes // rows)
        step = max(1, CHUNK_BYTES // (4 * row_len))
        for r in range(0, rows, step):
            part = out[r:r + step]
            part[:] = dequantize(data[r:r + step], qtype).reshape(part.shape)
            if not np.isfinite(part).all():
                raise InputError(f"{path}: tensor '{info.name}' contains NaN or Inf values")
        del data, mapped
    return out.reshape(info.shape)
