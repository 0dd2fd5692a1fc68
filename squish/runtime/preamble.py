"""The chat template's own preamble, prefilled at start-up and kept on disk across restarts.

Every chat a template renders begins with text the template writes itself, before any
client text: a default system prompt (SmolLM2's "You are a helpful AI assistant named
SmolLM, trained by Hugging Face", Qwen2.5's "You are Qwen, created by Alibaba Cloud..."),
then the markers that open the first user turn. On MLX's CPU backend that preamble is
about half of a short first request's prefill (25 of ~50 tokens for SmolLM2, ~2 s here),
and it is the same for every request that sends no system message.

``prepare`` finds the preamble (the tokens two renderings with different user messages
share), and puts its KV cache into the prefix cache before the server says it is ready,
so the first request prefills only its own tokens, as every later one does. The KV is a
function of the model alone, so it is written to
``$SQUISH_HOME/cache/preamble/<key>.safetensors`` and read back by the next start
(milliseconds instead of a prefill). The key covers the artifact's files (its manifest's
hashes, or the weight files' sizes and times for a plain folder), the preamble's tokens,
MLX's backend and version, and the KV cache's bits (``--kv-bits``: a quantized cache is
computed through quantized attention, so it is kept apart); a file that does not match,
or cannot be read, is recomputed. Only template text is stored: nothing a client sent ever reaches the disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from squish.runtime.prompt_cache import MIN_REUSE_TOKENS

log = logging.getLogger(__name__)

PROBES = ("Hello!", "What is 2 + 2?")  # two first user messages: their renderings part at the client's text


def preamble_tokens(tokenizer) -> list[int]:
    """The tokens every chat without a system message starts with (possibly none)."""
    if not getattr(tokenizer, "chat_template", None):
        return []
    try:
        a, b = (list(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
                for p in PROBES)
    except Exception:  # noqa: BLE001 - a template that needs more than a user message: nothing to prepare
        return []
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def _artifact_key(info) -> str:
    path = Path(info.path)
    files = (info.manifest or {}).get("files")
    if files:
        ident = {k: v.get("sha256") for k, v in sorted(files.items())}
    else:
        ident = {p.name: [p.stat().st_size, p.stat().st_mtime_ns]
                 for p in sorted(path.glob("*")) if p.suffix in (".safetensors", ".json")}
    return json.dumps(ident, sort_keys=True)


def cache_file(info, tokens: list[int], kv_quant: tuple[int, int] | None = None) -> Path:
    """Where this model's preamble KV is kept: the artifact's files fix the weights and the
    dtype, MLX's version and backend fix the kernels that computed it, ``kv_quant`` the cache."""
    import mlx.core as mx

    from squish.config import cache_dir
    from squish.hardware import backend

    h = hashlib.sha256()
    parts = [_artifact_key(info), json.dumps(tokens), backend(), mx.__version__]
    if kv_quant:
        parts.append("kv{}g{}".format(*kv_quant))
    for part in parts:
        h.update(part.encode())
        h.update(b"\0")
    return cache_dir() / "preamble" / f"{h.hexdigest()[:32]}.safetensors"


def _compute(model, tokens: list[int], kv_quant: tuple[int, int] | None) -> list:
    import mlx.core as mx

    from squish.runtime.kv_cache import new_cache

    cache = new_cache(model, kv_quant)
    model(mx.array([tokens]), cache=cache)
    mx.eval([(c.keys, c.values) for c in cache])
    return cache


def _load(file: Path, tokens: list[int], layers: int, kv_quant: tuple[int, int] | None) -> list | None:
    import mlx.core as mx

    from squish.runtime.kv_cache import layer

    try:
        arrays = mx.load(str(file))
        if arrays["tokens"].tolist() != tokens:
            return None
        out = []
        for i in range(layers):
            if kv_quant:  # (data, scales, biases) each
                keys, values = (tuple(arrays[f"{i}.{name}.{j}"] for j in range(3)) for name in ("keys", "values"))
            else:
                keys, values = arrays[f"{i}.keys"], arrays[f"{i}.values"]
            c = layer(keys, values, len(tokens), kv_quant)
            if (keys[0] if kv_quant else keys).shape[2] != len(tokens):
                return None
            out.append(c)
        mx.eval([(c.keys, c.values) for c in out])
        return out
    except Exception as exc:  # noqa: BLE001 - a damaged file is recomputed, never trusted
        log.warning("ignoring %s (%s); recomputing the preamble", file, exc)
        return None


def _save(file: Path, tokens: list[int], cache: list) -> None:
    import mlx.core as mx

    arrays = {"tokens": mx.array(tokens, dtype=mx.int32)}
    for i, c in enumerate(cache):
        for name, kv in (("keys", c.keys), ("values", c.values)):
            if isinstance(kv, tuple):  # a quantized cache's (data, scales, biases)
                for j, a in enumerate(kv):
                    arrays[f"{i}.{name}.{j}"] = a[..., : c.offset, :]
            else:
                arrays[f"{i}.{name}"] = kv[..., : c.offset, :]
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp.safetensors")
        mx.save_safetensors(str(tmp), arrays)
        os.replace(tmp, file)
    except OSError as exc:  # a read-only home: prepare again next time
        log.warning("cannot keep the preamble's KV in %s: %s", file.parent, exc)


def prepare(info, prefix) -> int:
    """Put the template preamble's KV into ``prefix`` (a ``PrefixCache``); returns its length.

    Engine thread only (it runs the model)."""
    if prefix.max_bytes <= 0:
        return 0
    from squish.runtime.kv_cache import new_cache

    tokens = preamble_tokens(info.tokenizer)
    empty = new_cache(info.model, prefix.kv_quant)
    if len(tokens) <= MIN_REUSE_TOKENS or not prefix.reusable(empty):
        return 0
    file = cache_file(info, tokens, prefix.kv_quant)
    cache = _load(file, tokens, len(empty), prefix.kv_quant) if file.exists() else None
    source = "read from disk"
    if cache is None:
        cache = _compute(info.model, tokens, prefix.kv_quant)
        _save(file, tokens, cache)
        source = "prefilled"
    prefix.store(tokens, cache)
    log.info("chat template preamble: %d tokens %s", len(tokens), source)
    return len(tokens)
