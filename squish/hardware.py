"""What machine we are on, and the zero-config choices that follow from it.

Nothing here imports MLX at module import time: ``backend()`` asks MLX lazily.
"""

from __future__ import annotations

import platform
import shutil
from functools import lru_cache
from pathlib import Path

# The dtype an artifact is built for, per backend. Half precision is the fast
# path on Metal and CUDA; on MLX's CPU backend a 4-bit quantized matmul with
# float16 scales measured ~40x slower than with float32 (docs/architecture.md),
# so CPU builds keep scales, biases and norms in float32.
BUILD_DTYPE = {"metal": "float16", "cuda": "bfloat16", "cpu": "float32"}


@lru_cache(maxsize=1)
def backend() -> str:
    """``metal``, ``cuda`` or ``cpu``: where MLX will run by default."""
    import mlx.core as mx

    if mx.default_device() == mx.cpu:
        return "cpu"
    if platform.system() == "Darwin" and mx.metal.is_available():
        return "metal"
    return "cuda" if mx.cuda.is_available() else "cpu"


def default_build_dtype() -> str:
    return BUILD_DTYPE[backend()]


def default_dtype_bytes() -> int:
    """Bytes per element of this backend's build dtype, which the KV cache shares: what the
    memory estimates of squish/sizing.py take."""
    return 4 if default_build_dtype() == "float32" else 2


def total_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def available_memory_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists():
        p = p.parent
    return int(shutil.disk_usage(p).free)


def describe() -> dict:
    """Hardware facts for manifests and benchmark results."""
    import psutil

    return {
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": psutil.cpu_count(logical=True),
        "memory_bytes": total_memory_bytes(),
        "backend": backend(),
        "python": platform.python_version(),
    }


def _libc():
    """glibc through ctypes on Linux, else None (macOS, musl: nothing to tune)."""
    if platform.system() != "Linux":
        return None
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim  # noqa: B018 - glibc only
    except (OSError, AttributeError):
        return None
    return libc


def release_free_heap() -> None:
    """Return malloc's free pages to the OS (glibc's ``malloc_trim``; a no-op elsewhere).

    Called after the model loads and whenever the engine's batch drains: freed
    parse buffers and per-request temporaries otherwise stay in RSS (measured:
    34 MB after loading SmolLM2; see docs/benchmarks.md). Cost: milliseconds."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)

