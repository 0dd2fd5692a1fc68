"""``squish serve MODEL --hosts H1,H2,...``: one server over several machines.

This process (the supervisor) checks everything it can before anything loads: the
hosts and the backend, the model and whether it can be split over that many ranks
(``squish.runtime.sharding.plan``), the ports, and that every remote host answers
over ssh and has Squish at the same path. Then it starts one rank per host entry
through MLX's own launcher (``mlx.launch``), which runs ``python -m squish serve``
on every host with ``SQUISH_CLUSTER`` set (``ClusterSpec``). It passes the ranks'
output through, and the API key (if any) and a later "stop" reach the ranks on the
launcher's standard input, which the launcher forwards to every rank (the key never
appears on a command line). Ctrl-C / SIGTERM asks rank 0 for an orderly stop; a
second one kills the launcher's process group.

``run_rank`` is the other side: the code every rank runs. Rank 0 serves HTTP on a
``LeaderEngine``; the others run ``run_worker``. When a rank fails, rank 0 keeps
answering ``/health`` with 503 and the failed rank for ``LINGER_S`` seconds, then
stops; the launcher then stops the other ranks, and the supervisor kills whatever
still runs ``KILL_GRACE_S`` seconds after rank 0 ended (a stopped process does not
die of SIGTERM) and exits with rank 0's code.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import secrets
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from squish.errors import InputError, SquishError, SystemFailure

log = logging.getLogger("squish.cluster")

DEFAULT_PORT = 32323  # mlx.launch's own default first port
SSH_TIMEOUT_S = 5
PREFLIGHT_S = 20.0
LINGER_S = 10.0
KILL_GRACE_S = 5.0
STDIN_WAIT_S = 10.0
LOCAL = "127.0.0.1"  # the one name mlx.launch starts without ssh
_NODE = re.compile(r"Node with rank (\d+) (?:exited with code (-?\d+)|was killed)")


@dataclass
class Host:
    name: str  # what mlx.launch reaches over ssh (or runs locally: exactly 127.0.0.1)
    ip: str | None  # the address the ranks connect to


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def read_hosts(args) -> tuple[list[Host], str]:
    """The ranks' hosts (one entry per rank) and the backend, from --hosts or --hostfile."""
    backend = args.backend
    if args.hostfile is not None:
        try:
            data = json.loads(Path(args.hostfile).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"--hostfile {args.hostfile}: unreadable ({exc}); it is mlx.launch's JSON hostfile "
                             "(docs/distributed.md)") from exc
        entries = data.get("hosts", []) if isinstance(data, dict) else data
        backend = backend or (data.get("backend") if isinstance(data, dict) else None) or None
        try:
            hosts = [Host(e["ssh"], _ip((e.get("ips") or [""])[0])) for e in entries]
        except (KeyError, TypeError) as exc:
            raise InputError(f"--hostfile {args.hostfile}: every host needs an \"ssh\" name ({exc})") from exc
        if backend == "jaccl" and not all(len(e.get("rdma") or []) == len(entries) for e in entries):
            raise InputError(f"--hostfile {args.hostfile}: the jaccl backend needs every host's \"rdma\" list "
                             "(one device per peer, null for itself); `mlx.distributed_config --backend jaccl` "
                             "writes it")
    else:
        names = [h.strip() for h in args.hosts.split(",")]
        if not all(names):
            raise InputError(f"--hosts {args.hosts!r}: an empty host name")
        hosts = [Host(n, _ip(n)) for n in names]
        if backend == "jaccl":
            raise InputError("--backend jaccl needs --hostfile (each pair of Macs' RDMA devices); "
                             "`mlx.distributed_config --backend jaccl` writes one")
    backend = backend or "ring"
    if backend not in ("ring", "jaccl"):
        raise InputError(f"--hostfile backend {backend!r}: Squish runs the ring or jaccl backend")
    if len(hosts) < 2:
        raise InputError("--hosts / --hostfile name one rank; for one machine run `squish serve` without them")
    if missing := [h.name for h in hosts if h.ip is None]:
        raise InputError(f"{', '.join(missing)}: MLX's {backend} backend connects the ranks by IP address; "
                         "give IPs in --hosts, or a --hostfile with \"ssh\" names and \"ips\"")
    if not _is_this_machine(hosts[0].ip):
        raise InputError(f"{hosts[0].name}: rank 0 (the first host) serves the API and must be this machine; "
                         "run `squish serve` there, or list this machine first")
    return hosts, backend


