"""The cluster's health channel: which ranks are alive, and how much memory each holds.

Why it exists: MLX's collectives have no timeout. Measured on this machine (MLX 0.32.4,
ring backend over loopback): when a peer process dies, a pending ``all_sum`` raises
``[ring] connection to a peer was lost`` within about a second; when a peer stops
answering without closing its sockets (a stopped process, a hung or unplugged host),
the ``all_sum`` blocks forever, and a rank that never starts leaves ``init`` waiting
30 s or more. So Squish watches the ranks beside MLX: every worker rank keeps one TCP
connection to rank 0 and sends one line of JSON every ``BEAT_S`` seconds (its phase
and MLX memory); rank 0 answers every line. A closed connection means the process is
gone (reported at once); ``TIMEOUT_S`` seconds of silence (``LOAD_TIMEOUT_S`` while the
ranks start and load) means it stopped answering. Silence is counted only while the
watcher itself runs: on a starved machine a thread that wakes up late reads what is
waiting and starts counting anew, rather than blaming the other side for its own delay.
Either side that loses the other reports it; rank 0 names the rank and its host.

The channel carries no model data and no commands: requests, sampling decisions and
tokens travel only through MLX's collectives (``squish.runtime.distributed``).

Threads and shared state: ``Monitor`` (rank 0) runs an accept thread, one reader
thread per worker and a watchdog thread; they share ``Monitor._ranks`` under
``Monitor._lock``. Callbacks (``on_failure``, ``on_beat``) run on those threads and
must be thread-safe. ``Beacon`` (a worker) runs one thread; ``stats`` is called on it.
"""

from __future__ import annotations

import json
import logging
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("squish.cluster")

BEAT_S = 0.5
TIMEOUT_S = 5.0  # silence that means "stopped answering" once the ranks serve
LOAD_TIMEOUT_S = 60.0  # the same while a rank starts and loads (heavy imports can stall its threads)
STALL_S = 1.0  # a watcher whose own loop stalled this long (its process starved) starts counting anew
HELLO_TIMEOUT_S = 5.0
MAX_LINE = 4096


@dataclass
class RankState:
    rank: int
    host: str
    up: bool = False  # said hello and has not failed
    last_seen: float = 0.0
    conn: socket.socket | None = None
    error: str | None = None
    info: dict = field(default_factory=dict)  # the latest beat: phase, memory


