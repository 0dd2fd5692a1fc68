"""Contract checking of the baseline benchmark (benchmarks/baseline/contracts.py)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.baseline import contracts as C  # noqa: E402

M3 = {"chip": "Apple M3", "memory_bytes": 16 * 2**30, "backend": "metal"}
EPYC = {"chip": "AMD EPYC", "memory_bytes": 24 * 2**30, "backend": "cpu"}


def one(**kw):
    raw = {"id": "c1", "description": "d", "metric": "http.short.decode_tok_s", "kind": "ratio", "min": 1.0}
    raw.update(kw)
    return C.parse({"contract": [{k: v for k, v in raw.items() if v is not None}]})


def entry(ratio=None, p=0.01, squish=None):
    return {"ratio": ratio, "p": p, "significant": p is not None and p < 0.05, "n_pairs": 8,
            "squish": squish or {}}


def model(metrics, catalog="qwen2.5:1.5b", bits=4):
    return {"label": f"{catalog} INT{bits}", "catalog": catalog, "bits": bits, "metrics": metrics}


def test_shipped_contracts_file_parses_with_the_issue_contracts():
    cs = C.load(C.DEFAULT_FILE)
    ids = {c.id for c in cs}
    assert {"m3.qwen2.5-1.5b.int4.peak_memory", "m3.qwen2.5-1.5b.int3.peak_memory", "m3.qwen3-8b.int4.peak_memory",
            "m3.qwen2.5-1.5b.ttft", "m3.qwen3-8b.ttft", "m3.startup_rss", "m3.import_time"} <= ids
    assert any(c.id.startswith("portable.") and c.kind == "ratio" and not c.applies for c in cs)
    by = {c.id: c for c in cs}
    assert by["m3.qwen2.5-1.5b.int4.peak_memory"].max == 1.5e9
    assert by["m3.qwen3-8b.ttft"].max == 0.6


def test_shipped_contract_metrics_are_ones_the_benchmark_produces():
    from benchmarks.baseline.metrics import METRICS

    for c in C.load(C.DEFAULT_FILE):
        assert c.metric in METRICS, c.id


def test_ratio_pass_and_fail():
    [c] = one()
    ok = C.evaluate([c], EPYC, [model({"http.short.decode_tok_s": entry(1.2)})], {})
    assert [v.status for v in ok] == [C.PASS]
    bad = C.evaluate([c], EPYC, [model({"http.short.decode_tok_s": entry(0.8, p=0.001)})], {})
    assert bad[0].status == C.FAIL
    assert "significant" in bad[0].detail and "0.800" in bad[0].detail and "p=0.001" in bad[0].detail
    assert C.failures(bad) == bad


def test_value_contract_uses_its_stat():
    [c] = one(kind="value", metric="memory.peak_bytes", stat="max", max=1.5e9, min=None)
    ms = [model({"memory.peak_bytes": entry(squish={"p50": 1.0e9, "max": 1.6e9})})]
    [v] = C.evaluate([c], EPYC, ms, {})
    assert v.status == C.FAIL and v.value == 1.6e9


def test_other_hardware_is_not_measured_here_not_pass():
    [c] = one(applies={"chip": "Apple M3", "memory_gb": 16})
    [v] = C.evaluate([c], EPYC, [model({"http.short.decode_tok_s": entry(2.0)})], {})
    assert v.status == C.NOT_HERE and "Apple M3" in v.detail
    assert not C.failures([v])


def test_memory_size_must_match():
    [c] = one(applies={"chip": "Apple M3", "memory_gb": 16})
    [v] = C.evaluate([c], {**M3, "memory_bytes": 8 * 2**30}, [model({})], {})
    assert v.status == C.NOT_HERE and "16 GB" in v.detail


def test_model_not_in_run_is_reported_not_passed():
    [c] = one(applies={"chip": "Apple M3", "memory_gb": 16, "model": "qwen3:8b", "bits": 4})
    [v] = C.evaluate([c], M3, [model({"http.short.decode_tok_s": entry(2.0)})], {})
    assert v.status == C.NOT_IN_RUN and "--models qwen3:8b" in v.detail


def test_bits_select_the_right_artifact():
    [c] = one(applies={"model": "qwen2.5:1.5b", "bits": 3})
    vs = C.evaluate([c], M3, [model({"http.short.decode_tok_s": entry(0.5)}, bits=4),
                              model({"http.short.decode_tok_s": entry(1.5)}, bits=3)], {})
    assert [(v.model, v.status) for v in vs] == [("qwen2.5:1.5b INT3", C.PASS)]


def test_applicable_but_unmeasured_metric_fails_with_reason():
    [c] = one()
    [v] = C.evaluate([c], EPYC, [model({"http.short.decode_tok_s": {"error": "squish serve crashed"}})], {})
    assert v.status == C.FAIL and "squish serve crashed" in v.detail
    [v] = C.evaluate([c], EPYC, [model({})], {})
    assert v.status == C.FAIL and "missing" in v.detail


def test_global_scope_reads_run_wide_metrics_once():
    [c] = one(kind="value", metric="startup.import_s", scope="global", max=2.0, min=None)
    [v] = C.evaluate([c], EPYC, [model({}), model({}, bits=3)], {"startup.import_s": entry(squish={"p50": 0.4})})
    assert v.status == C.PASS and v.model is None


@pytest.mark.parametrize("bad, msg", [
    ({"kind": "speed"}, "kind"),
    ({"min": None, "max": None}, "needs 'min' or 'max'"),
    ({"stat": "p42", "kind": "value"}, "stat"),
    ({"stat": "max"}, "kind = \"value\" only"),
    ({"applies": {"gpu": "x"}}, "unknown 'applies'"),
    ({"frobnicate": 1}, "unknown field"),
    ({"scope": "world"}, "scope"),
])
def test_malformed_contracts_are_refused_naming_the_contract(bad, msg):
    raw = {"id": "c9", "description": "d", "metric": "m", "kind": "ratio", "min": 1.0}
    raw.update(bad)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(C.ContractError, match="c9") as e:
        C.parse({"contract": [raw]})
    assert msg in str(e.value)


def test_duplicate_ids_refused():
    raw = {"id": "x", "description": "d", "metric": "m", "kind": "ratio", "min": 1.0}
    with pytest.raises(C.ContractError, match="duplicate"):
        C.parse({"contract": [raw, dict(raw)]})


def test_bad_toml_names_the_file(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text("[[contract]\n")
    with pytest.raises(C.ContractError, match="c.toml"):
        C.load(f)


def test_ratio_miss_without_significance_is_inconclusive_not_fail():
    [c] = one()
    [v] = C.evaluate([c], EPYC, [model({"http.short.decode_tok_s": entry(0.9, p=0.4)})], {})
    assert v.status == C.INCONCLUSIVE and "not significant" in v.detail
    assert C.failures([v]) == [] and C.failures([v], strict=True) == [v]
    [v] = C.evaluate([c], EPYC, [model({"http.short.decode_tok_s": entry(0.9, p=0.01)})], {})
    assert v.status == C.FAIL
