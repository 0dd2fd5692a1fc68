"""``squish quantize``: source → reference → calibration → quantization →
quality gate → artifact. All heavy work happens here, never at load time.

Every step that can fail does so before the artifact becomes visible: the
writer builds in a temp dir beside the target and renames only at the end.
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from squish import hardware
from squish.config import cache_dir, models_dir
from squish.errors import InputError, SystemFailure

log = logging.getLogger(__name__)

SUPPORTED_BITS = (3, 4, 8)
SUPPORTED_GROUPS = (32, 64, 128)
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class BuildOptions:
    bits: int = 4
    group_size: int = 64
    dtype: str | None = None  # None: chosen from the hardware (hardware.BUILD_DTYPE)
    calib_file: Path | None = None
    # 32 x 128 self-generated tokens: the same 4096 tokens as 16 x 256, generated ~3x faster
    # (shorter sequences batch better); measured in benchmarks/quant_quality.py.
    calib_samples: int = 32
    calib_seq_len: int = 128
    seed: int = 0
    output: Path | None = None
    force: bool = False
    keep_failed: bool = False
    quiet: bool = False
    # A GGUF source's codes carried over where MLX's format holds them exactly; the rest
    # rounded at 8 bits (squish.quant.gguf_codes). No calibration; bits/group size unused.
    keep_gguf_codes: bool = False


@dataclass
class BuildResult:
    path: Path
    passed: bool
    report: Any
    seconds: float


def check_options(opts: BuildOptions) -> str:
    """Validate options before any work; returns the build dtype."""
    if opts.bits not in SUPPORTED_BITS:
        hint = " (INT2 loses too much quality to be useful)" if opts.bits == 2 else ""
        raise InputError(f"--bits {opts.bits} is not supported{hint}; choose one of {SUPPORTED_BITS}")
    if opts.group_size not in SUPPORTED_GROUPS:
        raise InputError(f"--group-size {opts.group_size} is not supported; choose one of {SUPPORTED_GROUPS}")
    dtype = opts.dtype or hardware.default_build_dtype()
    if dtype not in SUPPORTED_DTYPES:
        raise InputError(f"--dtype {dtype} is not supported; choose one of {SUPPORTED_DTYPES}")
    if opts.calib_file is not None and not Path(opts.calib_file).is_file():
        raise InputError(f"--calib {opts.calib_file}: no such file")
    if opts.calib_samples < 1 or opts.calib_seq_len < 16:
        raise InputError("--calib-samples must be ≥ 1 and --calib-seq-len ≥ 16")
    return dtype


def estimate_bytes(config: dict, bits: int, group_size: int, dtype: str) -> int:
    """Upper bound on the artifact size: every parameter of mlx_lm's model for ``config``
    (shapes only, nothing allocated) at ``bits`` plus scales/biases, those outside the
    decoder blocks at 8 bits."""
    from mlx.utils import tree_flatten

    from squish.quant.graph import Graph, build_model

    gr = Graph(build_model(config))
    overhead = 2 * DTYPE_BYTES[dtype] / group_size  # scales + biases per weight
    total = 0.0
    for k, v in tree_flatten(gr.model.parameters()):
        inside = gr.block_of(k) is not None
        total += v.size * ((bits / 8 if inside else 1) + overhead)
    return int(total) + (16 << 20)


@contextmanager
def _progress(quiet: bool):
    """Progress bars for the long stages (calibration, quantize, evaluation): a reporter
    ``report(stage, done, total, unit)`` that draws one bar per stage (count, rate, ETA;
    `squish.progress`), opened on a stage's first report and closed when it completes;
    None when quiet."""
    if quiet:
        yield None
        return
    from squish.progress import bar

    shown = None
    stage_shown = None

    def close() -> None:
        nonlocal shown, stage_shown
        if shown is not None:
            shown.close()
        shown = stage_shown = None

    def report(stage: str, done: int, total: int, unit: str = "block") -> None:
        nonlocal shown, stage_shown
        if stage != stage_shown:
            close()
            shown, stage_shown = bar(total, stage, unit=unit), stage
        shown.update(done - shown.n)
        if done >= total:
            close()

    try:
        yield report
    finally:
        close()


def _say(quiet: bool, msg: str) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def build(source: str, opts: BuildOptions) -> BuildResult:
    """Build an artifact; raises InputError (exit 1) / SystemFailure (exit 2)."""
    t0 = time.perf_counter()
    dtype = check_options(opts)
    if opts.bits == 3:
        _say(False, "warning: INT3 is experimental: expect a visible quality loss")
    cache_dir().mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="build-", dir=cache_dir()))
    try:
        return _build(source, opts, dtype, workdir, t0)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _build(source: str, opts: BuildOptions, dtype: str, workdir: Path, t0: float) -> BuildResult:
    from squish.quant.sources import resolve_source

    _say(opts.quiet, f"resolving {source} ...")
    ref = resolve_source(source, workdir, quiet=opts.quiet)

    from squish.quant.writer import ArtifactWriter
    from squish.quant.calibrate import calibration_tokens
    from squish.quant.evaluate import evaluate
    from squish.quant.quantize import QuantSpec, quantize_model

    if opts.keep_gguf_codes and ref.source.get("kind") != "gguf":
        raise InputError(f"--keep-gguf-codes needs a GGUF file; {source} is a "
                         f"{ref.source.get('kind')} source")
    suffix = "gguf" if opts.keep_gguf_codes else f"{opts.bits}bit"
    target = Path(opts.output) if opts.output else models_dir() / f"{ref.name}-{suffix}"
    need = (estimate_bytes(ref.config, 8, 32, dtype) if opts.keep_gguf_codes
            else estimate_bytes(ref.config, opts.bits, opts.group_size, dtype))
    free = hardware.free_disk_bytes(target.parent)
    if free < need:
        raise SystemFailure(
            f"not enough disk space at {target.parent}: the artifact needs about "
            f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free"
        )
    with ArtifactWriter(target, overwrite=opts.force) as writer, _progress(opts.quiet) as progress:
        if opts.keep_gguf_codes:
            from squish.quant.gguf_codes import keep_codes

            _say(opts.quiet, f"keeping the GGUF file's codes ({dtype} scales) ...")
            outcome, calib_summary = keep_codes(ref, dtype, writer.add, progress), None
        else:
            from mlx_lm.utils import load_tokenizer

            _say(opts.quiet, f"calibrating ({opts.calib_samples} x {opts.calib_seq_len} tokens) ...")
            calib, calib_summary = calibration_tokens(
                ref,
                load_tokenizer(ref.tokenizer_dir),
                calib_file=opts.calib_file,
                n_samples=opts.calib_samples,
                seq_len=opts.calib_seq_len,
                seed=opts.seed,
                progress=progress,
            )
            spec = QuantSpec(bits=opts.bits, group_size=opts.group_size, dtype=dtype)
            _say(opts.quiet, f"quantizing to INT{opts.bits} g{opts.group_size} ({dtype}) ...")
            outcome = quantize_model(ref, calib, spec, writer.add, progress)
        bits = outcome.recipe["bits"]
        writer.copy_tokenizer(ref.tokenizer_dir)
        config = {**ref.config, "quantization": outcome.quantization}
        config["quantization_config"] = outcome.quantization
        writer.write_config(config)
        writer.close_weights()
        _say(opts.quiet, "evaluating against the reference on held-out text ...")
        # Kept codes are the file's own values and the rest is at 8 bits: INT8's gate applies.
        gate_bits = 8 if opts.keep_gguf_codes else bits
        report = evaluate(ref, writer.staging_dir, bits=gate_bits, progress=progress)
        if not opts.quiet:
            print(report.table(), file=sys.stderr)
        if not report.passed and not opts.keep_failed:
            what = "kept-codes" if opts.keep_gguf_codes else f"INT{bits}"
            raise InputError(
                f"the {what} build of {source} failed its quality gate (see the table above); "
                "no artifact was written. Try more bits or a smaller group size, or pass "
                "--keep-failed to keep it marked as failed."
            )
        manifest = _manifest(ref, opts, dtype, outcome, calib_summary, report, t0)
        path = writer.commit(manifest)
    seconds = time.perf_counter() - t0
    _say(opts.quiet, f"{'built' if report.passed else 'kept FAILED build'} {path} in {seconds:.0f} s")
    return BuildResult(path=path, passed=report.passed, report=report, seconds=seconds)


def _manifest(ref, opts, dtype, outcome, calib_summary, report, t0) -> dict:
    import mlx.core as mx
    import mlx_lm

    import squish

    return {
        "name": ref.name,
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": ref.source,
        "quantization": {
            "bits": outcome.recipe["bits"],
            "group_size": outcome.recipe["group_size"],
            "dtype": dtype,
            "built_for_backend": hardware.backend(),
            "experimental": outcome.recipe["experimental"],
            "recipe": outcome.recipe,
        },
        "calibration": calib_summary,
        "quality": report.to_dict(),
        "tools": {"squish": squish.__version__, "mlx": mx.__version__, "mlx_lm": mlx_lm.__version__},
        "hardware": hardware.describe(),
        "build_seconds": round(time.perf_counter() - t0, 1),
        "notes": ref.notes,
    }