class Monitor:
    """Rank 0's side: accepts every worker's connection and watches it."""

    def __init__(self, bind: str, port: int, token: str, hosts: list[str], *,
                 on_failure: Callable[[int, str], None], on_beat: Callable[[int, dict], None] | None = None,
                 timeout: float = TIMEOUT_S, load_timeout: float = LOAD_TIMEOUT_S):
        self.token, self.hosts, self.timeout, self.load_timeout = token, hosts, timeout, load_timeout
        self._on_failure, self._on_beat = on_failure, on_beat
        self._lock = threading.Lock()
        self._ranks = {r: RankState(r, h) for r, h in enumerate(hosts) if r > 0}
        self._stopping = False
        self.failure: str | None = None
        self._sock = socket.create_server((bind, port), reuse_port=False)
        self._closed = threading.Event()
        self._open = 0  # connections of joined ranks still open (under _lock)

    def start(self) -> None:
        for target, name in ((self._accept, "accept"), (self._watch, "watchdog")):
            threading.Thread(target=target, name=f"squish-health-{name}", daemon=True).start()

    def describe(self, rank: int) -> str:
        return f"rank {rank} ({self.hosts[rank]})"

    def wait_for_workers(self, deadline: float) -> list[int]:
        """Ranks that have not said hello by ``deadline`` (monotonic), or [] once all have."""
        while True:
            with self._lock:
                missing = [r for r, s in self._ranks.items() if not s.up and s.error is None]
            if not missing or self.failure or time.monotonic() > deadline:
                return missing
            time.sleep(0.05)

    def stopping(self) -> None:
        """An orderly stop begins: connections that close from now on are expected."""
        with self._lock:
            self._stopping = True

    def wait_closed(self, timeout: float) -> bool:
        """After ``stopping``: wait until every worker has closed its connection (exited)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self._open == 0:
                    return True
            time.sleep(0.05)
        return False

    def status(self) -> list[dict]:
        with self._lock:
            rows = [{"rank": 0, "host": self.hosts[0], "up": True}]  # this process
            for s in self._ranks.values():
                row = {"rank": s.rank, "host": s.host, "up": s.up}
                if s.error:
                    row["error"] = s.error
                if s.info.get("phase"):
                    row["phase"] = s.info["phase"]
                rows.append(row)
        return rows

    def close(self) -> None:
        self._closed.set()
        try:
            self._sock.close()
        except OSError:
            pass

    # ---- threads -------------------------------------------------------------------------
    def _fail(self, rank: int, why: str) -> None:
        with self._lock:
            s = self._ranks[rank]
            if s.error is not None or self._stopping:
                return
            s.up, s.error = False, why
            first = self.failure is None
            msg = f"{self.describe(rank)} {why}"
            if first:
                self.failure = msg
        log.error("%s", msg)
        if first:
            self._on_failure(rank, msg)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="squish-health-rank", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        rank, opened = None, False
        try:
            conn.settimeout(HELLO_TIMEOUT_S)
            reader = conn.makefile("r", encoding="utf-8")
            hello = json.loads(reader.readline(MAX_LINE) or "{}")
            rank = hello.get("rank")
            if hello.get("token") != self.token or rank not in self._ranks:
                log.warning("health channel: refused a connection that is not a rank of this cluster")
                conn.close()
                return
            conn.settimeout(None)
            with self._lock:
                s = self._ranks[rank]
                s.up, s.last_seen, s.info, s.conn = True, time.monotonic(), hello, conn
                self._open += 1
                opened = True
            log.info("%s joined (pid %s)", self.describe(rank), hello.get("pid"))
            while True:
                line = reader.readline(MAX_LINE)
                if not line:
                    break
                beat = json.loads(line)
                with self._lock:
                    s.last_seen, s.info = time.monotonic(), beat
                if self._on_beat is not None:
                    self._on_beat(rank, beat)
                conn.sendall(b"ok\n")
        except (OSError, ValueError):
            pass
        finally:
            conn.close()
            if opened:
                with self._lock:
                    self._open -= 1
        if opened and not self._closed.is_set():
            self._fail(rank, "exited or closed its connection (the process is gone)")

    def _limit(self, s: RankState) -> float:
        return self.timeout if s.info.get("phase") == "ready" else self.load_timeout

    def _watch(self) -> None:
        last = time.monotonic()
        while not self._closed.wait(BEAT_S / 2):
            now = time.monotonic()
            stalled, last = now - last > STALL_S, now
            with self._lock:
                if stalled:  # this process was starved: nobody can be blamed for that
                    for s in self._ranks.values():
                        s.last_seen = max(s.last_seen, now)
                silent = [(r, s.conn, self._limit(s)) for r, s in self._ranks.items()
                          if s.up and now - s.last_seen > self._limit(s)]
            for r, conn, limit in silent:
                try:
                    waiting = bool(select.select([conn], [], [], 0)[0])  # beats not read yet
                except (OSError, ValueError):
                    waiting = False
                if not waiting:
                    self._fail(r, f"stopped answering (no heartbeat for {limit:g} s)")


class Beacon:
    """A worker's side: one connection to rank 0, a beat every ``BEAT_S`` seconds."""

    def __init__(self, host: str, port: int, token: str, rank: int, *, stats: Callable[[], dict],
                 on_lost: Callable[[str], None], timeout: float = TIMEOUT_S,
                 load_timeout: float = LOAD_TIMEOUT_S):
        self.addr, self.token, self.rank = (host, port), token, rank
        self.timeout, self.load_timeout = timeout, load_timeout
        self._stats, self._on_lost = stats, on_lost
        self._sock: socket.socket | None = None
        self._quiet = threading.Event()

    def connect(self, deadline: float) -> None:
        """Connect and say hello, retrying until ``deadline`` (rank 0 may still be starting).
        Raises OSError naming the address and the last error."""
        import os

        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                sock = socket.create_connection(self.addr, timeout=min(5.0, max(0.5, deadline - time.monotonic())))
                sock.settimeout(None)
                hello = {"rank": self.rank, "token": self.token, "pid": os.getpid(), **self._stats()}
                sock.sendall((json.dumps(hello) + "\n").encode())
                self._sock = sock
                return
            except OSError as exc:
                last = exc
                time.sleep(0.5)
        raise OSError(f"cannot reach rank 0's health channel at {self.addr[0]}:{self.addr[1]}: {last}")

    def start(self) -> None:
        threading.Thread(target=self._run, name="squish-health-beacon", daemon=True).start()

    def quiet(self) -> None:
        """An orderly stop begins: losing rank 0 from now on is expected."""
        self._quiet.set()

    def _run(self) -> None:
        sock = self._sock
        assert sock is not None
        heard = last = time.monotonic()
        why = None
        try:
            while why is None:
                stats = self._stats()
                sock.sendall((json.dumps(stats) + "\n").encode())
                end = time.monotonic() + BEAT_S
                while why is None:  # read whatever waits, even when this thread woke up late
                    ready, _, _ = select.select([sock], [], [], max(0.0, end - time.monotonic()))
                    if ready:
                        if not sock.recv(MAX_LINE):
                            why = "rank 0 closed the health channel (the server stopped or died)"
                        heard = time.monotonic()
                    elif time.monotonic() >= end:
                        break
                now = time.monotonic()
                if now - last > BEAT_S + STALL_S:  # this process was starved: count anew
                    heard = max(heard, now)
                last = now
                limit = self.timeout if stats.get("phase") == "ready" else self.load_timeout
                if why is None and now - heard > limit:
                    why = f"rank 0 stopped answering (no reply for {limit:g} s)"
        except (BrokenPipeError, ConnectionResetError):
            why = "rank 0 closed the health channel (the server stopped or died)"
        except OSError as exc:
            why = f"lost the health channel to rank 0: {exc}"
        except ValueError:  # select() on a socket closed under it: this beacon was stopped
            if sock.fileno() != -1:
                raise
            return
        if not self._quiet.is_set():
            self._on_lost(why)
