"""Opens a Squish artifact (or a plain mlx_lm folder) for serving.

Before any weight is read, the artifact contract's checks run
(``squish.artifact``: manifest format and version, file sizes, safetensors
headers, and with ``verify_hashes`` every sha256). A folder without
``squish.json`` is a plain mlx_lm folder, served with a warning that no
quality report exists.
Then the model is built by mlx_lm from the artifact *as stored*: the loader
performs no reshape, transpose, cast, re-quantization or recomputation
(tests/integration/test_loader.py proves it). Floating-point tensors (scales,
biases, norms, embeddings) are checked for NaN/Inf once they are in memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from squish.artifact import check_files, read_manifest
from squish.errors import InputError

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    name: str
    path: Path
    model: Any  # mlx.nn.Module
    tokenizer: Any  # mlx_lm.tokenizer_utils.TokenizerWrapper
    config: dict
    manifest: dict | None
    load_seconds: float
    experimental: bool
    warnings: list[str] = field(default_factory=list)
    facts: Any = None  # squish.runtime.prompts.ChatFacts: template, tool family, reasoning markers


def check_finite(model: Any, path: Path) -> None:
    """Refuse NaN/Inf in any floating-point parameter (scales, biases, norms, ...)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    params = [(k, v) for k, v in tree_flatten(model.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    flags = mx.stack([mx.all(mx.isfinite(v)) for _, v in params]) if params else mx.array([True])
    bad = [k for (k, _), ok in zip(params, flags.tolist()) if not ok]
    if bad:
        raise InputError(f"{path}: NaN/Inf in {len(bad)} tensors, e.g. {bad[0]}; the artifact is corrupt")


def load_artifact(path: Path, *, verify_hashes: bool = False, shard=None) -> LoadedModel:
    """Verify and load an artifact; every problem raises InputError naming the file.

    ``shard(model)``, when given, cuts the lazily built model to this rank's share
    (``squish.runtime.sharding.shard_model``) before any weight is read; the NaN/Inf
    check then covers that share."""
    t0 = time.perf_counter()
    path = Path(path).expanduser()
    if not path.is_dir():
        raise InputError(f"{path}: no such model folder")
    manifest = read_manifest(path)
    warnings = []
    if manifest is None:
        warnings.append(
            f"{path} is a plain mlx_lm folder without a Squish manifest: no quality report exists for it"
        )
    check_files(path, manifest, verify_hashes=verify_hashes)

    import mlx.core as mx
    from mlx_lm.utils import load_config, load_model

    from squish.hardware import release_free_heap
    from squish.runtime import tokenizer as tokenizers

    # The tokenizer first: parsing tokenizer.json briefly needs more than its steady
    # memory, and that transient is handed back before the weights arrive instead of
    # on top of them. squish.runtime.tokenizer says why it is not transformers'.
    try:
        eos = load_config(path).get("eos_token_id")
    except (ValueError, OSError) as e:
        raise InputError(f"{path}/config.json: unreadable ({e})") from e
    try:
        tokenizer = tokenizers.load(path, eos_token_ids=eos)
    except Exception as e:  # noqa: BLE001 - tokenizers / transformers raise many kinds
        raise InputError(f"{path}: the tokenizer cannot be loaded: {e}") from e
    release_free_heap()
    try:
        model, config = load_model(path, lazy=True)
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise InputError(f"{path}: the model cannot be built from its files: {e}") from e
    if shard is not None:
        shard(model)
    check_finite(model, path)
    mx.eval(model.parameters())
    from squish.runtime.prompts import chat_facts

    facts = chat_facts(tokenizer, config)
    quant = (manifest or {}).get("quantization", {})
    experimental = bool(quant.get("experimental", False))
    if experimental:
        warnings.append(f"{path.name} is an experimental INT{quant.get('bits')} build")
    for w in warnings:
        log.warning(w)
    return LoadedModel(
        name=(manifest or {}).get("name", path.name),
        path=path,
        model=model,
        tokenizer=tokenizer,
        config=config,
        manifest=manifest,
        load_seconds=time.perf_counter() - t0,
        experimental=experimental,
        warnings=warnings,
        facts=facts,
    )
