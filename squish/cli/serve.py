"""``squish serve``: pick (or build) a model, start the engine and the API.

``register`` only touches argparse (no MLX / FastAPI imports), so ``squish
--help`` stays fast; ``run`` does the work and returns the exit code
(0 ok, 1 bad input or settings, 2 the model failed to load / system error).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from pathlib import Path

from squish.cli.runner import exit_after_engine, make_engine, resolve_or_build
from squish.errors import InputError

EXAMPLES = """examples:
  squish serve                              the best local model that fits, else the best catalog
                                            model for this machine (built first) on 127.0.0.1:8000
  squish serve qwen3:8b                     a catalog name: built first when it is not here yet
  squish serve mlx-community/Qwen3-8B-4bit  a hub repo: downloaded first, served as it is
  squish serve ./Qwen3-8B-4bit              any mlx_lm folder (e.g. from `mlx_lm.convert -q`)
  squish serve smollm2:135m --port 8080
  squish serve ./my-artifact --api-key s3cret --host 0.0.0.0
  squish serve --dry-run                    resolve the model and build the app, but do not load or bind
  squish serve qwen3:8b --kv-bits 8         long contexts in about half the KV memory
  squish serve ./qwen3-8b-4bit --hosts 10.0.0.1,10.0.0.2 --api-key s3cret --host 0.0.0.0
                                            one model split over two Macs (docs/distributed.md)
then point any OpenAI client at http://127.0.0.1:8000/v1
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API "
                    "(/v1/chat/completions, /v1/completions, /v1/responses, /v1/models, /health, /metrics).",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model folder, local model name, catalog name or hub "
                   "repo id ORG/REPO (default: chosen for this machine; see the examples)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("SQUISH_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SQUISH_API_KEY)")
    p.add_argument("--insecure-no-auth", action="store_true",
                   help="allow binding a non-loopback address without an API key")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser requests from ORIGIN (repeatable; default: CORS off)")
    p.add_argument("--max-tokens", type=int, default=4096, help="cap on max_tokens per request (default 4096)")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests waiting for a batch slot before 503 (default 64)")
    p.add_argument("--rate-limit", type=int, default=120, metavar="PER_MIN",
                   help="requests per minute per API key / client address, 0 = off (default 120)")
    p.add_argument("--rate-burst", type=int, default=30, help="burst size of the rate limit (default 30)")
    p.add_argument("--request-timeout", type=float, default=300.0,
                   help="seconds a request may run in total (default 300)")
    p.add_argument("--queue-timeout", type=float, default=60.0,
                   help="seconds a request may wait for a batch slot (default 60)")
    p.add_argument("--max-body-kb", type=int, default=1024, help="request body limit in KiB (default 1024)")
    p.add_argument("--max-messages", type=int, default=1024,
                   help="messages (or input items) per request at most (default 1024)")
    p.add_argument("--max-chars", type=int, default=500_000,
                   help="characters of message text per request at most (default 500000)")
    p.add_argument("--prefix-cache-mb", type=int, default=None,
                   help="memory for reusing prompt prefixes across requests, 0 = off (default: the "
                        "model's weight size, at least 64, at most 10%% of RAM)")
    p.add_argument("--kv-bits", type=int, choices=(8,),
                   help="keep the KV cache quantized to 8 bits: long contexts and many streams take about "
                        "half the KV memory of half precision (a quarter of MLX's CPU backend's float32), "
                        "at the quality cost measured in docs/benchmarks.md; one machine only (default: off)")
    p.add_argument("--responses-store", type=int, default=1000, metavar="N",
                   help="OpenAI Responses kept in memory for previous_response_id and GET /v1/responses/ID, "
                        "least recently used out, lost on restart; 0 = keep none (default 1000)")
    p.add_argument("--responses-store-mb", type=int, default=64, metavar="MB",
                   help="memory bound of the stored Responses, in MiB of JSON (default 64)")
    p.add_argument("--dry-run", action="store_true",
                   help="resolve the model and build the server, but do not load it or bind")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="only warnings and errors: no progress bars, no banner")
    g = p.add_argument_group("one model over several machines (docs/distributed.md)")
    g.add_argument("--hosts", metavar="IP1,IP2,...",
                   help="split the model over these hosts, started through MLX's launcher (mlx.launch): one "
                        "rank per entry, a host listed twice runs two; the first is this machine and serves the API")
    g.add_argument("--hostfile", type=Path, help="the hosts as an mlx.launch JSON hostfile (ssh names, IPs, RDMA "
                   "devices, backend), instead of --hosts")
    g.add_argument("--backend", choices=("ring", "jaccl"),
                   help="MLX's distributed backend: ring (TCP over Ethernet or a Thunderbolt bridge; the default) "
                        "or jaccl (RDMA over Thunderbolt 5; needs --hostfile)")
    g.add_argument("--dist-port", type=int, metavar="PORT",
                   help="first of the ranks' ports: one per rank for MLX, one more for Squish's health channel "
                        "(default: from 32323, the first free block when the ranks are local)")
    p.set_defaults(handler=run)


