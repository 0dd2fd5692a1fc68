"""What the Ollama API says about the served model: ``/api/tags``, ``/api/show``, ``/api/ps``.

Squish serves one model, loaded once for the server's life. Ollama names
models ``name:tag``; the served model is ``<served name>:latest``. The facts
that need the disk (the artifact's size in bytes, its digest, the parameter
count read from the safetensors headers, the modification time) are read once,
on a worker thread, and cached per model folder.

- ``digest``: sha256 of ``squish.json`` (the manifest, which lists every file's
  sha256), or of ``config.json`` for a plain mlx_lm folder;
- ``size``: bytes of every file in the model folder (tags); for ``/api/ps`` the
  bytes of the weights, which is what the loaded model holds in memory (the
  loader never transforms them); ``size_vram`` the same on Metal / CUDA, 0 on
  the CPU backend;
- ``details``: format ``safetensors`` (MLX), family = the config's
  ``model_type``, ``parameter_size`` as Ollama prints counts (``135M``,
  ``1.5B``), ``quantization_level`` ``INT4`` / ``INT8`` ... for quantized
  weights, else the float type (``F32``, ``BF16``, ``F16``);
- ``expires_at`` for ``/api/ps``: never (a far-future time): ``keep_alive``
  does not unload the model here.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from squish.artifact import MANIFEST, check_safetensors

NEVER = "9999-12-31T23:59:59Z"  # /api/ps expires_at: the model stays loaded for the server's life
TAG = ":latest"
_FLOAT_NAMES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "float32": "F32", "float16": "F16",
                "bfloat16": "BF16"}


@dataclass(frozen=True)
class Card:
    """The served model's facts that come from its folder (read once)."""

    size: int  # every file in the folder
    weights: int  # the safetensors files
    digest: str
    modified_at: str
    parameters: int
    float_type: str | None  # the weights' float type when they are not quantized
    on_gpu: bool


_CARDS: dict[str, Card] = {}


def iso(ts: float) -> str:
    """RFC 3339 UTC time with a ``Z``, as Ollama writes times."""
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def card(path: Path, config: dict) -> Card:
    """The folder's facts (blocking file reads: call it on a worker thread). Cached."""
    key = str(Path(path).resolve())
    hit = _CARDS.get(key)
    if hit is None:
        hit = _CARDS[key] = _read_card(Path(path), config)
    return hit


def _read_card(path: Path, config: dict) -> Card:
    files = [f for f in path.rglob("*") if f.is_file()]
    shards = sorted(f for f in files if f.suffix == ".safetensors")
    ident = path / MANIFEST if (path / MANIFEST).exists() else path / "config.json"
    digest = hashlib.sha256(ident.read_bytes()).hexdigest() if ident.exists() else ""
    header: dict = {}
    for f in shards:
        header.update(check_safetensors(f))
    params, float_type = _parameters(header, config.get("quantization") or {})
    return Card(size=sum(f.stat().st_size for f in files), weights=sum(f.stat().st_size for f in shards),
                digest=digest, modified_at=iso(ident.stat().st_mtime if ident.exists() else path.stat().st_mtime),
                parameters=params, float_type=float_type, on_gpu=_on_gpu())


def _parameters(header: dict, quant: dict) -> tuple[int, str | None]:
    """(parameter count, float type of unquantized weights). A quantized weight counts
    ``scales`` × group size (its packed uint32 words hold several values each)."""
    n = 0
    float_type = None
    for key, t in header.items():
        stem, _, leaf = key.rpartition(".")
        quantized = f"{stem}.scales" in header and f"{stem}.weight" in header
        if quantized and leaf in ("scales", "biases"):
            continue
        if quantized and leaf == "weight":
            module = quant.get(stem)
            group = module.get("group_size") if isinstance(module, dict) else None
            n += math.prod(header[f"{stem}.scales"]["shape"]) * int(group or quant.get("group_size", 64))
            continue
        n += math.prod(t["shape"])
        float_type = float_type or _FLOAT_NAMES.get(t.get("dtype", ""))
    return n, float_type


