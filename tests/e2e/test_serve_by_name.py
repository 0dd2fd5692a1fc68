"""End to end, by name: a real `squish serve` subprocess, driven by the official `openai` client,
on (1) a folder written by `mlx_lm.convert -q` (served as it is, with the "no quality report"
warning) and (2) a catalog name that is not built yet (built first, then served; a second start
finds the build). Tiny random-weight models: structure, not quality."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_hf_folder  # noqa: E402

from serving import KEY, _free_port  # noqa: E402

HELLO = [{"role": "user", "content": "Hello!"}]

# A subprocess `squish` whose catalog has one more entry, `tiny:1m`, built from a local tiny
# folder. Random weights cannot pass the real quality gate and need no long calibration, so the
# gate is opened and calibration shortened; everything else is the production path.
PATCHED_SQUISH = """
import sys
from squish import catalog
from squish.quant import evaluate, pipeline

catalog.CATALOG["tiny:1m"] = catalog.CatalogEntry("tiny:1m", "hf:" + sys.argv[1], 0.001)
catalog.SHAPES["tiny:1m"] = catalog.Shape(layers=2, hidden=128, kv_heads=2, head_dim=32, vocab=384, tied=True)
evaluate.THRESHOLDS[4] = evaluate.Thresholds(max_mean_kld=1e9, min_top1=0.0, max_ppl_delta=1e9)
real_build = pipeline.build


def fast_build(source, opts):
    opts.calib_samples, opts.calib_seq_len = 2, 32
    return real_build(source, opts)


pipeline.build = fast_build
from squish.cli.main import main

sys.exit(main(sys.argv[2:]))
"""


class Running:
    """A `squish serve` subprocess started from ``argv``; ready when /health says ok."""

    def __init__(self, argv: list[str], home: Path, ready_s: float = 110):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SQUISH_API_KEY": KEY, "SQUISH_HOME": str(home)}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="squish-byname-", suffix=".log", delete=False)
        self.proc = subprocess.Popen([*argv, "--port", str(self.port)], env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=2).json().get("status") == "ok":
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("server did not become ready:\n" + self.output())
        self.model = httpx.get(self.url + "/health").json()["model"]

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def chat(self) -> None:
        client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = client.chat.completions.create(model=self.model, messages=HELLO, max_tokens=6, temperature=0)
        assert r.choices[0].finish_reason in ("stop", "length") and r.usage.completion_tokens >= 1
        streamed = list(client.chat.completions.create(model=self.model, messages=HELLO, max_tokens=6,
                                                       temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
            r.choices[0].message.content
        assert [m.id for m in client.models.list().data] == [self.model]

    def stop(self) -> str:
        self.proc.terminate()
        try:
            assert self.proc.wait(20) == 0
            return self.output()
        finally:
            self.log.close()
            os.unlink(self.log.name)


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """A folder as `mlx_lm.convert -q` writes it, from a tiny random float32 llama."""
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("convert")
    src = make_hf_folder(root / "src", "llama", dtype="float32")
    out = root / "tiny-llama-4bit"
    convert(hf_path=str(src), mlx_path=str(out), quantize=True)
    return out


def test_serve_an_mlx_lm_convert_folder_as_it_is(converted, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in converted.iterdir()}
    server = Running([sys.executable, "-m", "squish", "serve", str(converted)], tmp_path / "home")
    try:
        assert server.model == "tiny-llama-4bit"
        server.chat()
    finally:
        out = server.stop()
    assert "no quality report exists for it" in out
    assert {p.name: p.stat().st_mtime_ns for p in converted.iterdir()} == before  # served as it is
    assert not (tmp_path / "home" / "models").exists()  # nothing copied or built


def test_serve_catalog_name_builds_first_then_serves(tmp_path):
    src = make_hf_folder(tmp_path / "tiny-src", "llama", dtype="float32")
    home = tmp_path / "home"
    argv = [sys.executable, "-c", PATCHED_SQUISH, str(src), "serve", "tiny:1m"]
    server = Running(argv, home)
    try:
        server.chat()
    finally:
        out = server.stop()
    assert "tiny:1m is not built yet: building it first. Estimate: its source is already in the cache" in out
    assert "of disk, builds in roughly" in out
    built = home / "models" / "tiny-1m-4bit"
    assert (built / "squish.json").exists()
    assert sorted(p.name for p in (home / "models").iterdir()) == ["tiny-1m-4bit"]  # no temp left
    # the next start finds the build and does not build again
    again = subprocess.run(argv + ["--dry-run"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "SQUISH_HOME": str(home)})
    assert again.returncode == 0, again.stderr
    assert f"dry run ok: model {built}" in again.stdout and "building" not in again.stderr