def _settings(args):
    from squish.api.settings import ServeSettings

    return ServeSettings(
        host=args.host, port=args.port, api_key=args.api_key or None,
        allow_unauthenticated_remote=args.insecure_no_auth, cors_origins=args.cors_origin,
        max_body_bytes=args.max_body_kb * 1024, max_messages=args.max_messages,
        max_content_chars=args.max_chars, max_tokens=args.max_tokens,
        rate_limit_per_minute=args.rate_limit, rate_limit_burst=args.rate_burst,
        request_timeout=args.request_timeout, queue_timeout=args.queue_timeout,
        max_batch=args.max_batch, max_queue=args.max_queue, prefix_cache_mb=args.prefix_cache_mb,
        kv_bits=args.kv_bits, responses_store=args.responses_store, responses_store_mb=args.responses_store_mb)


def _banner(url: str, name: str, api_key: str | None) -> str:
    key = api_key and "$SQUISH_API_KEY" or "none"
    auth = ' -H "Authorization: Bearer $SQUISH_API_KEY"' if api_key else ""
    return (
        f"Squish is serving {name} at {url}/v1\n"
        f"  curl {url}/v1/chat/completions -H 'Content-Type: application/json'{auth} \\\n"
        f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello!\"}}]}}'\n"
        f"  python -c 'from openai import OpenAI; c = OpenAI(base_url=\"{url}/v1\", api_key=\"{key}\"); "
        f"print(c.chat.completions.create(model=\"{name}\", "
        f"messages=[{{\"role\": \"user\", \"content\": \"Hello!\"}}]).choices[0].message.content)'"
    )


def _port_free(host: str, port: int) -> str | None:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return str(exc)
    return None


def run(args) -> int:
    t0 = time.perf_counter()
    if os.environ.get("SQUISH_CLUSTER"):  # a rank that `squish serve --hosts` started through mlx.launch
        from squish.cli.cluster import run_rank
        from squish.runtime.ranks import ClusterSpec

        return run_rank(args, ClusterSpec.from_env())
    logging.getLogger().setLevel(logging.WARNING if args.quiet else logging.INFO)
    if not args.quiet:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            force=True)
    settings = _settings(args)
    try:
        settings.check()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.hosts or args.hostfile:
        from squish.cli.cluster import launch

        if args.hosts and args.hostfile:
            raise InputError("--hosts and --hostfile name the hosts twice; give one of them")
        if args.kv_bits:
            raise InputError("--kv-bits works on one machine only; serve across machines without it")
        return launch(args, settings)
    if args.backend or args.dist_port:
        raise InputError("--backend and --dist-port apply to --hosts / --hostfile only")
    path = resolve_or_build(args, args.dry_run)  # InputError -> exit 1 via squish.cli.main

    from squish.api.app import create_app
    from squish.api.metrics import Metrics

    metrics = Metrics()
    engine = make_engine(path, max_batch=settings.max_batch, max_queue=settings.max_queue,
                    queue_timeout=settings.queue_timeout,
                    prefix_cache_bytes=None if settings.prefix_cache_mb is None else settings.prefix_cache_mb << 20,
                    kv_bits=settings.kv_bits, observer=metrics)
    app = create_app(settings, engine, metrics)
    url = f"http://{'[' + settings.host + ']' if ':' in settings.host else settings.host}:{settings.port}"

    if args.dry_run:
        import uvicorn  # noqa: F401 - part of what a real start imports
        import psutil

        rss = psutil.Process().memory_info().rss / 2**20
        what = path if path is not None else "none here yet (see above)"
        print(f"dry run ok: model {what}; would listen on {url}/v1; "
              f"startup {time.perf_counter() - t0:.2f}s, RSS {rss:.0f} MiB")
        return 0

    from squish.artifact import check_files, read_manifest

    # The artifact's cheap checks (files, sizes, headers) before the port: a damaged model is
    # the problem to report (InputError -> exit 1, a message and no traceback).
    check_files(path, read_manifest(path))
    busy = _port_free(settings.host, settings.port)
    if busy:
        print(f"error: cannot listen on {settings.host}:{settings.port} ({busy}); choose another --port",
              file=sys.stderr)
        return 1
    return _serve(app, engine, settings, url, args.quiet)


def _serve(app, engine, settings, url: str, quiet: bool, on_server=None) -> int:
    """Run uvicorn until a signal or a failed load. ``on_server(server, outcome)`` may
    adjust the server before it runs (a multi-machine rank 0: squish.cli.cluster)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)
            # SIGINT/SIGTERM ask for a graceful stop: exit 0 afterwards instead
            # of uvicorn re-raising the signal (death by signal).
            self._captured_signals.clear()

    config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                            log_level="warning", timeout_graceful_shutdown=5, log_config=None)
    server = GracefulServer(config)
    outcome = {"code": 0}

    def announce():
        while not (engine.ready.wait(0.2) or engine.failed.is_set() or server.should_exit):
            pass
        if engine.failed.is_set():
            print(f"error: {engine.load_error}", file=sys.stderr)
            outcome["code"] = engine.load_exit_code
            server.should_exit = True
        elif engine.ready.is_set() and not quiet:
            print(_banner(url, engine.model_info.name, settings.api_key), flush=True)

    if on_server is not None:
        on_server(server, outcome)
    engine.start()  # load while uvicorn binds; /health says "loading" meanwhile
    threading.Thread(target=announce, name="squish-announce", daemon=True).start()
    if not quiet:
        print(f"loading the model; listening on {url} (GET /health reports when ready)", flush=True)
    server.run()
    exit_after_engine(engine, outcome["code"])  # the app's lifespan already stopped it
