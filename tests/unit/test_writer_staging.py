"""A build killed with SIGKILL leaves its staging folder (nothing in the process can remove
it); the next build of the same target removes it, and never a folder of a build that is
still running. Found by the faults part of benchmarks/reliability.py."""

from __future__ import annotations

import os
import subprocess
import sys

from squish.quant.writer import ArtifactWriter


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_builds_staging_folder_is_removed_by_the_next_build(tmp_path):
    target = tmp_path / "model-4bit"
    stale = tmp_path / f".model-4bit.tmp-{_dead_pid()}-0badf00d"
    running = tmp_path / f".model-4bit.tmp-{os.getppid()}-12345678"  # a live process: kept
    other = tmp_path / f".other-4bit.tmp-{_dead_pid()}-0badf00d"  # another target: not ours
    for d in (stale, running, other):
        d.mkdir()
        (d / "part-00000.safetensors").write_bytes(b"x" * 10)
    w = ArtifactWriter(target)
    assert not stale.exists() and running.exists() and other.exists()
    assert w.staging_dir.name.startswith(f".model-4bit.tmp-{os.getpid()}-")
