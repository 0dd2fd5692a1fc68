"""Calibrated weight quantization into MLX's affine format, block by block, for any
architecture mlx_lm runs.

The model's own mlx_lm forward pass drives the build (``squish.quant.graph``):
its loop calls block ``i`` with the output of the already-quantized blocks
``0..i-1`` on the calibration tokens, and a hook on the block does, there:

1. load the block's float32 weights (only this block is held);
2. once per block signature: check the numpy products against mlx_lm's own
   block, and find the block's exact AWQ fold points (``squish.quant.folds``);
3. a float pass capturing every linear's input; AWQ scales searched and folded
   (``squish.quant.awq``);
4. a quantize pass, true-sequential in the model's own call order: each linear
   is quantized (clip-searched group ranges + GPTQ, ``squish.quant.gptq``) the
   first time it is called, from its input as computed by the already-quantized
   layers before it; linears fed the same array share one Hessian. Mixture-of-
   experts layers quantize each expert on the tokens routed to it; an expert that
   saw fewer than ``min_expert_tokens`` falls back to clip-searched
   round-to-nearest (recorded). A linear no fold reaches gets no scaling and still
   clip + GPTQ (recorded);
5. emit the packed tensors (``squish.quant.packing``, bit-exact with
   ``mx.quantize``) and hand the quantized block's output to the model's loop.

The embedding and LM head (outside the blocks) get 8 bits by default
(``MixedPolicy``; the measured reason is recorded). ``method="rtn"`` is the
uncalibrated baseline (min/max round-to-nearest, what ``mlx_lm.convert -q``
does) through the same emitter, with no forward pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
import numpy as np

from squish.errors import InputError
from squish.quant import graph as g
from squish.quant.packing import PACKABLE_BITS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES, bits_per_weight
from squish.quant.reference import Reference

DTYPES = ("float32", "float16", "bfloat16")
_MX = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
MIN_EXPERT_TOKENS = 64  # fewer routed calibration tokens: clip-searched RTN for that expert


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group_size: int
    dtype: str = "float32"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise InputError(f"--bits {self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise InputError(
                f"--group-size {self.group_size} is not supported; choose one of {SUPPORTED_GROUP_SIZES}"
            )
        if self.dtype not in DTYPES:
            raise InputError(f"dtype {self.dtype!r} is not supported; choose one of {DTYPES}")

    @property
    def experimental(self) -> bool:
        return self.bits == 3


@dataclass(frozen=True)
class Method:
    """Which calibrated steps run. ``rtn`` = none of them."""

    awq: bool = True
    clip: bool = True
    gptq: bool = True

    @property
    def name(self) -> str:
        parts = [p for p, on in (("awq", self.awq), ("clip", self.clip), ("gptq", self.gptq)) if on]
        return "+".join(parts) or "rtn"

    @property
    def calibrated(self) -> bool:
        return self.awq or self.clip or self.gptq

    @staticmethod
    def parse(name: str) -> "Method":
        if name in ("rtn", ""):
            return Method(False, False, False)
        if name == "squish":
            return Method()
        parts = set(name.split("+"))
        unknown = parts - {"awq", "clip", "gptq"}
        if unknown:
            raise InputError(f"unknown quantization method part(s) {sorted(unknown)}")
        return Method("awq" in parts, "clip" in parts, "gptq" in parts)


@dataclass(frozen=True)
class MixedPolicy:
    """Which modules get more bits than the spec, and how many.

    ``embed_bits``: every quantized module outside the decoder blocks (the token
    embedding; the LM head, tied or not). ``None`` keeps ``spec.bits``.
    ``overrides``: module path -> bits, applied verbatim (used by the
    sensitivity experiments in ``benchmarks/quant_quality.py``).
    """

    embed_bits: int | None = 8
    overrides: tuple[tuple[str, int], ...] = ()

    def bits_for(self, path: str, default: int, top: bool = False) -> int:
        for p, b in self.overrides:
            if p == path:
                return max(b, default)
        if top and self.embed_bits is not None:
            return max(self.embed_bits, default)
        return default


UNIFORM = MixedPolicy(embed_bits=None)


@dataclass
class QuantOutcome:
    quantization: dict
    recipe: dict
    module_errors: dict = field(default_factory=dict)


_EMBED_REASON = (
    "outside the decoder blocks (token embedding / LM head; tied in SmolLM2, the largest single tensor "
    "and the last op before the logits): measured on SmolLM2-135M INT4 g64 (RTN, same calibration/eval), "
    "8 bits instead of 4 cut mean KLD 0.407 -> 0.311 for +0.84 bits/weight overall"
)


def emit_cast(emit: Callable[[str, mx.array], None], name: str, arr, dtype: str) -> None:
    """Emit ``arr`` evaluated, floating point in the artifact ``dtype`` (integers as they are)."""
    a = arr if isinstance(arr, mx.array) else mx.array(arr)
    if mx.issubdtype(a.dtype, mx.floating):
        a = a.astype(_MX[dtype])
    mx.eval(a)
    emit(name, a)


def decide(model, path: str, module, spec: QuantSpec, mixed: MixedPolicy, top: bool):
    """``(bits, group_size)`` for a module, or None where mlx_lm would leave it in float
    (no ``to_quantized``, rows not a multiple of the group size, the model's
    ``quant_predicate`` says no). The predicate's bits/group size are honoured."""
    if not hasattr(module, "to_quantized") or g.kind(module) is None:
        return None
    bits, gs = mixed.bits_for(path, spec.bits, top), spec.group_size
    pred = getattr(model, "quant_predicate", None)
    if pred is not None:
        r = pred(path, module)
        if r is False:
            return None
        if isinstance(r, dict):
            bits, gs = max(bits, int(r.get("bits", bits))), int(r.get("group_size", gs))
    if module["weight"].shape[-1] % gs or bits not in PACKABLE_BITS:
        return None
    return bits, gs


