"""Hub downloads without the hub: reachability against local sockets, and `pull` against a fake
huggingface_hub (listing, download, failure halfway) — the order of checks, the hidden partial
folder, resume, and what is left behind on each failure."""

from __future__ import annotations

import http.server
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest

from squish import hub
from squish.config import models_dir
from squish.errors import InputError, SystemFailure

REPO = "mlx-community/Tiny-4bit"
CONFIG = {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 128, "rms_norm_eps": 1e-5, "vocab_size": 64,
          "quantization": {"bits": 4, "group_size": 64}}
FILES = {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": b"\0" * 4096,
         "tokenizer.json": b"{}", "tokenizer_config.json": b"{}", "README.md": b"# card",
         "consolidated.safetensors": b"\0" * 8192, "original/params.json": b"{}"}


class FakeHub:
    """What `squish.hub.pull` uses of huggingface_hub, serving ``files`` from memory."""

    def __init__(self, monkeypatch, files=FILES, *, fail_after: int | None = None, error=None):
        self.files, self.fail_after, self.error, self.fetched = dict(files), fail_after, error, []
        monkeypatch.setattr(hub, "reachable", lambda timeout=hub.REACH_TIMEOUT_S: (True, ""))
        monkeypatch.setattr(huggingface_hub.HfApi, "model_info", self.model_info)
        monkeypatch.setattr(huggingface_hub, "hf_hub_download", self.hf_hub_download)
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self.snapshot_download)

    def model_info(self, repo_id, **kw):
        if self.error:
            raise self.error
        assert kw["files_metadata"] and kw["timeout"]
        return SimpleNamespace(sha="abc123", siblings=[SimpleNamespace(rfilename=f, size=len(b))
                                                       for f, b in self.files.items()])

    def _write(self, local_dir, name):
        target = Path(local_dir) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(self.files[name])
        self.fetched.append(name)
        return str(target)

    def hf_hub_download(self, repo_id, filename, *, revision, local_dir, **kw):
        assert revision == "abc123"
        return self._write(local_dir, filename)

    def snapshot_download(self, repo_id, *, allow_patterns, revision, local_dir, tqdm_class, **kw):
        assert revision == "abc123" and tqdm_class is not None
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(allow_patterns):
            if self.fail_after is not None and i >= self.fail_after:
                raise ConnectionError("connection reset by peer")
            self._write(local_dir, name)
        return str(local_dir)


def test_pull_downloads_what_mlx_lm_needs_and_renames_when_complete(monkeypatch):
    fake = FakeHub(monkeypatch)
    path = hub.pull(REPO, quiet=True)
    assert path == models_dir() / "mlx-community--Tiny-4bit"
    names = sorted(p.name for p in path.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert [p.name for p in models_dir().iterdir()] == [path.name]  # no hidden partial left
    # a second pull is local: the hub is not asked again
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda *a, **k: pytest.fail("asked the hub"))
    assert hub.pull(REPO, quiet=True) == path
    assert "consolidated.safetensors" not in fake.fetched
    from squish.models import list_local, remove_model, resolve_model

    assert resolve_model(REPO) == path and [m.name for m in list_local()] == [path.name]
    assert list_local()[0].bits == 4 and list_local()[0].verdict == "no report"  # from config.json
    assert remove_model(REPO) == path.resolve() and not path.exists()


def test_interrupted_pull_stays_hidden_and_resumes(monkeypatch, capsys):
    from squish.models import list_local

    FakeHub(monkeypatch, fail_after=1)
    with pytest.raises(SystemFailure, match="run the same command again to resume"):
        hub.pull(REPO, quiet=True)
    partial = models_dir() / ".pull-mlx-community--Tiny-4bit"
    assert partial.is_dir() and (partial / "config.json").exists()
    assert list_local() == []  # never listed, never served
    fake = FakeHub(monkeypatch)
    path = hub.pull(REPO)
    assert (path / "model.safetensors").stat().st_size == 4096 and not partial.exists()
    assert not (path / ".cache").exists()
    assert "downloading mlx-community/Tiny-4bit (4 files" in capsys.readouterr().err
    assert "model.safetensors" in fake.fetched


@pytest.mark.parametrize("files, message", [
    ({"config.json": b"{}", "model-q4_k_m.gguf": b"x"}, "holds GGUF files"),
    ({"config.json": b"{}", "pytorch_model.bin": b"x"}, r"no model\*\.safetensors weights \(\.bin\)"),
    ({"model.safetensors": b"x"}, "no config.json"),
])
def test_repos_mlx_lm_cannot_load_are_refused_before_downloading(monkeypatch, files, message):
    fake = FakeHub(monkeypatch, files)
    with pytest.raises(InputError, match=message):
        hub.pull(REPO, quiet=True)
    assert fake.fetched == []
    assert not models_dir().exists() or list(models_dir().iterdir()) == []


