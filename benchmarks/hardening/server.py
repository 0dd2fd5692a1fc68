"""A ``squish serve`` subprocess for the reliability parts, and what they read from it.

``Server(artifact, *args, api_key=None, log=PATH)`` starts ``python -m squish serve`` on
a free loopback port (with the key, or with ``SQUISH_API_KEY`` removed from its
environment when there is none) and waits for ``/health``. ``rss()`` is the resident
memory of the server and its children (psutil); ``metrics()`` the ``/metrics`` samples
without labels; ``inflight()`` what ``/health`` reports.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 300


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: Path | str, *args: str, api_key: str | None = None,
                 log: Path | None = None, ready_timeout: float = READY_TIMEOUT_S):
        self.artifact = Path(artifact)
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k != "SQUISH_API_KEY"}
        if api_key:
            env["SQUISH_API_KEY"] = api_key
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        self.log_path = Path(log) if log else Path(os.devnull)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.args = [sys.executable, "-m", "squish", "serve", str(self.artifact), "--port", str(self.port), *args]
        self.proc = subprocess.Popen(self.args, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started = time.monotonic()
        deadline = self.started + ready_timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"squish serve exited with {self.proc.returncode}; see {self.log_path}")
            try:
                r = httpx.get(self.url + "/health", timeout=5)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"squish serve was not ready after {ready_timeout:g}s; see {self.log_path}")
            time.sleep(0.25)
        self.ready_s = time.monotonic() - self.started
        self.model = r.json()["model"]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def health(self, timeout: float = 10) -> httpx.Response:
        return httpx.get(self.url + "/health", timeout=timeout)

    def inflight(self) -> int:
        return int(self.health().json()["inflight"])

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of ``/metrics`` (``name -> value``); labelled ones summed by name."""
        text = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10).text
        out: dict[str, float] = {}
        for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([0-9.eE+-]+|NaN)$", text, re.M):
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
        return out

    def rss(self) -> int:
        import psutil

        try:
            p = psutil.Process(self.proc.pid)
            return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
        except psutil.Error:
            return 0

    def wait_idle(self, timeout: float = 120.0) -> float:
        """Seconds until ``/health`` reports nothing in flight (raises after ``timeout``)."""
        t0 = time.monotonic()
        while self.inflight() != 0:
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"requests still in flight after {timeout:g}s")
            time.sleep(0.05)
        return time.monotonic() - t0

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