def _is_this_machine(ip: str) -> bool:
    import psutil

    if ipaddress.ip_address(ip).is_loopback:
        return True
    return any(a.address.split("%")[0] == ip for addrs in psutil.net_if_addrs().values() for a in addrs)


def _port_busy(ip: str, port: int) -> str | None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as exc:
            return str(exc)
    return None


def choose_ports(hosts: list[Host], wanted: int | None) -> int:
    """The first of ``len(hosts) + 1`` ports: one per rank for MLX, then the health channel.
    Checked on this machine's ranks; without --dist-port, the next free block is taken."""
    n = len(hosts) + 1
    ips = [h.ip if _is_this_machine(h.ip) else None for h in hosts] + [hosts[0].ip]
    for base in ([wanted] if wanted else range(DEFAULT_PORT, DEFAULT_PORT + 2000, n)):
        if base + n > 65536:
            break
        busy = [(p, why) for p, ip in zip(range(base, base + n), ips) if ip and (why := _port_busy(ip, p))]
        if not busy:
            return base
        if wanted:
            raise InputError(f"--dist-port {wanted}: port {busy[0][0]} is in use ({busy[0][1]}); the ranks need "
                             f"{wanted}..{wanted + n - 1}")
    raise SystemFailure(f"no {n} free consecutive ports from {DEFAULT_PORT}; choose them with --dist-port")


def preflight(hosts: list[Host]) -> None:
    """Every host mlx.launch reaches over ssh answers, and has this Python with Squish and MLX."""
    import shutil

    remote = sorted({h.name for h in hosts if h.name != LOCAL})
    if not remote:
        return
    if shutil.which("ssh") is None:
        raise SystemFailure(f"ssh is not installed: mlx.launch starts the ranks on {', '.join(remote)} over ssh")
    probe = f"{shlex.quote(sys.executable)} -c 'import squish, mlx.core'"

    def check(name: str) -> str | None:
        cmd = ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={SSH_TIMEOUT_S}", name, probe]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=PREFLIGHT_S, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"{name}: no answer over ssh within {PREFLIGHT_S:g} s"
        if r.returncode == 255:
            return f"{name}: cannot reach it over ssh: {(r.stderr.strip().splitlines() or ['?'])[-1]}"
        if r.returncode != 0:
            return (f"{name}: {sys.executable} with Squish and MLX is not there "
                    f"({(r.stderr.strip().splitlines() or ['?'])[-1]}); install Squish at the same path on every host")
        return None

    with ThreadPoolExecutor(len(remote)) as pool:
        problems = [p for p in pool.map(check, remote) if p]
    if problems:
        raise SystemFailure("cannot start the ranks: " + "; ".join(problems))


def _rank_argv(args, model: str) -> list[str]:
    """`squish serve` options every rank gets (the API key travels on stdin instead)."""
    out = [model, "--host", args.host, "--port", str(args.port), "--max-tokens", str(args.max_tokens),
           "--max-batch", str(args.max_batch), "--max-queue", str(args.max_queue),
           "--rate-limit", str(args.rate_limit), "--rate-burst", str(args.rate_burst),
           "--request-timeout", str(args.request_timeout), "--queue-timeout", str(args.queue_timeout),
           "--max-body-kb", str(args.max_body_kb)]
    if args.prefix_cache_mb is not None:
        out += ["--prefix-cache-mb", str(args.prefix_cache_mb)]
    for origin in args.cors_origin:
        out += ["--cors-origin", origin]
    if args.insecure_no_auth:
        out.append("--insecure-no-auth")
    if args.quiet:
        out.append("-q")
    return out


def _launcher() -> list[str]:
    script = Path(sys.executable).with_name("mlx.launch")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"]