def test_unknown_architecture_is_refused_after_config_only(monkeypatch):
    fake = FakeHub(monkeypatch, {**FILES, "config.json": json.dumps({"model_type": "no_such_arch"}).encode()})
    with pytest.raises(InputError, match="mlx_lm cannot run this model"):
        hub.pull(REPO, quiet=True)
    assert fake.fetched == ["config.json"]
    assert list(models_dir().iterdir()) == []


def test_gated_and_missing_repos_are_input_errors(monkeypatch):
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    response = SimpleNamespace(status_code=401, headers={}, request=None, url="")
    FakeHub(monkeypatch, error=GatedRepoError("gated", response=response))
    with pytest.raises(InputError, match="gated.*HF_TOKEN"):
        hub.pull("meta-llama/Llama-3.2-1B-Instruct", quiet=True)
    FakeHub(monkeypatch, error=RepositoryNotFoundError("missing", response=response))
    with pytest.raises(InputError, match="no such repository"):
        hub.pull("nobody/nothing", quiet=True)


def test_not_enough_disk_stops_before_downloading(monkeypatch):
    import squish.hardware

    fake = FakeHub(monkeypatch)
    monkeypatch.setattr(squish.hardware, "free_disk_bytes", lambda path: 100)
    with pytest.raises(SystemFailure, match="not enough disk space"):
        hub.pull(REPO, quiet=True)
    assert fake.fetched == []


def test_reachable_offline_settings_and_closed_port(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.reachable() == (False, "HF_HUB_OFFLINE is set")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    t0 = time.monotonic()
    ok, why = hub.reachable()
    assert not ok and "127.0.0.1:9" in why and time.monotonic() - t0 < 5


def test_reachable_when_a_server_answers_and_bounded_when_it_hangs(monkeypatch):
    class Answer(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert hub.reachable() == (True, "")
    finally:
        server.shutdown()
        server.server_close()
    import socket

    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        t0 = time.monotonic()
        ok, why = hub.reachable(timeout=1.0)
        assert not ok and time.monotonic() - t0 < 3


def test_hub_id_shapes():
    assert hub.looks_like_hub_id("mlx-community/Qwen3-8B-4bit")
    assert not hub.looks_like_hub_id("qwen3:8b")
    assert not hub.looks_like_hub_id("./a/b") and not hub.looks_like_hub_id("a/b/c")
    assert hub.local_name("Org/Repo.v2") == "Org--Repo.v2"


def test_build_download_uses_the_cached_snapshot_when_the_hub_is_unreachable(monkeypatch, tmp_path):
    """`squish quantize ORG/REPO` offline: never waits on the network (hub.reachable says no),
    builds from a snapshot already in the cache; with none, a clear SystemFailure."""
    from squish.quant.sources import download_hub

    calls = []

    def snapshot(repo_id, *, local_files_only=False, tqdm_class=None, **kw):
        calls.append(local_files_only)
        assert tqdm_class is not None
        if not local_files_only:
            pytest.fail("asked the hub although it is unreachable")
        if not cached:
            raise FileNotFoundError("not in the cache")
        return str(tmp_path / "snapshots" / "abc123")

    monkeypatch.setattr(hub, "reachable", lambda timeout=hub.REACH_TIMEOUT_S: (False, "test: offline"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    cached = True
    assert download_hub(REPO, quiet=True) == (tmp_path / "snapshots" / "abc123", "abc123")
    cached = False
    with pytest.raises(SystemFailure, match="cannot download mlx-community/Tiny-4bit .*test: offline"):
        download_hub(REPO, quiet=True)
    assert calls == [True, True]


def test_build_download_online_passes_the_shared_progress_bar(monkeypatch, tmp_path):
    from squish.quant.sources import download_hub

    seen = {}

    def snapshot(repo_id, *, tqdm_class=None, etag_timeout=None, local_files_only=False, **kw):
        seen.update(tqdm=tqdm_class, etag=etag_timeout, local=local_files_only)
        return str(tmp_path / "snapshots" / "def456")

    monkeypatch.setattr(hub, "reachable", lambda timeout=hub.REACH_TIMEOUT_S: (True, ""))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    assert download_hub(REPO, quiet=False)[1] == "def456"
    assert seen["tqdm"].__name__ == "SquishBar" and seen["etag"] and not seen["local"]
