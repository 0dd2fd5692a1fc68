"""What ``squish serve`` and ``squish chat`` share: pick the model, start the engine
thread on it, and end the process once the engine has stopped.

Why ``exit_after_engine`` ends with ``os._exit``: MLX's native threads abort
("terminate called without an active exception") in interpreter teardown after a
non-main thread used the device, so a command that ran the engine stops it,
flushes its output and leaves without teardown.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import NoReturn


def resolve_or_build(args, dry_run: bool) -> Path | None:
    """The model folder for `serve` / `chat`. ``args.model`` when given: a folder or local model
    as it is, a hub repo downloaded first, a catalog name built first. Without one, the
    zero-config choice (``squish.models.choose_default``), said in one line on stderr and built
    first when needed. A dry run fetches and builds nothing: None when nothing is here yet."""
    from squish.models import locate

    quiet = args.quiet
    if args.model:
        found = locate(args.model)  # an unknown name: InputError (exit 1) listing what exists
    else:
        choice = zero_config_choice()
        if not quiet:
            print(choice.reason, file=sys.stderr, flush=True)
        if choice.path is not None:
            return choice.path
        found = locate(choice.name)
    if found.path is not None:
        return found.path
    if dry_run:
        verb = "download" if found.kind == "hub" else "build"
        print(f"dry run: {found.name} is not here yet; without --dry-run Squish would {verb} it first",
              file=sys.stderr)
        return None
    from squish.cli.fetch import obtain

    return obtain(found, quiet=quiet)


def zero_config_choice():
    """``choose_default`` for this machine: its total memory, its build dtype, a bounded check
    that the hub answers (made only when no local model fits) and whether a hub token is set."""
    from squish import hub
    from squish.hardware import default_dtype_bytes, total_memory_bytes
    from squish.models import choose_default

    return choose_default(total_memory_bytes(), hub.reachable, has_token=_has_hub_token,
                          dtype_bytes=default_dtype_bytes())


def _has_hub_token() -> bool:
    if os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return True
    from huggingface_hub import get_token

    return get_token() is not None


def make_engine(path: Path, **engine_kw):
    """An ``Engine`` (not started) that loads the artifact at ``path`` on its own thread."""
    from squish.runtime.engine import Engine

    def load():
        from squish.runtime.loader import load_artifact

        return load_artifact(path)

    return Engine(load, **engine_kw)


def exit_after_engine(engine, code: int) -> NoReturn:
    """Stop the engine (a no-op if it already stopped), flush, and leave without teardown."""
    engine.stop()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)
