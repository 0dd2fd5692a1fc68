"""Writes a Squish artifact (format v1, docs/architecture.md) atomically.

Everything goes into a hidden temp directory beside the target; only a build
that completes (and passes its quality gate, or is explicitly kept as failed)
is renamed into place. An interrupted or failed build removes the temp dir, so
no partial artifact is ever visible under the target name.

Layout written (what ``mlx_lm.load`` reads unchanged, plus ``squish.json``):
  config.json                      model config + ``quantization`` block
  model.safetensors                or model-0000k-of-0000n.safetensors + index
  tokenizer files                  copied verbatim from the reference
  squish.json                      manifest: format version, source, recipe,
                                   calibration, quality report, per-file
                                   sha256 and size, tool versions
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from squish.artifact import FORMAT_NAME, FORMAT_VERSION, MANIFEST, sha256_file
from squish.errors import InputError

log = logging.getLogger("squish.quant")

SHARD_BYTES = 512 << 20  # the writer buffers one shard: this bounds its share of peak RSS
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def shard_name(i: int, n: int) -> str:
    return "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def _sweep_stale(target: Path) -> None:
    """Remove staging folders of ``target`` left by builds whose process is gone (kill -9,
    a power cut): nothing else can remove them, and each holds part of an artifact."""
    if not target.parent.is_dir():
        return
    for d in target.parent.glob(f".{target.name}.tmp-*-*"):
        pid = d.name[len(f".{target.name}.tmp-"):].split("-", 1)[0]
        if d.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(d, ignore_errors=True)
            log.info("removed %s, left by a build that did not finish (process %s is gone)", d.name, pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class ArtifactWriter:
    """Streams tensors into safetensors shards inside a temp dir, then commits.

    Use as a context manager: leaving the block with an exception aborts (the
    temp dir is deleted). Call order: ``add``* → ``copy_tokenizer`` →
    ``write_config`` → ``close_weights`` → (evaluate ``staging_dir``) →
    ``commit``.
    """

    def __init__(self, target: Path, *, overwrite: bool = False, shard_bytes: int = SHARD_BYTES):
        self.target = Path(target)
        if self.target.exists() and not overwrite:
            raise InputError(
                f"{self.target} already exists; remove it with `squish rm` or pass --force"
            )
        self.overwrite = overwrite
        self.shard_bytes = shard_bytes
        _sweep_stale(self.target)
        # The builder's pid in the name: a later build can tell a killed build's folder
        # (its process is gone) from a build still running beside it.
        self.staging_dir = self.target.parent / f".{self.target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.staging_dir.mkdir(parents=True)
        self._buffer: dict[str, Any] = {}
        self._buffer_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self.total_bytes = 0
        self._weights_closed = False

    # -- tensors ---------------------------------------------------------------
    def add(self, name: str, array: Any) -> None:
        if self._weights_closed:
            raise RuntimeError("add() after close_weights()")
        if name in self._names:
            raise ValueError(f"tensor {name} emitted twice")
        self._names.add(name)
        self._buffer[name] = array
        self._buffer_bytes += array.nbytes
        self.total_bytes += array.nbytes
        if self._buffer_bytes >= self.shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if not self._buffer:
            return
        import mlx.core as mx

        part = self.staging_dir / f"part-{len(self._parts):05d}.safetensors"
        mx.save_safetensors(str(part), self._buffer, metadata={"format": "mlx"})
        self._parts.append((part, sorted(self._buffer)))
        self._buffer, self._buffer_bytes = {}, 0

    def close_weights(self) -> list[str]:
        """Flush, give shards their final names, write the index if sharded."""
        self._flush()
        self._weights_closed = True
        if not self._parts:
            raise RuntimeError("no tensors were written")
        n = len(self._parts)
        weight_map: dict[str, str] = {}
        names = []
        for i, (part, keys) in enumerate(self._parts):
            final = shard_name(i, n)
            part.rename(self.staging_dir / final)
            names.append(final)
            weight_map.update({k: final for k in keys})
        if n > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            self._write_json("model.safetensors.index.json", index)
        return names

    # -- other files -------------------------------------------------------------
    def copy_tokenizer(self, tokenizer_dir: Path) -> list[str]:
        copied = []
        for name in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, self.staging_dir / name)
                copied.append(name)
        if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
            raise InputError(f"{tokenizer_dir} has no tokenizer.json or tokenizer.model")
        return copied

    def write_config(self, config: dict) -> None:
        self._write_json("config.json", config)

    def _write_json(self, name: str, obj: Any) -> None:
        with open(self.staging_dir / name, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    # -- finishing -----------------------------------------------------------------
    def commit(self, manifest: dict) -> Path:
        """Hash every file into the manifest, write it, and rename into place."""
        files = {}
        for p in sorted(self.staging_dir.iterdir()):
            if p.is_file():
                files[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
        manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **manifest, "files": files}
        self._write_json(MANIFEST, manifest)
        for p in self.staging_dir.iterdir():  # make the bytes durable before the rename
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if self.target.exists():
            if not self.overwrite:
                raise InputError(f"{self.target} appeared while building; not replacing it")
            old = self.target.parent / f".{self.target.name}.old-{secrets.token_hex(4)}"
            self.target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        self.staging_dir.rename(self.target)
        return self.target

    def abort(self) -> None:
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def __enter__(self) -> "ArtifactWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.staging_dir.exists():  # not committed: failed, interrupted or rejected
            self.abort()
