"""Paths and environment settings shared by every command.

``SQUISH_HOME`` (default ``~/.squish``) holds:
  models/   built artifacts, one directory per model (``<name>-<bits>bit``)
  cache/    downloads (PyPI wheels, hub snapshots) reused across builds
"""

from __future__ import annotations

import os
from pathlib import Path


def squish_home() -> Path:
    return Path(os.environ.get("SQUISH_HOME", "~/.squish")).expanduser()


def models_dir() -> Path:
    return squish_home() / "models"


def cache_dir() -> Path:
    return squish_home() / "cache"
