"""End to end: ``squish chat`` as a subprocess on the real SmolLM2 INT4 artifact."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def chat(artifact: Path, stdin: str, *extra: str, timeout: float = 110) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "squish", "chat", str(artifact), *extra], input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def test_chat_replies_per_line_keeps_history_and_resets(smollm2_artifact):
    script = "What is 2+2? Answer with a number.\nAnd that number plus one?\n/reset\n/exit\nnever read\n"
    r = chat(smollm2_artifact, script, "--temperature", "0", "--max-tokens", "24", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # -q: replies only
    replies = [line for line in r.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2 and "4" in replies[0], r.stdout
    again = chat(smollm2_artifact, "What is 2+2? Answer with a number.\n", "--temperature", "0",
                 "--max-tokens", "24", "-q")
    assert again.returncode == 0 and again.stdout.splitlines()[0] == r.stdout.splitlines()[0]  # greedy


def test_chat_notes_go_to_stderr_and_bad_input_exits_1(smollm2_artifact, tmp_path):
    r = chat(smollm2_artifact, "Hi\n", "--temperature", "0", "--max-tokens", "4")
    assert r.returncode == 0, r.stderr
    assert "chatting with" in r.stderr and "reply cut at 4 tokens" in r.stderr
    assert "chatting with" not in r.stdout and r.stdout.strip()
    bad = chat(tmp_path / "missing", "Hi\n", "-q")
    assert bad.returncode == 1 and "error:" in bad.stderr and bad.stdout == ""
    assert chat(smollm2_artifact, "Hi\n", "--top-p", "0").returncode == 1


def test_chat_on_a_broken_artifact_exits_2(smollm2_artifact, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(smollm2_artifact, broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    r = chat(broken, "Hi\n", "-q")
    assert r.returncode == 2 and "truncated" in r.stderr and r.stdout == ""
