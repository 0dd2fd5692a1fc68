"""Quality gate: a built artifact vs its float reference on held-out text.

The artifact is loaded with ``mlx_lm.utils.load`` exactly as a user would load
it (``QuantizedLinear`` / ``QuantizedEmbedding`` built from config.json). Both it
and the float reference run through the model's own mlx_lm forward pass
(``squish.quant.passes.Runner``: every op is mlx_lm's, including any logit
soft-capping or scaling after the head), with the products of linear layers in
numpy on weights dequantized by ``mx.dequantize`` - the arithmetic of the
quantized kernels - because MLX's CPU GEMM is ~30x slower. That shortcut is
checked, not assumed: ``runtime_consistency`` compares the logits of the real
mlx_lm quantized model with the numpy path on a prefix of the first window, and
the gate fails if they differ.

Metrics (next-token distributions, float32, non-overlapping windows of
``window`` tokens over ``data/heldout.txt``, which is original prose written for
this purpose and never used for calibration):
mean KL(ref || quant), top-1 agreement, perplexity of both and the relative
delta, max |delta logit|, NaN/Inf. Plus a greedy coherence check on a few chat
prompts this class of model answers (``COHERENCE_PROMPTS``; a pretrained model,
``Reference.chat`` False, on completions: ``COMPLETION_PROMPTS``): non-empty,
finite logits, no repetition loop (``repetition_loop``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from squish.progress import Progress
from squish.quant.calibrate import encode_corpus
from squish.quant.reference import Reference

HELDOUT = Path(__file__).parent / "data" / "heldout.txt"


@dataclass(frozen=True)
class Thresholds:
    """Pass/fail limits. Values chosen from measurements on SmolLM2-135M-Instruct
    (a small model: small models lose the most to quantization, so limits that a
    good build of it meets with margin are loose enough for bigger ones, and tight
    enough to catch broken builds - a wrong RoPE layout or a bad packing gives
    KLD > 1 and top-1 < 0.5). See THRESHOLDS for the per-bits numbers.
    """

    max_mean_kld: float
    min_top1: float
    max_ppl_delta: float  # relative: ppl_quant / ppl_ref - 1
    max_runtime_diff: float = 0.05  # |logit| diff, mlx_lm quantized model vs numpy path
    experimental: bool = False


# Measured with benchmarks/quant_quality.py on SmolLM2-135M-Instruct (g64, 32x128
# self-generated calibration tokens, 8 x 256 held-out tokens, float32 reference):
#            Squish KLD / top-1 / dppl     RTN (same 8-bit embedding) KLD / top-1
#   INT8:    ~0.001 / 0.98 / +0.3%         0.0012 / 0.977
#   INT4:     0.105 / 0.80 / +9.7%         0.311  / 0.676
#   INT3:     0.604 / 0.58 / +81%          2.104  / 0.265   (experimental)
# Limits sit at roughly 2x the Squish KLD (slack for other models, seeds and
# calibration sizes) and well below RTN's failure mode at the same bits, so the gate
# separates "working calibrated build" from "broken build" (wrong RoPE layout,
# bad packing or a failed calibration give KLD > 1, top-1 < 0.5). INT3 limits are
# looser and the report carries experimental=True.
THRESHOLDS: dict[int, Thresholds] = {
    8: Thresholds(max_mean_kld=0.01, min_top1=0.95, max_ppl_delta=0.02),
    4: Thresholds(max_mean_kld=0.20, min_top1=0.72, max_ppl_delta=0.25),
    3: Thresholds(max_mean_kld=1.00, min_top1=0.45, max_ppl_delta=1.50, experimental=True),
}

# Chat prompts SmolLM2-135M answers coherently in float32 (checked with the reference).
COHERENCE_PROMPTS = (
    "List three fruits.",
    "Write one sentence about the sun.",
    "Name three colors.",
)
# A pretrained model continues text and does not follow chat turns (Gemma 3 270M's float
# reference repeats "Name three colors." in a loop and its INT8 build loops on two of the
# three): it is checked on completions, which that reference continues without a loop.
COMPLETION_PROMPTS = (
    "Here is a list of three fruits: apple,",
    "The sun is a star that",
    "Once upon a time, a little fox",
)
COHERENCE_MAX_TOKENS = 48


def repetition_loop(tokens: list[int], max_period: int = 16, min_repeats: int = 3,
                    min_span: int = 16) -> bool:
    """True when the output *ends* in a cycle: some block of ``p <= max_period``
    tokens repeated back to back at least ``min_repeats`` times, covering at least
    ``min_span`` tokens (so "1. apple 2. pear 3. plum" is fine, "the the the ..." and
    "I am. I am. I am. ..." are not)."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        run = 0
        i = n - 1
        while i - p >= 0 and tokens[i] == tokens[i - p]:
            run += 1
            i -= 1
        span = run + p
        if span >= max(min_span, min_repeats * p):
            return True
    return False


