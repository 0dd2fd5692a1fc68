"""Error types that carry the CLI exit code.

Exit codes (CLI manners): 0 success, 1 user/input error, 2 runtime/system error.
Raise ``InputError`` for anything the user can fix by changing what they passed
(a bad path, an unknown catalog name, unsupported bits, a corrupt artifact they
pointed us at, a build that fails its quality gate); raise ``SystemFailure`` for
problems of the machine or the environment (no network, no disk space, MLX
failure). Messages must name the file/option at fault and say what to do.
"""

from __future__ import annotations


class SquishError(Exception):
    """Base class; ``exit_code`` is what the CLI returns."""

    exit_code = 2


class InputError(SquishError):
    """The user's input is wrong or unsupported (exit 1)."""

    exit_code = 1


class SystemFailure(SquishError):
    """The environment failed us: network, disk, backend (exit 2)."""

    exit_code = 2
