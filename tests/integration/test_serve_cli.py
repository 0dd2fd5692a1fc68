"""``squish serve`` as a command: a damaged artifact is an input error, reported before the port."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402


@pytest.fixture()
def damaged(tmp_path) -> Path:
    art = make_tiny_artifact(tmp_path / "tiny-4bit")
    weights = art / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # truncated
    return art


def serve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squish", "serve", *args], capture_output=True, text=True,
                          timeout=60)


def test_a_damaged_artifact_exits_1_with_a_message_and_no_traceback(damaged):
    r = serve(str(damaged), "--port", "1")
    assert r.returncode == 1, r.stderr
    assert "model.safetensors" in r.stderr and ("truncated" in r.stderr or "size" in r.stderr)
    assert "Traceback" not in r.stderr + r.stdout


def test_the_model_is_checked_before_the_port(damaged):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        r = serve(str(damaged), "--port", str(busy))
    assert r.returncode == 1
    assert "model.safetensors" in r.stderr and "cannot listen" not in r.stderr
