"""Raw samples → metrics → report of the baseline benchmark (no model, no server)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

pytest.importorskip("scipy")

from benchmarks.baseline import contracts as C  # noqa: E402
from benchmarks.baseline import metrics as M  # noqa: E402
from benchmarks.baseline import quality, report  # noqa: E402
from benchmarks.baseline.runner import PROFILES, order  # noqa: E402


def req(ttft, itl, tok_s, rss):
    return {"ttft": ttft, "itl": itl, "decode_tok_s": tok_s, "server_peak_rss": rss}


def fake_raw(n=6):
    sq = [req(0.10 + i * 0.001, 0.02, 50 + i, 300e6) for i in range(n)]
    ml = [req(0.20 + i * 0.001, 0.03, 40 + i, 400e6) for i in range(n)]
    return {
        "errors": {"concurrency": "RuntimeError: boom"},
        "dry_run": {"squish": [{"peak_rss_bytes": 90e6}] * 2, "mlx_lm": [{"peak_rss_bytes": 150e6}] * 2},
        "load": {"squish": [{"seconds": 0.5, "peak_rss_delta": 80e6}] * n,
                 "mlx_lm": [{"seconds": 0.6, "peak_rss_delta": 90e6}] * n},
        "cold_start": {"squish": [{"ready_s": 2.0, "first_token_s": 2.5, "first_ttft_s": 0.6, "second_ttft_s": 0.5}],
                       "mlx_lm": [{"ready_s": 3.0, "first_token_s": 3.4}]},
        "http": {"short": {"squish": sq, "mlx_lm": ml}, "long": {"squish": sq, "mlx_lm": ml}},
        "memory": {"squish": {"rss": [250e6] * 5, "mlx_peak_bytes": 350e6, "process_peak": 420e6},
                   "mlx_lm": {"rss": [300e6] * 5, "process_peak": 510e6}},
        "prefix": {"squish": [{"cold_ttft": 1.0, "warm_ttft": 0.2}] * 2, "mlx_lm": [{"cold_ttft": 1.0, "warm_ttft": 0.5}] * 2},
    }


def test_derive_names_every_contract_metric_and_pairs_systems():
    m = M.derive(fake_raw(), {"import": {"squish": [0.1] * 6, "mlx_lm": [0.9] * 6}})
    short = m["http.short.decode_tok_s"]
    assert short["verdict"] == "better" and short["ratio"] == pytest.approx(52.5 / 42.5)
    assert m["http.short.ttft_s"]["verdict"] == "better"
    assert m["startup.dry_run_rss_bytes"]["squish"]["max"] == 90e6
    # the MLX peak a server reports counts when it exceeds RSS
    assert m["memory.peak_bytes"]["squish"]["max"] == 350e6
    assert m["memory.peak_rss_bytes"]["squish"]["max"] == 300e6
    assert m["prefix.warm_over_cold"]["squish"]["p50"] == pytest.approx(0.2)
    assert m["cold_start.first_token_s"]["verdict"] == "n too small"
    # the first request against the second, in the same fresh process (Squish's only here)
    assert m["cold_start.first_over_second"]["squish"]["p50"] == pytest.approx(1.2)
    assert m["cold_start.first_over_second"]["mlx_lm"]["n"] == 0
    # the whole process from launch: one figure per server run, load included
    assert m["memory.process_peak_bytes"]["squish"]["max"] == 420e6
    assert m["memory.process_peak_bytes"]["ratio"] == pytest.approx(420 / 510)
    # a failed experiment is carried as an error, not silently dropped
    assert "boom" in m["concurrency.c4.aggregate_tok_s"]["error"]


def test_one_sided_metric_keeps_its_summary():
    raw = fake_raw()
    raw["dry_run"] = {"squish": [{"peak_rss_bytes": 90e6}], "mlx_lm": []}
    m = M.derive(raw)
    assert m["startup.dry_run_rss_bytes"]["verdict"] == "not measured"
    assert m["startup.dry_run_rss_bytes"]["squish"]["p50"] == 90e6


def test_contracts_on_derived_metrics_fail_when_experiment_failed():
    m = M.derive(fake_raw())
    cs = [c for c in C.load(C.DEFAULT_FILE) if c.id in ("portable.concurrency4", "portable.decode")]
    hw = {"chip": "AMD EPYC", "memory_bytes": 8 * 2**30, "backend": "cpu"}
    vs = {v.contract.id: v for v in C.evaluate(cs, hw, [{"label": "x", "metrics": m}], {})}
    assert vs["portable.decode"].status == C.PASS
    assert vs["portable.concurrency4"].status == C.FAIL and "boom" in vs["portable.concurrency4"].detail


def test_report_has_headline_contracts_and_not_measured_rows():
    m = M.derive(fake_raw())
    hw = {"chip": "AMD EPYC", "memory_bytes": 8 * 2**30, "backend": "cpu", "cpu_logical_cores": 2, "os": "Linux"}
    vs = C.evaluate(C.load(C.DEFAULT_FILE), hw, [{"label": "smol", "catalog": "smollm2:135m", "bits": 4, "metrics": m}], {})
    md = report.render(stamp="20260101T000000Z", machine=hw, profile={"name": "quick"}, argv=["x", "--quick"],
                       models=[{"label": "smol", "path": "/m", "bits": 4, "size_bytes": 1e8, "metrics": m,
                                "long_prompt_tokens": 64, "floor": None, "errors": {"concurrency": "boom"}}],
                       global_metrics={}, verdicts=vs, quality=None, notes=["CPU: scaled"], plots=["a.png"])
    assert "| TTFT, short prompt (HTTP streaming) | ms | 102.5 | 202.5 |" in md
    assert "not measured here" in md and "**FAIL** `portable.concurrency4`" in md
    assert "![a.png](a.png)" in md and "CPU: scaled" in md and "quant_quality" in md


def test_scale_units():
    assert report.scale("ms", 0.1234) == "123.4"
    assert report.scale("MB", 2.5e8) == "250.0"
    assert report.scale("s", None) == "—"


def test_quality_table_takes_each_config_from_the_newest_result_that_has_it(tmp_path):
    import json

    def row(config, kld):
        return {"config": config, "bits": int(config[0]), "method": "awq", "bpw": 4.5, "mean_kld": kld,
                "top1_agreement": 0.9, "ppl_ref": 25.0, "ppl_quant": 26.0, "ppl_delta": 0.04}

    runs = (("20260101T000000Z", [row("4:64:squish", 0.5), row("8:64:squish", 0.01)]),
            ("20260102T000000Z", [row("3:64:squish", 0.7), row("4:64:squish", 0.1)]))
    for stamp, rows in runs:
        d = tmp_path / f"{stamp}_quant_quality"
        d.mkdir()
        (d / "results.json").write_text(json.dumps({"rows": rows}))
    q = quality.latest(results=tmp_path)
    assert list(q["links"]) == ["20260101T000000Z_quant_quality", "20260102T000000Z_quant_quality"]
    assert [(r["config"], r["mean_kld"]) for r in q["rows"]] == [
        ("8:64:squish", 0.01), ("4:64:squish", 0.1), ("3:64:squish", 0.7)]
    assert ("| 4:64:squish | awq | 4.500 | 0.1000 | 0.9000 | 25.00 | 26.00 | +4.0% "
            "| 20260102T000000Z_quant_quality |") in q["table"]
    assert "0.5000" not in q["table"]  # the older INT4 row was replaced
    section = report.quality_section(q)
    assert "[`20260101T000000Z_quant_quality`](../20260101T000000Z_quant_quality/results.json)" in section
    assert quality.latest(results=tmp_path / "none") is None


def test_quality_section_names_the_error_when_no_result_exists():
    q = {"error": "quant_quality.py exited 2: no GGUF", "links": {}, "table": "", "rows": []}
    assert report.quality_section(q) == "_No quantization-quality result: quant_quality.py exited 2: no GGUF_"


def test_interleaving_alternates_who_goes_first():
    assert [order(i, ["a", "b"]) for i in range(3)] == [["a", "b"], ["b", "a"], ["a", "b"]]


def test_profiles_keep_the_method_promises():
    for p in PROFILES.values():
        assert p.warmups >= 5
        assert p.pairs >= 6  # fewer pairs can never reach p < 0.05
        assert 4 in p.concurrency and 1 in p.concurrency
        assert p.long_tokens("cpu") < p.long_tokens("cuda") == p.long_tokens("metal") == 1024
    assert PROFILES["full"].concurrency == (1, 2, 4, 8)


class _WordTokens:
    def count(self, text):
        return len(text.split())


def test_prose_is_deterministic_and_long_enough():
    from benchmarks.baseline import prompts

    a = prompts.prose(100, _WordTokens(), seed=3)
    assert a == prompts.prose(100, _WordTokens(), seed=3) != prompts.prose(100, _WordTokens(), seed=4)
    assert 100 <= len(a.split()) < 100 + 20
    assert prompts.long_prompt("run 1", a).startswith("[run 1] ")


def test_inproc_floor_summary_and_table():
    rows = [{"ttft": 0.1, "decode_s": 0.7, "tokens": 8, "prompt_tokens": 50, "peak_rss": 3e8}] * 3
    floor = M.inproc_floor({"inproc_mlx_lm": {"short": rows, "long": rows, "peak_mlx_bytes": 1.2e8,
                                              "steady_rss": 2.5e8, "active_mlx_bytes": 1e8}})
    assert floor["short"]["decode_tok_s"]["p50"] == pytest.approx(10.0)
    assert floor["short"]["itl_s"]["p50"] == pytest.approx(0.1)
    table = report.floor_table(floor)
    assert "| short | 50 | 100.0 | 100.0 | 10.0 |" in table and "120.0 MB" in table
    assert M.inproc_floor({}) is None and report.floor_table(None) == "_not measured_"


def test_a_server_that_never_started_is_named_in_metrics_and_contracts():
    raw = fake_raw()
    for exp in ("http", "prefix"):
        for kind in list(raw[exp]):
            if isinstance(raw[exp][kind], dict):
                raw[exp][kind]["squish"] = []
    raw["prefix"]["squish"] = []
    raw["errors"]["server_squish"] = "squish server exited with code 2"
    m = M.derive(raw)
    assert m["http.short.ttft_s"]["mlx_lm"]["n"] == 6
    assert "exited with code 2" in m["http.short.ttft_s"]["note"]
    [c] = [c for c in C.load(C.DEFAULT_FILE) if c.id == "portable.ttft_short"]
    [v] = C.evaluate([c], {"chip": "x", "backend": "cpu"}, [{"label": "x", "metrics": m}], {})
    assert v.status == C.FAIL and "exited with code 2" in v.detail


def test_experiments_left_out_are_not_measured_in_this_run_not_failures():
    from benchmarks.baseline import contracts as C

    raw = {"errors": {}, "skipped": ["servers", "load"],
           "cold_start": {"squish": [{"ready_s": 2.0, "first_token_s": 2.5}] * 6,
                          "mlx_lm": [{"ready_s": 3.0, "first_token_s": 3.4}] * 6}}
    m = M.derive(raw)
    assert "not part of this run" in m["memory.process_peak_bytes"]["skipped"]
    assert "not part of this run" in m["http.short.ttft_s"]["skipped"]
    cs = [c for c in C.load() if c.id in ("portable.peak_memory", "portable.cold_start", "portable.load_peak")]
    verdicts = {v.contract.id: v for v in C.evaluate(cs, {"backend": "cpu"}, [{"label": "x", "metrics": m}], {})}
    assert verdicts["portable.peak_memory"].status == C.NOT_IN_RUN
    assert verdicts["portable.load_peak"].status == C.NOT_IN_RUN  # every metric of a skipped experiment
    assert verdicts["portable.cold_start"].status == C.PASS  # 2.5 / 3.4 = 0.74x, every pair faster
