"""The ``squish`` command: parse arguments, call into the packages, map errors
to exit codes (0 success, 1 user/input error, 2 runtime/system error). Errors
go to stderr. Heavy imports (MLX, FastAPI) happen inside the handlers only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import traceback
from pathlib import Path

from squish import __version__
from squish.errors import InputError, SquishError

EPILOG = """examples:
  squish serve                              serve the best model for this machine on 127.0.0.1:8000
  squish serve qwen3:8b                     build a catalog model first if needed, then serve it
  squish serve mlx-community/Qwen3-8B-4bit  download a hub folder and serve it as it is
  squish pull qwen3:8b                      fetch without serving
  squish quantize smollm2:135m              build the default model (INT4)
  squish models                             list local models
"""



class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def _add(sub, name: str, help: str, examples: str):
    return sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples,
                          formatter_class=_Formatter)


def _register_quantize(sub) -> None:
    p = _add(sub, "quantize", "build a Squish artifact from a model source",
             "  squish quantize smollm2:135m\n"
             "  squish quantize ./SmolLM2-135M-Instruct.Q4_1.gguf --bits 8 -o ./smol8\n"
             "  squish quantize Qwen/Qwen2.5-1.5B-Instruct --group-size 64 --calib notes.txt\n"
             "  squish quantize ./gemma-3-270m-q4_k_m.gguf --keep-gguf-codes\n")
    p.add_argument("source", help="HF folder, .gguf file, catalog name (see `squish models --catalog`) or hub id")
    p.add_argument("-o", "--output", type=Path, help="artifact folder (default: $SQUISH_HOME/models/NAME-BITSbit, "
                                                             "NAME-gguf with --keep-gguf-codes)")
    p.add_argument("--bits", type=int, help="4 (default, production), 8, or 3 (experimental); a catalog "
                                          "name builds at its own default (`squish models --catalog`)")
    p.add_argument("--group-size", type=int, help="32, 64 (default) or 128")
    p.add_argument("--keep-gguf-codes", action="store_true",
                   help="GGUF source only: keep the file's own 4/5/8-bit codes where MLX's format holds "
                        "them exactly (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K, group 32) and round the rest "
                        "at 8 bits; no calibration. Not with --bits/--group-size/--calib*")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="dtype of scales/biases/norms (default: from the hardware; float32 on CPU)")
    p.add_argument("--calib", type=Path, dest="calib_file", help="calibration text file (default: text the model generates itself)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=128, help="tokens per calibration sequence (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration sampling (default 0)")
    p.add_argument("--force", action="store_true", help="replace an existing artifact")
    p.add_argument("--keep-failed", action="store_true", help="keep a build that fails its quality gate, marked failed")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the artifact path")
    p.set_defaults(handler=_quantize)


def _quantize(args) -> int:
    from squish import catalog
    from squish.quant.pipeline import BuildOptions, build

    entry = catalog.CATALOG.get(args.source.lower()) if catalog.looks_like_catalog_name(args.source) else None
    explicit = [flag for flag, v in (("--bits", args.bits), ("--group-size", args.group_size),
                                     ("--calib", args.calib_file)) if v is not None]
    explicit += [flag for flag, v, default in (("--calib-samples", args.calib_samples, 32),
                                               ("--calib-seq-len", args.calib_seq_len, 128),
                                               ("--seed", args.seed, 0)) if v != default]
    if args.keep_gguf_codes and explicit:
        raise InputError(f"--keep-gguf-codes keeps the file's own bits and groups and needs no "
                         f"calibration: drop {', '.join(explicit)}")
    if entry is not None and entry.keep_gguf_codes and not explicit:
        args.keep_gguf_codes = True  # the catalog entry's own default
    if args.bits is None:
        args.bits = entry.bits if entry else 4
    if args.group_size is None:
        args.group_size = 64
    opts = BuildOptions(**{k: getattr(args, k) for k in (
        "bits", "group_size", "dtype", "calib_file", "calib_samples", "calib_seq_len",
        "seed", "output", "force", "keep_failed", "quiet", "keep_gguf_codes")})
    result = build(args.source, opts)
    print(result.path)
    return 0 if result.passed else 1


def _register_models(sub) -> None:
    p = _add(sub, "models", "list local models (or the catalog, with the memory each needs)",
             "  squish models\n  squish models --json\n  squish models --catalog\n")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--catalog", action="store_true", help="list the catalog names squish quantize accepts")
    p.add_argument("-q", "--quiet", action="store_true", help="names only")
    p.set_defaults(handler=_models)


def _models(args) -> int:
    from squish.models import list_local

    if args.catalog:
        return _catalog_table(args)
    models = list_local()
    if args.json:
        print(json.dumps([{**m.__dict__, "path": str(m.path)} for m in models], indent=2))
    elif args.quiet:
        for m in models:
            print(m.name)
    elif not models:
        print("no local models; build one with `squish quantize smollm2:135m`", file=sys.stderr)
    else:
        print(f"{'NAME':<32} {'BITS':>4} {'SIZE':>9}  QUALITY")
        for m in models:
            flag = "  experimental" if m.experimental else ""
            size = f"{m.size_bytes / 1e6:.0f} MB"
            print(f"{m.name:<32} {m.bits if m.bits else '-':>4} {size:>9}  {m.verdict}{flag}")
    return 0


def _catalog_table(args) -> int:
    """The catalog with the bits each builds at and the memory that build needs to serve
    (squish/sizing.py)."""
    from squish import catalog, sizing

    rows = []
    for e in catalog.CATALOG.values():
        need = catalog.memory_need(e) if e.name in catalog.SHAPES else None
        rows.append({"name": e.name, "source": e.source, "params": f"{e.params_b:g}B", "bits": e.bits,
                     "keep_gguf_codes": e.keep_gguf_codes, "notes": e.notes,
                     "memory_need_bytes": need,
                     "min_memory_bytes": need and sizing.smallest_machine_bytes(need)})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not args.quiet:
        print(f"{'NAME':<14} {'PARAMS':>7} {'BITS':>4} {'NEEDS':>7} {'FROM RAM':>8}  SOURCE")
    for r in rows:
        need = f"{r['memory_need_bytes'] / 1e9:.1f} GB" if r["memory_need_bytes"] else "-"
        ram = f"{math.ceil(r['min_memory_bytes'] / 2**30)} GiB" if r["min_memory_bytes"] else "-"
        print(r["name"] if args.quiet else
              f"{r['name']:<14} {r['params']:>7} {_bits_cell(r):>4} {need:>7} {ram:>8}  {r['source']}  "
              f"{r['notes']}".rstrip())
    return 0


def _bits_cell(row: dict) -> str:
    """The bits of a calibrated build; ``gguf`` for one that keeps its GGUF file's codes."""
    return "gguf" if row["keep_gguf_codes"] else str(row["bits"])


