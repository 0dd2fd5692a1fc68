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
    """The model path for `serve` / `chat`: ``args.model``, else the best local artifact, else
    the default model, built now (None on a dry run with nothing built)."""
    from squish.errors import InputError
    from squish.models import default_model_path, resolve_model

    if args.model:
        return resolve_model(args.model)
    try:
        return resolve_model(None)
    except InputError:
        if dry_run:
            return None
        if not args.quiet:
            print("no local model yet: building the default model (smollm2:135m) first...",
                  file=sys.stderr)
        return default_model_path(build_if_missing=True, quiet=args.quiet)


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
