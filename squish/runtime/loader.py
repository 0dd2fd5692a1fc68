"""Opens a Squish artifact (or a plain mlx_lm folder) for serving.

Checks, cheapest first, before any weight is read:
  1. ``squish.json`` format and version (absent: a plain mlx_lm folder, served
     with a warning that no quality report exists);
  2. every file the manifest lists exists with its recorded size;
  3. every safetensors header parses and its data fits the file (truncation);
  4. with ``verify_hashes`` (``squish verify``), every file's sha256.
Then the model is built by mlx_lm from the artifact *as stored*: the loader
performs no reshape, transpose, cast, re-quantization or recomputation
(tests/integration/test_loader.py proves it). Floating-point tensors (scales,
biases, norms, embeddings) are checked for NaN/Inf once they are in memory.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squish.errors import InputError

log = logging.getLogger(__name__)

MANIFEST = "squish.json"
FORMAT_NAME = "squish-artifact"
SUPPORTED_FORMAT_VERSIONS = (1,)


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any  # mlx.nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    config: dict
    manifest: dict | None
    load_seconds: float
    experimental: bool
    warnings: list[str] = field(default_factory=list)


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
        from squish.build.pypi import sha256_file

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


def check_finite(model: Any, path: Path) -> None:
    """Refuse NaN/Inf in any floating-point parameter (scales, biases, norms, ...)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = [(k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    flags = mx.stack([mx.all(mx.isfinite(v)) for _, v in params]) if params else mx.array([True])
    bad = [k for (k, _), ok in zip(params, flags.tolist()) if not ok]
    if bad:
        raise InputError(f"{path}: NaN/Inf in {len(bad)} tensors, e.g. {bad[0]}; the artifact is corrupt")


def load_artifact(path: Path, *, verify_hashes: bool = False) -> LoadedModel:
    """Verify and load an artifact; every problem raises InputError naming the file."""
    t0 = time.perf_counter()
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError(f"{path}: no such model folder")
    manifest = read_manifest(path)
    warnings = []
    if manifest is None:
        warnings.append(
            f"{path} is a plain mlx_lm folder without a Squish manifest: no quality report exists for it"
        )
    check_files(path, manifest, verify_hashes=verify_hashes)

    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    try:
        model, config = load_model(path, lazy=True)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise InputError(f"{path}: the model cannot be built from its files: {e}") from e
    check_finite(model, path)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    quant = (manifest or {}).get("quantization", {})
    experimental = bool(quant.get("experimental", False))
    if experimental:
        warnings.append(f"{path.name} is an experimental INT{quant.get('bits')} build")
    for w in warnings:
        log.warning(w)
    return LoadedModel(
        name=(manifest or {}).get("name", path.name),
        path=path,
        model=model,
        tokenizer=tokenizer,
        config=config,
        manifest=manifest,
        load_seconds=time.perf_counter() - t0,
        experimental=experimental,
        warnings=warnings,
    )
