"""Shared by the benchmark scripts: result folders, environment metadata, statistics.

Results go to benchmarks/results/<UTC timestamp>_<name>/ and are never overwritten.
"""

from __future__ import annotations

import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def environment() -> dict:
    import mlx.core as mx
    import mlx_lm

    import squish
    from squish import hardware

    return {**hardware.describe(), "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__,
            "squish": squish.__version__}


def result_dir(name: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = ROOT / "benchmarks" / "results" / f"{stamp}_{name}"
    path.mkdir(parents=True, exist_ok=False)
    return path


def write_results(name: str, config: dict, results: dict, report_md: str) -> Path:
    out = result_dir(name)
    (out / "config.json").write_text(json.dumps({**config, "environment": environment()}, indent=2) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "report.md").write_text(report_md)
    return out


def percentiles(xs: list[float]) -> dict:
    s = sorted(xs)

    def q(p: float) -> float:
        if not s:
            return float("nan")
        k = (len(s) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (k - lo)

    return {"n": len(s), "p50": q(0.5), "p95": q(0.95), "p99": q(0.99),
            "mean": statistics.fmean(s) if s else float("nan"),
            "stdev": statistics.stdev(s) if len(s) > 1 else 0.0}


def machine() -> dict:
    """Full hardware and software metadata for a benchmark result (superset of
    ``environment()``): chip, cores, RAM, OS, backend, GPU, versions, git state,
    load average and thermal state where the OS exposes them."""
    import os
    import platform

    import psutil

    env = environment()
    info = {
        **env,
        "chip": _chip_name(),
        "platform": platform.platform(),
        "cpu_physical_cores": psutil.cpu_count(logical=False),
        "cpu_logical_cores": psutil.cpu_count(logical=True),
        "gpu": _gpu(env.get("backend")),
        "git": _git_state(),
        "python_executable": sys.executable,
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "thermal": thermal_state(),
    }
    if platform.system() == "Darwin":
        info["macos"] = platform.mac_ver()[0]
    return info


def thermal_state() -> dict | None:
    """What the OS says about temperature/throttling now, or None where it says nothing.

    macOS: ``pmset -g therm`` (CPU speed limit, thermal warnings). Linux: the
    thermal zones under /sys/class/thermal (°C) and the CPU frequency governor.
    """
    import platform
    import subprocess

    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["pmset", "-g", "therm"], capture_output=True, text=True, timeout=5)
            return {"source": "pmset -g therm", "text": out.stdout.strip()}
        except (OSError, subprocess.SubprocessError):
            return None
    zones = {}
    for zone in sorted(Path("/sys/class/thermal").glob("thermal_zone*")):
        try:
            kind = (zone / "type").read_text().strip()
            zones[f"{zone.name}:{kind}"] = int((zone / "temp").read_text().strip()) / 1000.0
        except (OSError, ValueError):
            continue
    governor = Path("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    state = {}
    if zones:
        state["zones_celsius"] = zones
    if governor.exists():
        state["cpufreq_governor"] = governor.read_text().strip()
    return {"source": "/sys/class/thermal", **state} if state else None


def _chip_name() -> str:
    import platform
    import subprocess

    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True, timeout=5)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu(backend: str | None) -> dict | None:
    import subprocess

    if backend == "cuda":
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,temperature.gpu,clocks.sm",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            if out.returncode == 0:
                return {"source": "nvidia-smi", "gpus": [l.strip() for l in out.stdout.splitlines() if l.strip()]}
        except (OSError, subprocess.SubprocessError):
            pass
    if backend in ("metal", "cuda"):
        try:
            import mlx.core as mx

            return {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in mx.device_info().items()}
        except Exception:  # noqa: BLE001 - metadata only; never fail a benchmark over it
            return None
    return None


def _git_state() -> dict | None:
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode != 0:
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
