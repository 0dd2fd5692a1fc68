"""The artifact contract: the only seam between the offline build (``squish.quant``)
and the runtime (``squish.runtime``).

A Squish artifact (format v1, docs/architecture.md) is a folder that
``mlx_lm.load`` loads unchanged, plus ``squish.json``: format name and version,
source, recipe, calibration, quality report, and every file's size and sha256.
The writer (``squish.quant.writer``) produces it; the loader and ``squish
verify`` check it with the functions here. Neither half imports the other.

Checks, cheapest first: manifest format and version; every listed file exists
with its recorded size; every safetensors header parses and its data fits the
file (truncation); optionally every file's sha256. Every problem is an
``InputError`` that names the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from squish.errors import InputError

MANIFEST = "squish.json"
FORMAT_NAME = "squish-artifact"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
HASH_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_CHUNK):
            h.update(block)
    return h.hexdigest()


def read_manifest(path: Path) -> dict | None:
    """The parsed ``squish.json`` of ``path``, or None for a plain mlx_lm folder."""
    mf = Path(path) / MANIFEST
    if not mf.exists():
        return None
    try:
        manifest = json.loads(mf.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{mf}: unreadable manifest ({e})") from e
    if manifest.get("format") != FORMAT_NAME:
        raise InputError(f"{mf}: not a Squish manifest (format={manifest.get('format')!r})")
    if manifest.get("format_version") not in SUPPORTED_FORMAT_VERSIONS:
        raise InputError(
            f"{mf}: format_version {manifest.get('format_version')!r} is not supported by this "
            f"Squish (supports {list(SUPPORTED_FORMAT_VERSIONS)}); rebuild it with `squish quantize` "
            "or upgrade Squish"
        )
    return manifest


def check_safetensors(file: Path) -> dict[str, dict]:
    """Parse a safetensors header and check that every tensor's bytes are in the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise InputError(f"{file}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise InputError(f"{file}: corrupt safetensors header (claims {n} header bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise InputError(f"{file}: corrupt safetensors header ({e})") from e
    header.pop("__metadata__", None)
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise InputError(
            f"{file}: truncated: tensors need {8 + n + end} bytes but the file has {size}"
        )
    return header


def check_files(path: Path, manifest: dict | None, *, verify_hashes: bool = False) -> list[Path]:
    """Existence, sizes, headers (and optionally hashes) of an artifact's files."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json: not a model folder")
    if manifest is not None:
        for name, meta in manifest.get("files", {}).items():
            f = path / name
            if not f.is_file():
                raise InputError(f"{f}: missing (listed in {MANIFEST}); the artifact is incomplete")
            if f.stat().st_size != meta["size"]:
                raise InputError(
                    f"{f}: size {f.stat().st_size} bytes, manifest says {meta['size']}: "
                    "the file is truncated or was modified"
                )
            if verify_hashes and sha256_file(f) != meta["sha256"]:
                raise InputError(f"{f}: sha256 does not match the manifest: the file is corrupt")
    weights = sorted(path.glob("model*.safetensors"))
    if not weights:
        raise InputError(f"{path}: no model*.safetensors weight files")
    index = path / "model.safetensors.index.json"
    names: set[str] = set()
    for w in weights:
        names.update(check_safetensors(w))
    if index.exists():
        wanted = set(json.loads(index.read_text())["weight_map"])
        if missing := sorted(wanted - names):
            raise InputError(f"{index}: {len(missing)} tensors have no data, e.g. {missing[0]}")
    return weights