@dataclass
class QualityReport:
    metrics: dict
    thresholds: Thresholds
    checks: list = field(default_factory=list)  # (name, value, limit, ok)
    coherence: list = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(c[3] for c in self.checks)

    @property
    def experimental(self) -> bool:
        return self.thresholds.experimental

    def to_dict(self) -> dict:
        return {
            "passed": self.passed,
            "experimental": self.experimental,
            "metrics": self.metrics,
            "thresholds": asdict(self.thresholds),
            "checks": [{"name": n, "value": v, "limit": lim, "ok": ok} for n, v, lim, ok in self.checks],
            "coherence": self.coherence,
            "seconds": round(self.seconds, 2),
        }

    def table(self) -> str:
        rows = [("check", "value", "limit", "")]
        for n, v, lim, ok in self.checks:
            rows.append((n, _fmt(v), str(lim), "ok" if ok else "FAIL"))
        m = self.metrics
        rows.append(("perplexity ref / quant", f"{m['ppl_ref']:.3f} / {m['ppl_quant']:.3f}", "", ""))
        rows.append(("max |delta logit|", f"{m['max_abs_dlogit']:.3f}", "", ""))
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = ["  ".join(r[i].ljust(w[i]) for i in range(4)).rstrip() for r in rows]
        lines.insert(1, "-" * len(lines[0]))
        for c in self.coherence:
            lines.append(f"coherence {'ok  ' if c['ok'] else 'FAIL'} {c['prompt']!r} -> {c['text'][:70]!r}")
        status = "PASSED" if self.passed else "FAILED"
        if self.experimental:
            status += " (INT3 is experimental)"
        lines.append(f"quality gate: {status}")
        return "\n".join(lines)


def _fmt(v):
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def heldout_windows(tokenizer, window: int, max_windows: int | None, path: Path = HELDOUT) -> np.ndarray:
    ids = encode_corpus(tokenizer, path.read_text(encoding="utf-8"))
    n = len(ids) // window
    if max_windows:
        n = min(n, max_windows)
    return np.array(ids[: n * window], dtype=np.int64).reshape(n, window)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


LOGITS_BLOCK = 1 << 23  # float32 logits per block of positions (32 MB; a few such temporaries live at once)