def _register_rm(sub) -> None:
    p = _add(sub, "rm", "remove a local model",
             "  squish rm smollm2-135m-4bit\n  squish rm mlx-community/Qwen3-8B-4bit\n")
    p.add_argument("name", help="model name as `squish models` lists it, or the hub id it was pulled with")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(handler=_rm)


def _rm(args) -> int:
    from squish.models import remove_model

    path = remove_model(args.name)
    if not args.quiet:
        print(f"removed {path}")
    return 0


def _register_verify(sub) -> None:
    p = _add(sub, "verify", "check an artifact: files, sizes, sha256, headers, NaN/Inf",
             "  squish verify smollm2-135m-4bit\n  squish verify ./my-artifact\n")
    p.add_argument("model", help="artifact name or folder")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(handler=_verify)


def _verify(args) -> int:
    from squish.models import resolve_model
    from squish.runtime.loader import load_artifact

    loaded = load_artifact(resolve_model(args.model), verify_hashes=True)
    if not args.quiet:
        files = len((loaded.manifest or {}).get("files", {}))
        print(f"ok: {loaded.path} ({files} files hashed, loaded in {loaded.load_seconds:.2f} s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="squish", description="Squish: a fast, lean local LLM server on MLX.",
        epilog=EPILOG, formatter_class=_Formatter)
    parser.add_argument("--version", action="version", version=f"squish {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _register_quantize(sub)
    from squish.cli import chat, fetch, serve  # argparse only: no MLX / FastAPI at import

    serve.register(sub)
    chat.register(sub)
    fetch.register(sub)
    _register_models(sub)
    _register_rm(sub)
    _register_verify(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse: 0 after --help; 2 for a usage error, which is the user's (exit 1)
        return 1 if e.code == 2 else int(e.code or 0)
    if not getattr(args, "handler", None):
        parser.print_help(sys.stderr)
        return 1
    logging.basicConfig(level=logging.ERROR if getattr(args, "quiet", False) else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except SquishError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # whoever read stdout stopped (`squish models --catalog | head`): not a failure. Point
        # stdout at devnull so that the interpreter's final flush does not raise it again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # an internal failure: say so, keep the traceback for bug reports
        if os.environ.get("SQUISH_DEBUG"):
            traceback.print_exc()
        print(f"error: internal failure: {type(e).__name__}: {e} (set SQUISH_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
