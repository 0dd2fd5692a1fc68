"""`squish serve --hosts` refuses what cannot work before anything loads or launches,
and says which host or which constraint is at fault (loopback addresses only)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import make_tiny_artifact  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_artifact(tmp_path_factory.mktemp("dist") / "tiny-4bit")  # 4 heads, 2 KV heads


def serve(*args: str, timeout: float = 90) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "squish", "serve", *args], capture_output=True, text=True,
                       timeout=timeout, stdin=subprocess.DEVNULL)
    return r, time.monotonic() - t0


def test_a_model_that_cannot_be_split_is_refused_before_any_rank_starts(tiny):
    r, _ = serve(str(tiny), "--hosts", "127.0.0.1,127.0.0.1,127.0.0.1")
    assert r.returncode == 1, r.stderr
    assert "4 attention heads do not divide by 3" in r.stderr and "rank counts that work: 2" in r.stderr
    assert "starting" not in r.stderr and "mlx.launch" not in r.stderr  # nothing was launched


def test_a_host_that_cannot_be_reached_is_named_within_seconds(tiny):
    # 127.0.0.2 is this machine too, but mlx.launch reaches every host but 127.0.0.1 over ssh.
    r, took = serve(str(tiny), "--hosts", "127.0.0.1,127.0.0.2", "--port", "18761")
    assert r.returncode == 2, r.stderr
    assert "127.0.0.2" in r.stderr and "ssh" in r.stderr, r.stderr
    assert took < 60


def test_dry_run_shows_the_launch_and_cluster_options_need_hosts(tiny):
    r, _ = serve(str(tiny), "--hosts", "127.0.0.1,127.0.0.1", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "tensor-parallel" in r.stdout and "--backend ring --hosts 127.0.0.1,127.0.0.1" in r.stdout
    assert "SQUISH_CLUSTER=" in r.stdout and "mlx.launch" in r.stdout
    r, _ = serve(str(tiny), "--backend", "ring", "--dry-run")
    assert r.returncode == 1 and "--backend and --dist-port apply to --hosts" in r.stderr
