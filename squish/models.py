"""Local artifacts under ``$SQUISH_HOME/models``: list, resolve, remove."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from squish import catalog
from squish.config import models_dir
from squish.errors import InputError


@dataclass
class ModelInfo:
    name: str
    path: Path
    bits: int | None
    size_bytes: int
    verdict: str  # "pass" | "FAILED" | "no report"
    experimental: bool
    catalog_name: str | None
    params_b: float | None


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def describe(path: Path) -> ModelInfo:
    from squish.artifact import read_manifest

    manifest = read_manifest(path) or {}
    quant = manifest.get("quantization", {})
    quality = manifest.get("quality")
    verdict = "no report" if not quality else ("pass" if quality.get("passed") else "FAILED")
    source = manifest.get("source", {})
    entry = catalog.CATALOG.get(source.get("catalog", ""))
    return ModelInfo(
        name=path.name,
        path=path,
        bits=quant.get("bits"),
        size_bytes=_dir_size(path),
        verdict=verdict,
        experimental=bool(quant.get("experimental", False)),
        catalog_name=source.get("catalog"),
        params_b=entry.params_b if entry else None,
    )


def list_local() -> list[ModelInfo]:
    root = models_dir()
    if not root.is_dir():
        return []
    out = []
    for p in sorted(root.iterdir()):
        if p.is_dir() and not p.name.startswith(".") and (p / "config.json").exists():
            try:
                out.append(describe(p))
            except InputError:
                continue  # an unreadable manifest is reported by `squish verify`, not here
    return out


def best_local(memory_bytes: int) -> ModelInfo | None:
    """The most capable local artifact that passed its gate and fits in ``memory_bytes``.

    "Fits" leaves room for the KV cache and activations: weights under half the
    memory. Ties on capability prefer production bits (4) over experimental ones.
    """
    fits = [m for m in list_local() if m.verdict != "FAILED" and m.size_bytes * 2 < memory_bytes]
    if not fits:
        return None
    return max(fits, key=lambda m: (m.params_b or 0.0, m.size_bytes, not m.experimental))


def resolve_model(name_or_path: str | None) -> Path:
    """A path, an artifact name, or a catalog name → artifact folder."""
    if name_or_path is None:
        from squish.hardware import available_memory_bytes

        best = best_local(available_memory_bytes())
        if best is None:
            raise InputError(
                f"no local model fits this machine; build one with `squish quantize {catalog.DEFAULT_MODEL}`"
            )
        return best.path
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        return p
    local = models_dir() / name_or_path
    if local.is_dir():
        return local
    if catalog.looks_like_catalog_name(name_or_path):
        catalog.lookup(name_or_path)
        built = [m for m in list_local() if m.catalog_name == name_or_path.lower() and m.verdict != "FAILED"]
        if built:
            return min(built, key=lambda m: (m.experimental, abs((m.bits or 4) - 4))).path
        raise InputError(f"{name_or_path} is not built yet; run `squish quantize {name_or_path}`")
    names = ", ".join(m.name for m in list_local()) or "none"
    raise InputError(f"no model {name_or_path!r}: not a folder, and not a local artifact (local: {names})")


def default_model_path(build_if_missing: bool = True, *, quiet: bool = False) -> Path:
    """The default catalog model, built first if it is not here yet."""
    try:
        return resolve_model(catalog.DEFAULT_MODEL)
    except InputError:
        if not build_if_missing:
            raise
    from squish.quant.pipeline import BuildOptions, build

    return build(catalog.DEFAULT_MODEL, BuildOptions(quiet=quiet)).path


def remove_model(name: str) -> Path:
    root = models_dir().resolve()
    target = (models_dir() / name).resolve()
    if target.parent != root or not target.is_dir():
        names = ", ".join(m.name for m in list_local()) or "none"
        raise InputError(f"no local artifact named {name!r} (local: {names})")
    if not (target / "config.json").exists():
        raise InputError(f"{target} does not look like a model folder; not removing it")
    shutil.rmtree(target)
    return target
