"""One ``quantize_model`` call's state and its per-block passes (``squish.quant.quantize``
describes the pipeline)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from squish.errors import InputError
from squish.quant import graph as g
from squish.quant.gptq import HessianPrep, dequantize, gptq, hessian, output_error, rtn
from squish.quant.packing import pack
from squish.quant.quantize import _EMBED_REASON, decide, emit_cast


class _Build:
    """The state of one ``quantize_model`` call (see the module docstring)."""

    def __init__(self, ref, spec, emit, progress, m, mixed, damp, static_groups, min_expert_tokens):
        self.ref, self.spec, self.emit, self.progress = ref, spec, emit, progress
        self.m, self.mixed, self.damp, self.static = m, mixed, damp, static_groups
        self.min_tokens = min_expert_tokens
        self.gr = g.Graph(g.build_model(ref.config))
        from squish.quant.passes import RefLoader

        self.loader = RefLoader(ref, self.gr)
        self.T = self.loader.open()
        self.lins = [{p: g.Lin(p, mod, g.kind(mod) == "switch") for p, mod in lin.items()}
                     for lin in self.gr.linears]
        self.qcfg: dict = {"group_size": spec.group_size, "bits": spec.bits, "mode": "affine"}
        self.n_params: dict[str, tuple[int, int, int]] = {}
        self.reasons: dict[str, str] = {}
        self.errors: dict[str, float] = {}
        self.timings = {"embed_s": 0.0, "check_s": 0.0, "folds_s": 0.0, "awq_s": 0.0, "quantize_s": 0.0}
        self.plans: dict = {}
        self.alphas: dict[str, list] = {}
        self.unscaled: dict[str, dict] = {}
        self.fallback: dict[str, dict] = {}
        self.unquantized: dict[str, str] = {}
        self.done: set[int] = set()
        self.vocab: dict = {}
        self.param_keys = {k for k, _ in tree_flatten(self.gr.model.parameters())}

    # ---------------------------------------------------------------- emission
    def emit_array(self, name: str, arr) -> None:
        emit_cast(self.emit, name, arr, self.spec.dtype)

    def emit_packed(self, path, words, s, b, bits, gs, n) -> None:
        self.emit_array(path + ".weight", words)
        self.emit_array(path + ".scales", s)
        self.emit_array(path + ".biases", b)
        self.n_params[path] = (n, bits, gs)
        if (bits, gs) != (self.spec.bits, self.spec.group_size):
            self.qcfg[path] = {"group_size": gs, "bits": bits, "mode": "affine"}

    def decide(self, path, module, top=False):
        d = decide(self.gr.model, path, module, self.spec, self.mixed, top)
        if d is None and hasattr(module, "to_quantized"):
            self.unquantized[path] = "left in float as mlx_lm would (no group-size multiple, or the model's quant_predicate)"
        elif d is not None and d[0] != self.spec.bits:
            self.reasons.setdefault(path, _EMBED_REASON if top else "the model's quant_predicate")
        return d

    # ---------------------------------------------------------------- top level
    def top_level(self) -> None:
        """Quantize the modules outside the blocks (row chunks; drops them after) and emit
        every other top-level parameter."""
        t = time.perf_counter()
        top = self.gr.top_modules()
        for path, module in top.items():
            w = self.T.pop(path + ".weight")
            d = self.decide(path, module, top=True)
            if d is None:
                self.emit_array(path + ".weight", w)
            else:
                mx.eval(w)  # once, as stored; the row chunks below slice it
                _quantize_rows(w, d[0], d[1], self.spec.dtype, self, path, clip=self.m.calibrated)
            if path in self.vocab:  # the forward pass's copy: quantized and emitted, never read again
                self.vocab[path].weight = self.vocab[path].dense = None
            del w
            mx.clear_cache()
            if path + ".bias" in self.T:
                self.emit_array(path + ".bias", self.T.pop(path + ".bias"))
        for k in [k for k in self.T if self.gr.block_of(k) is None]:
            v = self.T.pop(k)
            if k in self.param_keys:  # a source may carry tensors the model does not use
                self.emit_array(k, v)
        self.timings["embed_s"] += time.perf_counter() - t

    # ---------------------------------------------------------------- blocks
    def block_decisions(self, i):
        pre = self.gr.prefixes[i]
        return {p: self.decide(pre + p, lin.module) for p, lin in self.lins[i].items()}

    def emit_block(self, i, packed: dict) -> None:
        pre = self.gr.prefixes[i]
        lins = self.lins[i]
        for p, lin in lins.items():
            if p in packed:
                words, s, b, bits, gs = packed[p]
                self.emit_packed(pre + p, words, s, b, bits, gs, lin.w.size)
            else:
                self.emit_array(pre + p + ".weight", lin.w)
            if lin.b is not None:
                self.emit_array(pre + p + ".bias", lin.b)
        from mlx.utils import tree_flatten

        blk = self.gr.blocks[i]
        for k, v in tree_flatten(blk.parameters()):
            path, _, leaf = k.rpartition(".")
            if path in lins and leaf in ("weight", "bias"):
                continue
            mod = dict(blk.named_modules()).get(path)
            d = self.decide(pre + path, mod) if (mod is not None and leaf == "weight" and g.kind(mod)) else None
            if d is not None:  # e.g. an embedding inside a block: clip-searched RTN
                q, s, b = rtn(g.to_np(v), d[0], d[1], self.spec.dtype, clip=self.m.calibrated)
                self.emit_packed(pre + path, pack(q, d[0]), s, b, d[0], d[1], q.size)
                self.reasons[pre + path] = "not a linear layer: clip-searched round-to-nearest"
            else:
                self.emit_array(pre + k, v)

    def quantize_linear(self, lin: g.Lin, d, x, idx, cache: dict, packed: dict, path: str) -> None:
        """Quantize one linear (all its experts) from its input ``x``; sets ``lin.w`` to the
        dequantized weights and records the packed form."""
        bits, gs = d
        dt, m = self.spec.dtype, self.m
        if not lin.switch:
            H, prep = self._prep(cache, id(x), lambda: x)
            q, s, b = (gptq(lin.w, prep, bits, gs, dt, clip=m.clip, static_groups=self.static) if m.gptq
                       else rtn(lin.w, bits, gs, dt, H=H, clip=m.clip))
            wq = dequantize(q, s, b, gs)
            if H is not None:
                self.errors[path] = output_error(lin.w, wq, H)[1]
            lin.w = wq
            packed[lin.path] = (pack(q, bits), s, b, bits, gs)
            return
        rows, ex = g.expert_rows(x, idx)
        E = lin.w.shape[0]
        counts = np.bincount(ex, minlength=E)
        qs, ss, bs, wq = [], [], [], np.empty_like(lin.w)
        starved = [e for e in range(E) if counts[e] < self.min_tokens]
        for e in range(E):
            if e in starved:
                q, s, b = rtn(lin.w[e], bits, gs, dt, H=None, clip=True)
            else:
                H, prep = self._prep(cache, (id(x), e), lambda e=e: rows[ex == e])
                q, s, b = (gptq(lin.w[e], prep, bits, gs, dt, clip=m.clip, static_groups=self.static) if m.gptq
                           else rtn(lin.w[e], bits, gs, dt, H=H, clip=m.clip))
            wq[e] = dequantize(q, s, b, gs)
            qs.append(pack(q, bits)), ss.append(s), bs.append(b)
        if starved:
            self.fallback[path] = {
                "experts": starved, "tokens": [int(counts[e]) for e in starved],
                "why": f"saw fewer than {self.min_tokens} calibration tokens: clip-searched round-to-nearest"}
        lin.w = wq
        packed[lin.path] = (np.stack(qs), np.stack(ss), np.stack(bs), bits, gs)

    def _prep(self, cache, key, rows):
        if key not in cache:
            H = hessian(rows())
            cache[key] = (H, HessianPrep(H, self.damp) if self.m.gptq else None)
        return cache[key]


    # ---------------------------------------------------------------- passes
    def rtn_block(self, i) -> None:
        from squish.quant.passes import install_block

        t = time.perf_counter()
        install_block(self.gr, i, self.loader.block(self.T, i), self.lins[i])
        packed = {}
        for p, d in self.block_decisions(i).items():
            if d is not None:
                lin = self.lins[i][p]
                q, s, b = rtn(lin.w.reshape(-1, lin.w.shape[-1]), d[0], d[1], self.spec.dtype)
                shape = lin.w.shape[:-1]
                packed[p] = (pack(q, d[0]).reshape(*shape, -1), s.reshape(*shape, -1), b.reshape(*shape, -1), *d)
        self.emit_block(i, packed)
        self.release(i)
        mx.clear_cache()
        self.timings["quantize_s"] += time.perf_counter() - t

    def release(self, i) -> None:
        for lin in self.lins[i].values():
            lin.w = lin.b = None
            lin.hook = None
            lin.convert = g.to_np

    def run_traced(self, i, call, args, kwargs, *, norms: bool) -> "Trace":
        return trace_block(self.gr.blocks[i], self.lins[i], call, args, kwargs, norms=norms)

    def check_block(self, i, call, args, kwargs) -> None:
        """The numpy products against mlx_lm's own block on one sample (once per signature)."""
        t = time.perf_counter()
        lins = self.lins[i]
        pargs = _probe_args(args, 1)
        mine = self.run_traced(i, call, pargs, kwargs, norms=False).out
        saved = {}
        for p, lin in lins.items():
            saved[p] = dict(tree_flatten(lin.module.parameters()))
            g.detach(lin.module)
            lin.module.update({"weight": mx.array(lin.w), **({"bias": mx.array(lin.b)} if lin.b is not None else {})})
        try:
            with g.mlx_attention():
                ref = flat_outputs(call(self.gr.blocks[i], *pargs, **kwargs))
        finally:
            for p, lin in lins.items():
                lin.module.update(saved[p])
                g.attach(lin.module, lin, "switch" if lin.switch else "linear")
        err = float(np.abs(ref - mine).max() / max(np.abs(ref).max(), 1e-6))
        self.timings["check_s"] += time.perf_counter() - t
        if not err <= 2e-3:
            mt = self.ref.config.get("model_type")
            raise InputError(
                f"model_type {mt!r}: block {i} computed with numpy products disagrees with mlx_lm's own "
                f"block (relative error {err:.2e}); some module of it uses a linear layer's weights "
                "other than by calling it, which the calibrated build cannot follow"
            )

    def calibrated_block(self, i, block, call, args, kwargs):
        from squish.quant import awq, folds
        from squish.quant.passes import install_block

        if i == 0:
            mx.eval([a for a in (*args, *kwargs.values()) if isinstance(a, mx.array)])
            self.top_level()
        if i in self.done:
            raise InputError(f"model_type {self.ref.config.get('model_type')!r} calls decoder block {i} "
                             "more than once per forward pass (shared blocks): not supported")
        install_block(self.gr, i, self.loader.block(self.T, i), self.lins[i])
        lins, pre = self.lins[i], self.gr.prefixes[i]
        cache = g.NpCache()
        for lin in lins.values():
            lin.convert = cache
        decisions = self.block_decisions(i)
        sig = folds.signature(block, lins)
        if sig not in self.plans:
            self.check_block(i, call, args, kwargs)
            t = time.perf_counter()
            pargs = _probe_args(args, 4)
            self.plans[sig] = (folds.discover(block, lins, lambda: self.run_traced(i, call, pargs, kwargs, norms=True))
                               if self.m.awq else None)
            self.timings["folds_s"] += time.perf_counter() - t
        plan = self.plans[sig]
        if plan is not None:
            t = time.perf_counter()
            caps = self.run_traced(i, call, args, kwargs, norms=False).x
            qbits = {p: d[0] for p, d in decisions.items() if d is not None}
            for fold in plan.folds:
                s, summary = awq.search_fold(fold, lins, caps, qbits, self.spec.group_size, self.spec.dtype,
                                             self.min_tokens)
                if s is not None:
                    awq.apply_fold(fold, s, block, lins)
                    self.alphas.setdefault(f"{fold.producer} -> {', '.join(fold.consumers)}", []).append(summary)
            for p, why in plan.unscaled.items():
                self.unscaled.setdefault(p, {"why": why, "blocks": []})["blocks"].append(i)
            del caps
            cache.clear()
            self.timings["awq_s"] += time.perf_counter() - t
        t = time.perf_counter()
        packed, hcache = {}, {}

        def qhook(lin, x, idx):
            lin.hook = None  # once: the first call's input, as the quantized layers before it made it
            if decisions[lin.path] is not None:
                self.quantize_linear(lin, decisions[lin.path], x, idx, hcache, packed, pre + lin.path)

        for lin in lins.values():
            lin.hook = qhook
        out = call(block, *args, **kwargs)
        mx.eval(out)
        for p, lin in lins.items():  # never called in the forward pass: round-to-nearest
            if lin.hook is not None and decisions[p] is not None:
                lin.hook = None
                q, s, b = rtn(lin.w.reshape(-1, lin.w.shape[-1]), *decisions[p], self.spec.dtype, clip=True)
                shape = lin.w.shape[:-1]
                packed[p] = (pack(q, decisions[p][0]).reshape(*shape, -1), s.reshape(*shape, -1),
                             b.reshape(*shape, -1), *decisions[p])
                self.reasons[pre + p] = "not called by the model's forward pass: clip-searched round-to-nearest"
        del hcache
        self.emit_block(i, packed)
        self.release(i)
        cache.clear()
        mx.clear_cache()
        self.done.add(i)
        self.timings["quantize_s"] += time.perf_counter() - t
        if self.progress:
            self.progress("quantize", len(self.done), len(self.gr.blocks))
        if len(self.done) == len(self.gr.blocks):
            raise g.Stop(out)
        return out