def launch(args, settings) -> int:
    """The supervisor: check, start every rank through mlx.launch, pass output through."""
    from squish.artifact import check_files, read_manifest
    from squish.models import resolve_model
    from squish.runtime import sharding
    from squish.runtime.ranks import ENV, ClusterSpec

    hosts, backend = read_hosts(args)
    path = resolve_model(args.model)
    check_files(path, read_manifest(path))
    mode = sharding.plan(json.loads((path / "config.json").read_text()), len(hosts))
    model = str(Path(args.model).expanduser().resolve()) if args.model and Path(args.model).expanduser().is_dir() \
        else (args.model or str(path))
    base = choose_ports(hosts, args.dist_port)
    spec = ClusterSpec([h.name for h in hosts], hosts[0].ip, base + len(hosts), secrets.token_hex(16), backend)
    where = ["--hostfile", str(Path(args.hostfile).resolve())] if args.hostfile else ["--hosts", args.hosts]
    cmd = [*_launcher(), "--backend", backend, *where, "--starting-port", str(base),
           "--env", f"{ENV}={spec.to_env()}", "--", sys.executable, "-m", "squish", "serve", *_rank_argv(args, model)]
    what = (f"{len(hosts)} ranks on {', '.join(h.name for h in hosts)}: {mode}-parallel {path.name}, "
            f"{backend} backend, ports {base}..{base + len(hosts)}")
    if args.dry_run:
        print(f"dry run ok: would start {what}\n  {shlex.join(cmd)}")
        return 0
    if busy := _port_busy(settings.host, settings.port):
        raise InputError(f"cannot listen on {settings.host}:{settings.port} ({busy}); choose another --port")
    preflight(hosts)
    if not args.quiet:
        print(f"starting {what} (through mlx.launch)", file=sys.stderr, flush=True)
    return _supervise(cmd, settings.api_key, spec)


def _supervise(cmd: list[str], api_key: str | None, spec) -> int:
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    ends: dict[int, tuple[int, float]] = {}  # rank -> (exit code, when), as the launcher reports them

    def tell(line: str) -> None:
        try:
            proc.stdin.write(line.encode() + b"\n")
            proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def kill() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def pump(src, dst, parse: bool) -> None:
        for raw in iter(src.readline, b""):
            if parse and (m := _NODE.search(raw.decode(errors="replace"))):
                code = int(m.group(2)) if m.group(2) is not None else -signal.SIGKILL
                ends.setdefault(int(m.group(1)), (code, time.monotonic()))
            dst.buffer.write(raw)
            dst.flush()

    pumps = [threading.Thread(target=pump, args=(proc.stdout, sys.stdout, False), daemon=True),
             threading.Thread(target=pump, args=(proc.stderr, sys.stderr, True), daemon=True)]
    for t in pumps:
        t.start()
    tell(json.dumps({"api_key": api_key}))
    asked = [0]

    def on_signal(sig, frame):
        asked[0] += 1
        if asked[0] == 1:
            tell("stop")  # rank 0 stops the server and tells the other ranks
        else:
            kill()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            now = time.monotonic()
            first = min((t for _, t in ends.values()), default=None)
            # A rank that stopped answering ignores the launcher's SIGTERM and the launcher
            # waits for it forever: once rank 0 has ended (or should have, after its linger
            # time), kill what is left.
            if (0 in ends and now - ends[0][1] > KILL_GRACE_S) or \
                    (first is not None and now - first > LINGER_S + 2 * KILL_GRACE_S):
                kill()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        kill()  # nothing of the cluster outlives the supervisor
    for t in pumps:
        t.join(2)
    failed = {r: c for r, (c, _) in ends.items() if c != 0}
    for r, c in sorted(failed.items()):
        how = f"was killed by signal {-c}" if c < 0 else f"exited with code {c}"
        print(f"squish: {spec.name(r)} {how}", file=sys.stderr, flush=True)
    if failed:
        for r in sorted(set(range(len(spec.hosts))) - set(ends)):
            print(f"squish: {spec.name(r)} did not stop in time and was killed", file=sys.stderr, flush=True)
    if failed.get(0) in (1, 2):
        return failed[0]
    if asked[0] and 0 not in failed:
        return 0  # the stop the user asked for (workers may have seen rank 0 leave first)
    return 2 if failed or proc.returncode != 0 else 0  # a launcher that failed by itself counts too


