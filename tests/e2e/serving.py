"""A real ``squish serve`` subprocess for end-to-end tests, and its official clients.

``Server(model_path, *extra_args)`` starts ``python -m squish serve`` on a free
port with the API key ``KEY`` and waits for ``/health``; ``client()`` is an
``openai.OpenAI`` for it (``anthropic()`` / ``ollama()`` the other protocols'
official clients). ``stop()`` sends SIGTERM and returns the exit code.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import httpx
import openai

KEY = "e2e-key"
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, artifact: Path, *extra: str, timeout: float = REQUEST_TIMEOUT_S, ready_s: float = 120):
        self.artifact = artifact
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SQUISH_API_KEY": KEY}
        self.log = tempfile.NamedTemporaryFile("w+", prefix="squish-serve-", suffix=".log", delete=False)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "squish", "serve", str(artifact), "--port", str(self.port),
             "--request-timeout", str(timeout), *extra],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + ready_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.output()
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        else:
            raise AssertionError("server did not become ready:\n" + self.output())
        self.model = httpx.get(self.url + "/health").json()["model"]

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", KEY), max_retries=0,
                             timeout=kw.pop("timeout", 60), **kw)

    def anthropic(self, **kw):
        import anthropic

        return anthropic.Anthropic(base_url=self.url, api_key=kw.pop("api_key", KEY), max_retries=0,
                                   timeout=kw.pop("timeout", 60), **kw)

    def ollama(self, **kw):
        import ollama

        headers = {"Authorization": f"Bearer {kw.pop('api_key', KEY)}"}
        return ollama.Client(host=self.url, headers=headers, timeout=kw.pop("timeout", 60), **kw)

    def metrics(self) -> str:
        return httpx.get(self.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text

    def metric(self, name: str, text: str | None = None) -> float:
        """One sample of ``/metrics`` (of ``text`` when given), 0 when absent."""
        m = re.search(rf"^{re.escape(name)} ([0-9.e+]+)$", self.metrics() if text is None else text, re.M)
        return float(m.group(1)) if m else 0.0

    def cancelled(self) -> float:
        return self.metric('squish_completions_total{outcome="cancelled"}')

    def leave_stream(self, path: str, body: dict, until: Callable[[int, str], bool], headers: dict | None = None):
        """Stream ``body`` to ``path`` and close the connection once ``until(line number, line)``."""
        headers = headers or {"Authorization": f"Bearer {KEY}"}
        with httpx.stream("POST", self.url + path, json=body, headers=headers, timeout=30) as r:
            for i, line in enumerate(r.iter_lines()):
                if until(i, line):
                    break

    def wait_cancelled(self, before: float, within_s: float = 10,
                       what: str = "generation was not cancelled after the client went away") -> None:
        """The cancelled-completions counter passes ``before`` within ``within_s``; then nothing is in flight."""
        deadline = time.monotonic() + within_s
        while self.cancelled() <= before:
            assert time.monotonic() < deadline, what
            time.sleep(0.2)
        self.wait_idle()

    def wait_idle(self, seconds: float = 5) -> None:
        """In-flight back to 0 (the engine counts a request out just after its final event)."""
        deadline = time.monotonic() + seconds
        while httpx.get(self.url + "/health").json()["inflight"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(self.url + "/health").json()["inflight"] == 0

    def healthy(self) -> None:
        r = httpx.get(self.url + "/health", timeout=10)
        assert r.status_code == 200 and r.json()["status"] == "ok", r.text
        assert self.proc.poll() is None

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(20)
        finally:
            self.log.close()

    def cleanup(self) -> None:
        os.unlink(self.log.name)