def trace_block(block, lins: dict, call, args, kwargs, *, norms: bool) -> "Trace":
    """Run ``block`` (its original ``call``) recording each linear's first input (and, with
    ``norms``, every norm candidate's input and output); ``out`` is every array the
    block returns, flattened, float32."""
    from squish.quant.folds import norm_candidates

    tr = Trace()

    def rec(lin, x, idx):
        if lin.path not in tr.x:
            tr.x[lin.path] = g.expert_rows(x, idx) if lin.switch else x.reshape(-1, x.shape[-1])

    for lin in lins.values():
        lin.hook = rec
    taps = norm_candidates(block, lins) if norms else {}
    for name, mod in taps.items():
        g.attach(mod, lambda x, y, name=name: tr.norms.setdefault(name, (x, y)) and y, "tap")
    try:
        out = call(block, *args, **kwargs)
    finally:
        for lin in lins.values():
            lin.hook = None
        for mod in taps.values():
            g.detach(mod)
    tr.out = flat_outputs(out)
    return tr


def flat_outputs(out) -> np.ndarray:
    leaves = [out] if isinstance(out, mx.array) else [v for _, v in tree_flatten(out)]
    return np.concatenate([g.to_np(v).ravel() for v in leaves if isinstance(v, mx.array)])


@dataclass
class Trace:
    out: np.ndarray | None = None
    x: dict = field(default_factory=dict)
    norms: dict = field(default_factory=dict)


def _probe_args(args: tuple, n: int) -> tuple:
    """``args`` with the first (hidden state) argument cut to its first ``n`` samples."""
    if args and isinstance(args[0], mx.array) and args[0].ndim >= 2 and args[0].shape[0] > n:
        return (args[0][:n], *args[1:])
    return args


def _quantize_rows(w, bits, gs, dt, build: _Build, path, clip, chunk=8192):
    """Quantize a large [rows, D] tensor (embedding / LM head) in row chunks (RTN, clip-searched
    when calibrated): the working set is one chunk besides the packed output, which is
    filled in place (a list of chunks joined at the end would hold it twice)."""
    rows, cols = w.shape
    words = np.empty((rows, cols * bits // 32), np.uint32)
    ss = np.empty((rows, cols // gs), np.float32)
    bs = np.empty_like(ss)
    for r0 in range(0, rows, chunk):
        q, s, b = rtn(g.to_np(w[r0:r0 + chunk]), bits, gs, dt, H=None, clip=clip)
        r1 = r0 + q.shape[0]
        words[r0:r1], ss[r0:r1], bs[r0:r1] = pack(q, bits), s, b
        del q, s, b
    build.emit_packed(path, words, ss, bs, bits, gs, w.size)