def quantize_model(ref: Reference, calib, spec: QuantSpec, emit: Callable[[str, mx.array], None],
                   progress: Callable[[str, int, int], None] | None = None, *,
                   method: str | Method = "squish", mixed: MixedPolicy | None = None,
                   damp: float = 0.01, static_groups: bool = True,
                   min_expert_tokens: int = MIN_EXPERT_TOKENS) -> QuantOutcome:
    """Quantize ``ref`` to ``spec``; see the module docstring. Emits every final tensor."""
    from squish.quant.blockwise import _Build

    t0 = time.perf_counter()
    m = method if isinstance(method, Method) else Method.parse(method)
    mixed = MixedPolicy() if mixed is None else mixed
    tokens = np.asarray(calib, dtype=np.int64)
    if tokens.ndim != 2:
        raise InputError(f"calibration tokens must be [n_samples, seq_len], got shape {tokens.shape}")
    b = _Build(ref, spec, emit, progress, m, mixed, damp, static_groups, min_expert_tokens)
    n = len(b.gr.blocks)
    if not m.calibrated:  # RTN needs no activations: no forward pass
        b.top_level()
        for i in range(n):
            b.rtn_block(i)
            if progress:
                progress("quantize", i + 1, n)
    else:
        _calibrated(b, tokens)
    return _outcome(b, m, spec, damp, t0)


def _calibrated(b, tokens: np.ndarray) -> None:
    """Drive the blocks through the model's own forward pass (see the module docstring)."""
    for lins in b.lins:
        for lin in lins.values():
            g.attach(lin.module, lin, "switch" if lin.switch else "linear")
    b.vocab = b.loader.top(b.T)
    for path, mod in b.gr.top_modules().items():
        g.attach(mod, b.vocab[path], "embedding" if g.kind(mod) == "embedding" else "head")
    b.gr.hook_blocks(b.calibrated_block)
    try:
        with g.numpy_attention():
            b.gr.model(mx.array(tokens))
    except g.Stop:
        pass
    finally:
        b.gr.detach_all()
    missed = [i for i in range(len(b.gr.blocks)) if i not in b.done]
    if missed:  # blocks the forward pass never reached (mlx_lm lists them but does not call them)
        if not b.done:
            b.top_level()
        for i in missed:
            b.rtn_block(i)
            for p in b.lins[i]:
                b.reasons[b.gr.prefixes[i] + p] = "block not called by the model's forward pass: round-to-nearest"


def _outcome(b, m: Method, spec: QuantSpec, damp: float, t0: float) -> QuantOutcome:
    gs, dt = spec.group_size, spec.dtype
    total_w = sum(n for n, _, _ in b.n_params.values())
    bpw = sum(n * bits_per_weight(bits, g_, dt) for n, bits, g_ in b.n_params.values()) / max(total_w, 1)
    b.timings["total_s"] = time.perf_counter() - t0
    worst = sorted(b.errors.items(), key=lambda kv: -kv[1])[:5]
    more = {p: {"bits": c["bits"], "group_size": c["group_size"], "why": b.reasons.get(p, "")}
            for p, c in b.qcfg.items() if isinstance(c, dict)}
    for p, bits in b.mixed.overrides:
        if p in more:
            more[p]["why"] = f"override: {bits} bits"
    alphas = {}
    for k, v in b.alphas.items():
        a = [x["alpha"] for x in v if x.get("alpha") is not None]
        alphas[k] = round(float(np.mean(a)), 3) if a else None
    recipe = {
        "method": m.name,
        "bits": spec.bits,
        "group_size": gs,
        "dtype": dt,
        "experimental": spec.experimental,
        "architecture": b.ref.config.get("model_type"),
        "more_bits": more,
        "bits_per_weight": round(bpw, 4),
        "awq_folds": alphas if m.awq else None,
        "awq_unscaled": {p: {"why": v["why"], "blocks": _ranges(v["blocks"])} for p, v in b.unscaled.items()},
        "expert_fallback": b.fallback,
        "unquantized": b.unquantized,
        "largest_relative_output_errors": {p: round(e, 5) for p, e in worst},
        "gptq_damp": damp if m.gptq else None,
        "min_expert_tokens": b.min_tokens if m.calibrated else None,
        "timings_s": {k: round(v, 2) for k, v in b.timings.items()},
    }
    return QuantOutcome(quantization=b.qcfg, recipe=recipe, module_errors=b.errors)


def _ranges(xs: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    out, start = [], None
    for a, nxt in zip(xs, xs[1:] + [None]):
        start = a if start is None else start
        if nxt != a + 1:
            out.append(f"{start}-{a}" if a != start else str(a))
            start = None
    return ",".join(out)


def effective_bits(outcome: QuantOutcome) -> float:
    return outcome.recipe["bits_per_weight"]
