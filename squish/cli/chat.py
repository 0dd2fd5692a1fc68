"""``squish chat``: a terminal chat against the same engine ``squish serve`` runs.

One process, no HTTP: the engine thread, the chat template rendering of the
API (client text never becomes special tokens) and streaming detokenization
are the server's. Each line read from stdin is a user turn; the reply streams
to stdout as it is generated. ``/reset`` starts over, ``/exit`` (or end of
input) quits, Ctrl-C stops the current reply and keeps the chat. Turns that
no longer fit the model's context drop the oldest exchanges first.

``register`` only touches argparse; ``run`` returns the exit code: 0 ok, 1 bad
input or settings, 2 the model failed to load / the engine failed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import uuid

from squish.cli.runner import exit_after_engine, make_engine, resolve_or_build

EXAMPLES = """examples:
  squish chat                                 the model `squish serve` would choose (built first if needed)
  squish chat mlx-community/Qwen3-8B-4bit     a hub repo, downloaded first and used as it is
  squish chat smollm2:135m --system "Answer in one sentence."
  echo "What is MLX?" | squish chat -q        one reply on stdout, nothing else
type /reset to start over, /exit (or Ctrl-D) to quit; Ctrl-C stops the current reply
"""
DEFAULT_CONTEXT = 4096


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "chat", help="chat with a model in the terminal (the server's engine, no HTTP)",
        description="Chat with a model in the terminal, on the same engine as `squish serve`.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", help="model folder, local model name, catalog name or hub "
                   "repo id ORG/REPO (default: chosen for this machine, as `squish serve` does)")
    p.add_argument("--system", help="system message for the whole chat")
    p.add_argument("--max-tokens", type=int, default=1024, help="tokens per reply at most (default 1024)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature, 0 = greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling (default 0.95)")
    p.add_argument("--seed", type=int, help="seed for reproducible replies")
    p.add_argument("-q", "--quiet", action="store_true", help="no banner, prompt or notes: replies only")
    p.set_defaults(handler=run)


def _check(args) -> str | None:
    if args.max_tokens <= 0:
        return "--max-tokens must be positive"
    if args.temperature < 0:
        return "--temperature must not be negative"
    if not 0 < args.top_p <= 1:
        return "--top-p must be in (0, 1]"
    return None


def run(args) -> int:
    err = _check(args)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    logging.getLogger().setLevel(logging.ERROR if args.quiet else logging.WARNING)
    logging.getLogger("squish.engine").setLevel(logging.CRITICAL)  # its errors are printed below
    path = resolve_or_build(args, dry_run=False)  # InputError -> exit 1 via squish.cli.main
    engine = make_engine(path, max_batch=1, max_queue=1)
    engine.start()
    note = (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr, flush=True))
    note(f"loading {path} ...")
    code = 2
    try:
        while not (engine.ready.wait(0.2) or engine.failed.is_set()):
            pass
        if engine.ready.is_set():
            code = _chat(engine, args, note)
        else:
            print(f"error: {engine.load_error}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - reported, then the process ends below
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        exit_after_engine(engine, code)


def _chat(engine, args, note) -> int:
    from squish.runtime.prompts import PromptError, encode_chat
    from squish.runtime.sampling import SamplingParams

    info = engine.model_info
    cfg = info.config or {}
    context = int(cfg.get("max_position_embeddings") or cfg.get("max_seq_len") or DEFAULT_CONTEXT)
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    note(f"chatting with {info.name}; /reset starts over, /exit quits")
    interactive = sys.stdin.isatty() and not args.quiet
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history.clear()
            note("(chat reset)")
            continue
        history.append({"role": "user", "content": line})
        try:
            prompt = encode_chat(info.tokenizer, system + history)
            while len(prompt) + 1 > context and len(history) > 1:  # drop the oldest exchange
                del history[:2 if len(history) > 2 else 1]
                prompt = encode_chat(info.tokenizer, system + history)
        except PromptError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if len(prompt) + 1 > context:
            history.pop()
            print(f"error: that message alone ({len(prompt)} tokens) does not fit the model's "
                  f"context of {context} tokens", file=sys.stderr)
            continue
        params = SamplingParams(max_tokens=min(args.max_tokens, context - len(prompt)),
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed)
        rid = uuid.uuid4().hex
        try:
            reply, reason = asyncio.run(_turn(engine, rid, prompt, params))
        except KeyboardInterrupt:
            engine.cancel(rid)
            history.pop()
            print(file=sys.stdout, flush=True)
            note("(stopped)")
            continue
        except RuntimeError as exc:  # the engine reported an error for this turn
            history.pop()
            print(f"error: {exc}", file=sys.stderr)
            if not engine.ready.is_set():
                return 2
            continue
        history.append({"role": "assistant", "content": reply})
        if reason == "length":
            note(f"(reply cut at {params.max_tokens} tokens)")


async def _turn(engine, rid: str, prompt: list[int], params) -> tuple[str, str]:
    """Submit one turn, stream its text to stdout; returns (text, finish reason)."""
    from squish.runtime import engine as eng

    req = eng.Request(rid, prompt, params, timeout=3600.0, loop=asyncio.get_running_loop(),
                      events=asyncio.Queue())
    engine.submit(req)
    parts: list[str] = []
    try:
        while True:
            ev = await req.events.get()
            if isinstance(ev, eng.Delta):
                parts.append(ev.text)
                sys.stdout.write(ev.text)
                sys.stdout.flush()
            elif isinstance(ev, eng.Finish):
                sys.stdout.write("\n")
                sys.stdout.flush()
                return "".join(parts), ev.reason
            else:
                raise RuntimeError(ev.message)
    except asyncio.CancelledError:
        engine.cancel(rid)
        raise