class Metrics:
    """KLD / top-1 / ppl / max|dlogit| / non-finite count, accumulated window by window.

    ``add(lr, lq, toks)`` takes the reference and quantized logits ``[L, V]`` of one
    window and its tokens ``[L]``; log-softmaxes are formed for a block of positions
    at a time (``LOGITS_BLOCK`` values)."""

    def __init__(self):
        self.kld = self.top1 = self.count = self.nll_ref = self.nll_q = 0.0
        self.npred, self.max_d, self.nonfinite = 0, 0.0, 0

    def add(self, lr: np.ndarray, lq: np.ndarray, toks: np.ndarray) -> None:
        L, vocab = lr.shape
        step = max(1, min(L, LOGITS_BLOCK // vocab))
        for p0 in range(0, L, step):
            a, b = lr[p0:p0 + step].astype(np.float32), lq[p0:p0 + step].astype(np.float32)
            self.nonfinite += int((~np.isfinite(b)).sum())
            b = np.nan_to_num(b, nan=0.0, posinf=1e4, neginf=-1e4)
            self.max_d = max(self.max_d, float(np.abs(a - b).max()))
            pr, pq = _log_softmax(a), _log_softmax(b)
            self.kld += float((np.exp(pr) * (pr - pq)).sum())
            self.top1 += float((a.argmax(-1) == b.argmax(-1)).sum())
            self.count += a.shape[0]
            tgt = toks[p0 + 1:p0 + step + 1]  # position p predicts token p + 1 of its window
            self.nll_ref -= float(np.take_along_axis(pr[:len(tgt)], tgt[:, None], -1).sum())
            self.nll_q -= float(np.take_along_axis(pq[:len(tgt)], tgt[:, None], -1).sum())
            self.npred += tgt.size

    def result(self) -> dict:
        ppl_r, ppl_q = float(np.exp(self.nll_ref / self.npred)), float(np.exp(self.nll_q / self.npred))
        return {
            "mean_kld": self.kld / self.count,
            "top1_agreement": self.top1 / self.count,
            "ppl_ref": ppl_r,
            "ppl_quant": ppl_q,
            "ppl_delta": ppl_q / ppl_r - 1.0,
            "max_abs_dlogit": self.max_d,
            "nonfinite_logits": self.nonfinite,
            "tokens": int(self.count),
        }


def compare_models(ref: Reference, model, toks: np.ndarray, *, quant_ref: Reference | None = None,
                   step: Callable[[], None] | None = None) -> tuple[dict, np.ndarray]:
    """Distribution metrics of ``model`` (a loaded mlx_lm model; or, for memory
    measurements, a second reference ``quant_ref``) against ``ref`` on the windows
    ``toks [n, L]``, both through their own forward passes (numpy products). Also
    returns the quantized side's logits for the first window. ``step()`` is called
    after each window."""
    from squish.quant.graph import Graph, build_model
    from squish.quant.passes import Runner

    acc = Metrics()
    first = None
    other = Runner(Graph(build_model(quant_ref.config)), quant_ref) if quant_ref else Runner(Graph(model))
    with Runner(Graph(build_model(ref.config)), ref) as r, other as q:
        for w in range(toks.shape[0]):
            ids = mx.array(toks[w:w + 1])
            lr = np.array(r.model(ids)[0].astype(mx.float32))
            lq = np.array(q.model(ids)[0].astype(mx.float32))
            acc.add(lr, lq, toks[w])
            if first is None:
                first = lq
            del lr, lq
            if step:
                step()
    return acc.result(), first


def evaluate(ref: Reference, artifact_dir: Path, *, bits: int | None = None,
             thresholds: Thresholds | None = None, window: int = 256, max_windows: int | None = 8,
             coherence: bool = True, progress: Progress | None = None) -> QualityReport:
    """Compare the artifact in ``artifact_dir`` with ``ref``; see the module docstring.
    ``progress(stage, done, total, unit)`` hears of each window and coherence prompt."""
    from mlx_lm.utils import load

    t0 = time.perf_counter()
    model, tokenizer = load(str(artifact_dir))
    q = getattr(model, "args", None)
    if bits is None:
        import json

        bits = json.loads((Path(artifact_dir) / "config.json").read_text())["quantization"]["bits"]
    th = thresholds or THRESHOLDS[bits]
    toks = heldout_windows(tokenizer, window, max_windows)
    chat = getattr(ref, "chat", True)
    total = toks.shape[0] + (len(_coherence_prompts(chat)) if coherence else 0)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress:
            progress("evaluation", done, total, "step")

    metrics, first = compare_models(ref, model, toks, step=step)
    del q

    # the shortcut must agree with the real quantized runtime (causal: a prefix's logits
    # are the first window's first positions)
    n = min(64, toks.shape[1])
    real = np.array(model(mx.array(toks[:1, :n])).astype(mx.float32))[0]
    metrics["runtime_consistency_max_abs"] = float(np.abs(real - first[:n]).max())
    metrics["runtime_nonfinite"] = int((~np.isfinite(real)).sum())

    checks = [
        ("mean KLD", metrics["mean_kld"], th.max_mean_kld, metrics["mean_kld"] <= th.max_mean_kld),
        ("top-1 agreement", metrics["top1_agreement"], th.min_top1, metrics["top1_agreement"] >= th.min_top1),
        ("perplexity delta", metrics["ppl_delta"], th.max_ppl_delta, metrics["ppl_delta"] <= th.max_ppl_delta),
        ("NaN/Inf logits", metrics["nonfinite_logits"] + metrics["runtime_nonfinite"], 0,
         metrics["nonfinite_logits"] + metrics["runtime_nonfinite"] == 0),
        ("runtime consistency", metrics["runtime_consistency_max_abs"], th.max_runtime_diff,
         metrics["runtime_consistency_max_abs"] <= th.max_runtime_diff),
    ]
    coh = _coherence(model, tokenizer, chat=chat, step=step) if coherence else []
    if coherence:
        checks.append(("coherence prompts ok", sum(c["ok"] for c in coh), len(coh), all(c["ok"] for c in coh)))
    return QualityReport(metrics=_round(metrics), thresholds=th, checks=checks, coherence=coh,
                         seconds=time.perf_counter() - t0)


def _round(d):
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def _coherence_prompts(chat: bool) -> tuple[str, ...]:
    return COHERENCE_PROMPTS if chat else COMPLETION_PROMPTS


def _coherence(model, tokenizer, chat: bool = True, step: Callable[[], None] | None = None) -> list[dict]:
    from mlx_lm.generate import generate_step

    out = []
    eos = set(getattr(tokenizer, "eos_token_ids", []) or [tokenizer.eos_token_id])
    for prompt in _coherence_prompts(chat):
        ids = (tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
               if chat else tokenizer.encode(prompt))
        toks: list[int] = []
        finite = True
        for tok, logprobs in generate_step(mx.array(ids), model, max_tokens=COHERENCE_MAX_TOKENS,
                                           sampler=lambda lp: mx.argmax(lp, axis=-1)):
            finite &= bool(mx.all(mx.isfinite(logprobs)).item())
            t = int(tok)
            if t in eos:
                break
            toks.append(t)
        text = tokenizer.decode(toks)
        loop = repetition_loop(toks)
        ok = finite and not loop and bool(text.strip())
        out.append({"prompt": prompt, "text": text, "tokens": len(toks), "finite": finite,
                    "loop": loop, "ok": ok})
        if step:
            step()
    return out
