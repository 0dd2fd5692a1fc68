"""Progress bars on stderr for long work: downloads today, any long loop tomorrow.

One look for every bar (tqdm, which huggingface_hub already depends on): bytes
scaled to kB/MB/GB, rate and ETA, on stderr so stdout keeps only the result.
``quiet`` turns a bar off entirely. When stderr is not a terminal (a log file,
CI) the bar redraws at most every ``LOG_INTERVAL_S`` seconds, so logs get a
handful of progress lines instead of thousands.

tqdm is imported inside the functions: ``import squish`` stays light.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

#: A reporter for long stages: ``report(stage, done, total, unit)`` (unit optional).
Progress = Callable[..., None]

LOG_INTERVAL_S = 15.0
TTY_INTERVAL_S = 0.2


def _interval() -> float:
    return TTY_INTERVAL_S if sys.stderr.isatty() else LOG_INTERVAL_S


def bar(total: int | None, desc: str, *, quiet: bool = False, initial: int = 0, unit: str = "B"):
    """A tqdm bar for ``total`` units (bytes by default); use as a context manager and
    call ``update(n)``. ``total`` None or 0: no percentage, still a count and a rate."""
    from tqdm.auto import tqdm

    return tqdm(total=total or None, initial=initial, desc=desc, unit=unit, unit_scale=unit == "B",
                disable=quiet, file=sys.stderr, mininterval=_interval(), dynamic_ncols=True)


def tqdm_class(quiet: bool = False) -> type:
    """A tqdm subclass with the same look, for libraries that take a ``tqdm_class``
    (``huggingface_hub.snapshot_download``); ``quiet`` disables every bar it makes."""
    from tqdm.auto import tqdm

    class SquishBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs.pop("name", None)  # huggingface_hub's own tqdm takes a name; tqdm does not
            kwargs["disable"] = quiet
            kwargs.setdefault("file", sys.stderr)
            kwargs.setdefault("mininterval", _interval())
            super().__init__(*args, **kwargs)

    return SquishBar