# ---- inside a rank ---------------------------------------------------------------------------
def _read_secrets() -> dict:
    """The supervisor's first line on stdin (the API key), or {} when none comes."""
    try:
        ready, _, _ = select.select([sys.stdin], [], [], STDIN_WAIT_S)
        line = sys.stdin.readline() if ready else ""
        return json.loads(line) if line.strip() else {}
    except (OSError, ValueError):
        return {}


def run_rank(args, spec) -> int:
    """What `squish serve` runs inside a rank that mlx.launch started."""
    rank = int(os.environ.get("MLX_RANK", "0"))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, force=True,
                        format=f"%(asctime)s rank {rank} %(levelname)s %(name)s: %(message)s")
    told = _read_secrets()
    if rank == 0:
        return _serve_rank0(args, spec, told)
    _worker(args, spec, rank)
    return 0  # not reached: _worker leaves with os._exit


def _worker(args, spec, rank: int) -> None:
    from squish.models import resolve_model
    from squish.runtime.distributed import run_worker

    def lost(why: str) -> None:
        print(f"error: {spec.name(rank)}: {why}; stopping", file=sys.stderr, flush=True)
        os._exit(2)

    code = 0
    try:
        run_worker(spec, rank, args.model, resolve_model, lost)
    except SquishError as exc:
        print(f"error: {spec.name(rank)}: {exc}", file=sys.stderr)
        code = exc.exit_code
    except Exception as exc:  # noqa: BLE001 - say so, and leave
        log.exception("%s failed", spec.name(rank))
        print(f"error: {spec.name(rank)}: internal failure: {type(exc).__name__}: {exc}", file=sys.stderr)
        code = 2
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)  # MLX's threads must not run interpreter teardown (squish.cli.runner)


def _serve_rank0(args, spec, told: dict) -> int:
    from squish.api.app import create_app
    from squish.api.metrics import Metrics
    from squish.cli import serve
    from squish.models import resolve_model
    from squish.runtime.distributed import NAME_FAILURE_S, LeaderEngine

    settings = serve._settings(args)
    settings.api_key = told.get("api_key") or settings.api_key
    try:
        settings.check()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = Metrics()
    engine = LeaderEngine(spec, args.model, resolve_model, max_batch=settings.max_batch,
                          max_queue=settings.max_queue, queue_timeout=settings.queue_timeout,
                          prefix_cache_bytes=None if settings.prefix_cache_mb is None
                          else settings.prefix_cache_mb << 20, observer=metrics)
    app = create_app(settings, engine, metrics)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host

    def attach(server, outcome) -> None:
        def stdin_stop() -> None:
            for line in sys.stdin:  # the supervisor's "stop"; end of input means it is gone
                if line.strip() == "stop":
                    break
            server.should_exit = True

        def on_failure() -> None:
            engine.cluster_failed.wait()
            if engine.model_info is not None:  # it was serving (a start-up failure ends at once)
                log.error("a rank failed; /health reports it for %g s, then the server stops", LINGER_S)
                time.sleep(LINGER_S)
            outcome["code"] = 2
            server.should_exit = True

        original = server.handle_exit

        def handle_exit(sig, frame) -> None:
            # mlx.launch sends SIGTERM to every rank when one exits: a failure the health
            # channel names at once. Only a stop that is no failure stops at once.
            def decide() -> None:
                if not engine.cluster_failed.wait(NAME_FAILURE_S + 1.0):
                    original(sig, frame)

            threading.Thread(target=decide, name="squish-stop", daemon=True).start()

        server.handle_exit = handle_exit
        signal.signal(signal.SIGHUP, handle_exit)
        for target in (stdin_stop, on_failure):
            threading.Thread(target=target, name=f"squish-{target.__name__}", daemon=True).start()

    return serve._serve(app, engine, settings, f"http://{host}:{settings.port}", args.quiet, on_server=attach)
