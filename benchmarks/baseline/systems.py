"""The two systems under test, as black boxes: server processes spoken to over HTTP.

- Squish: ``squish serve MODEL --port P`` (``--squish-cmd`` overrides the command line).
- mlx_lm: ``python -m mlx_lm.server --model MODEL --port P`` with its defaults.

Both run on the same artifact folder. RSS is sampled from outside the process
(psutil, the process and its children) so neither server needs to cooperate.
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

SQUISH, MLX_LM = "squish", "mlx_lm"
SYSTEMS = (SQUISH, MLX_LM)
# Rate limiting off: mlx_lm.server has none, and a benchmark is one client sending many requests.
DEFAULT_SQUISH_CMD = "{python} -m squish serve {model} --port {port} --rate-limit 0"
DEFAULT_SQUISH_DRY_RUN = "{python} -m squish serve {model} --dry-run"
MLX_LM_CMD = "{python} -m mlx_lm.server --model {model} --port {port}"
# The closest mlx_lm counterpart of "the server before the model loads": its server module imported.
MLX_LM_DRY_RUN = "{python} -c 'import mlx_lm.server'"


@dataclass(frozen=True)
class SystemSpec:
    name: str
    serve_cmd: str           # template with {python} {model} {port}
    dry_run_cmd: str | None  # template with {python} {model}; None: not available

    def argv(self, template: str, model: Path, port: int | None = None) -> list[str]:
        return shlex.split(template.format(python=shlex.quote(sys.executable),
                                           model=shlex.quote(str(model)), port=port or 0))


def squish_serve_available() -> bool:
    """True once the Squish server (``squish.cli.serve``) is installed."""
    try:
        return importlib.util.find_spec("squish.cli.serve") is not None
    except ModuleNotFoundError:
        return False


def specs(squish_cmd: str | None = None, squish_dry_run_cmd: str | None = None) -> dict[str, SystemSpec]:
    return {
        SQUISH: SystemSpec(SQUISH, squish_cmd or DEFAULT_SQUISH_CMD,
                           squish_dry_run_cmd or (DEFAULT_SQUISH_DRY_RUN if not squish_cmd else None)),
        MLX_LM: SystemSpec(MLX_LM, MLX_LM_CMD, MLX_LM_DRY_RUN),
    }


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and its children, in bytes (0 once it is gone)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            continue
    return total


class RssSampler:
    """Samples a process tree's RSS every ``interval`` seconds in a thread.

    ``mark()`` starts a window; ``window_peak()`` is the peak since the last mark
    (so each request gets its own peak); ``overall_peak`` covers the sampler's life.
    """

    def __init__(self, pid: int, interval: float = 0.01):
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.overall_peak = 0
        self._window_peak = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        rss = tree_rss(self.proc)
        with self._lock:
            self.overall_peak = max(self.overall_peak, rss)
            self._window_peak = max(self._window_peak, rss)
        return rss

    def mark(self) -> None:
        with self._lock:
            self._window_peak = 0
        self.sample()

    def window_peak(self) -> int:
        self.sample()
        with self._lock:
            return self._window_peak

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


class Server:
    """One server process on a free port, its log in ``log_path``."""

    def __init__(self, spec: SystemSpec, model: Path, log_path: Path):
        self.spec = spec
        self.model = model
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.started_at = 0.0
        self.model_field = "default_model"
        self.sampler: RssSampler | None = None

    def start(self) -> "Server":
        argv = self.spec.argv(self.spec.serve_cmd, self.model, self.port)
        self._log = open(self.log_path, "ab")
        self.started_at = time.perf_counter()
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float) -> None:
        """Poll until the model is loaded: ``GET /health`` answers 200 (or, on a server
        without ``/health``, ``GET /v1/models`` does); then pick the model id to send."""
        deadline = time.perf_counter() + timeout
        with httpx.Client(timeout=5) as client:
            while time.perf_counter() < deadline:
                if not self.alive():
                    raise RuntimeError(f"{self.spec.name} server exited with code {self.proc.returncode}; "
                                       f"see {self.log_path}")
                try:
                    health = client.get(self.base_url + "/health").status_code
                except httpx.TransportError:
                    health = None
                if health in (200, 404):
                    models = self._models(client)
                    # /health 200 means loaded; a server without /health is ready once /v1/models answers
                    if health == 200 or models is not None:
                        self.model_field = pick_model_field(self.spec.name, models or {}, self.model)
                        return
                time.sleep(0.05)
        raise TimeoutError(f"{self.spec.name} server not ready after {timeout:.0f} s; see {self.log_path}")

    def _models(self, client: httpx.Client) -> dict | None:
        if self.spec.name == MLX_LM:
            return None  # mlx_lm.server's /v1/models lists the HF cache (and fails without one)
        try:
            r = client.get(self.base_url + "/v1/models")
            return r.json() if r.status_code == 200 else None
        except (httpx.TransportError, ValueError):
            return None

    def start_sampling(self) -> RssSampler:
        self.sampler = RssSampler(self.proc.pid)
        return self.sampler

    def process_peak(self) -> int:
        """The server's whole-process peak RSS since launch: the kernel's VmHWM where the OS
        keeps one (Linux), and the sampler's peak (every 10 ms from launch) in any case."""
        peak = self.sampler.overall_peak if self.sampler else 0
        try:
            with open(f"/proc/{self.proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        return peak

    def stop(self) -> None:
        if self.sampler:
            self.sampler.stop()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()


def pick_model_field(system: str, models_json: dict, model_path: Path) -> str:
    """The ``model`` value to send: mlx_lm.server serves its ``--model`` as
    ``default_model`` (any other value makes it try to load that model); other
    servers get the id they list that matches the artifact, else the first one."""
    if system == MLX_LM:
        return "default_model"
    ids = [m.get("id") for m in models_json.get("data", []) if isinstance(m, dict) and m.get("id")]
    for i in ids:
        if i in (model_path.name, str(model_path)):
            return i
    return ids[0] if ids else "default_model"


def peak_child_rss(argv: list[str], timeout: float = 300) -> dict:
    """Run ``argv`` to completion; its peak RSS (bytes) from the kernel's ru_maxrss,
    measured in a fresh wrapper so no other child is counted."""
    wrapper = ("import json, resource, subprocess, sys, time\n"
               "t = time.perf_counter()\n"
               "r = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
               "dt = time.perf_counter() - t\n"
               "m = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
               "m = m if sys.platform == 'darwin' else m * 1024\n"
               "print(json.dumps({'rc': r.returncode, 'peak_rss_bytes': m, 'seconds': dt,"
               " 'stdout': r.stdout[-4000:], 'stderr': r.stderr[-4000:]}))\n")
    out = subprocess.run([sys.executable, "-c", wrapper, *argv], capture_output=True, text=True,
                         timeout=timeout, check=True)
    import json

    return json.loads(out.stdout.strip().splitlines()[-1])