def _on_gpu() -> bool:
    """Whether MLX runs on a GPU (Metal / CUDA): a device query, once per process."""
    if sys.platform == "darwin":
        return True  # Metal: unified memory, all of it GPU-addressable
    from squish import hardware

    return hardware.backend() != "cpu"


def human_count(n: int) -> str:
    """A parameter count as Ollama prints it: 135M, 134.52M, 1.5B, 7B."""
    for unit, scale in (("B", 1e9), ("M", 1e6)):
        if n >= scale:
            x = n / scale
            if x == int(x):
                return f"{int(x)}{unit}"
            return f"{x:.1f}{unit}" if unit == "B" else f"{x:.2f}{unit}"
    return f"{n // 1000}K" if n >= 1000 else str(n)


def quantization_level(config: dict, c: Card) -> str:
    q = config.get("quantization") or {}
    if q.get("bits"):
        return f"INT{q['bits']}"
    return c.float_type or "unknown"


def details(info, c: Card) -> dict:
    family = str(info.config.get("model_type") or "unknown")
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": human_count(c.parameters), "quantization_level": quantization_level(info.config, c)}


def capabilities(info) -> list[str]:
    """Completion always; tools for every model with a chat template (natively or through
    Squish's tool prompt, enforced by the grammar); thinking where the model reasons."""
    caps = ["completion"]
    if info.facts.has_template:
        caps.append("tools")
    if info.facts.reasons:
        caps.append("thinking")
    return caps


def tag_entry(info, c: Card) -> dict:
    name = info.name + TAG
    return {"name": name, "model": name, "modified_at": c.modified_at, "size": c.size, "digest": c.digest,
            "details": details(info, c)}


def ps_entry(info, c: Card, context_length: int) -> dict:
    name = info.name + TAG
    return {"name": name, "model": name, "size": c.weights, "digest": c.digest, "details": details(info, c),
            "expires_at": NEVER, "size_vram": c.weights if c.on_gpu else 0, "context_length": context_length}


def model_info(info, c: Card, context_length: int) -> dict:
    """GGUF-style keys (``general.*``, ``<arch>.*``) from the model's config."""
    cfg = info.config
    arch = str(cfg.get("model_type") or "unknown")
    out: dict = {"general.architecture": arch, "general.parameter_count": c.parameters,
                 f"{arch}.context_length": context_length}
    keys = {"hidden_size": "embedding_length", "num_hidden_layers": "block_count",
            "intermediate_size": "feed_forward_length", "num_attention_heads": "attention.head_count",
            "num_key_value_heads": "attention.head_count_kv", "rms_norm_eps": "attention.layer_norm_rms_epsilon",
            "rope_theta": "rope.freq_base", "vocab_size": "vocab_size"}
    for src, dst in keys.items():
        if cfg.get(src) is not None:
            out[f"{arch}.{dst}"] = cfg[src]
    return out


def show(info, c: Card, context_length: int, defaults: dict) -> dict:
    """The ``/api/show`` body. ``template`` is the model's chat template as it is (Jinja, which
    Squish renders; Ollama's own are Go templates); ``parameters`` lists the context and the
    sampling defaults an absent option takes."""
    params = {"num_ctx": context_length, **defaults}
    template = getattr(info.tokenizer, "chat_template", None)
    body = {
        "modelfile": (f"# Served by Squish from a model folder; a Modelfile cannot rebuild it.\n"
                      f"FROM {info.name}{TAG}\n" + "".join(f"PARAMETER {k} {v}\n" for k, v in params.items())),
        "parameters": "\n".join(f"{k:<30} {v}" for k, v in params.items()),
        "details": details(info, c),
        "model_info": model_info(info, c, context_length),
        "capabilities": capabilities(info),
        "modified_at": c.modified_at,
    }
    if isinstance(template, str) and template:
        body["template"] = template
    return body
