"""Whole-model forward passes through the model's own mlx_lm graph, numpy products.

A :class:`Runner` makes an mlx_lm model callable as usual (``runner.model(tokens)``,
``mlx_lm``'s generation loops, caches and samplers all work) while its weights come
from a loader, one decoder block at a time:

- :class:`RefLoader`: the float reference (a lazy tensor dict in mlx_lm naming);
- no loader: a loaded (quantized) mlx_lm model's own modules, dequantized per
  block with ``mx.dequantize``, the arithmetic of the quantized kernels.

A model whose block weights fit ``graph.RESIDENT_BYTES`` in float32 keeps them
between passes; a larger one loads each block when the model's loop reaches it
and drops it after (peak: one block in float32, plus the embedding as stored).
"""

from __future__ import annotations

import numpy as np

from squish.errors import InputError
from squish.quant import graph as g


class RefLoader:
    """Float32 block weights from a Reference's lazy tensors."""

    def __init__(self, ref, gr: g.Graph):
        self.ref, self.gr = ref, gr
        self._T: dict | None = None

    def check(self, T: dict) -> None:
        from mlx.utils import tree_flatten

        need = {k for k, _ in tree_flatten(self.gr.model.parameters())}
        missing = sorted(need - set(T))
        if missing:
            mt = self.ref.config.get("model_type")
            raise InputError(
                f"{self.ref.name}: the weights lack {len(missing)} tensor(s) that mlx_lm's {mt!r} model "
                f"needs, e.g. {missing[:3]}; is config.json the model's own?"
            )

    def top(self, T: dict) -> None:
        """Non-block parameters into the model; embedding / head matrices as stored."""
        from mlx.utils import tree_unflatten

        top = self.gr.top_modules()
        vocab = {p: g.Vocab(T[p + ".weight"]) for p, m in top.items()}
        skip = {p + ".weight" for p in top}
        rest = [(k, v) for k, v in T.items() if self.gr.block_of(k) is None and k not in skip]
        self.gr.model.update(tree_unflatten(g.float32(rest)))
        return vocab

    def open(self) -> dict:
        T = self.ref.tensors()
        model = self.gr.model
        if hasattr(model, "sanitize"):
            # As mlx_lm.load does on every load (idempotent on mlx_lm-named weights): a class
            # may shape itself from the weights here, e.g. gemma3_text drops its lm_head and
            # ties it to the embedding when the weights have none.
            T = model.sanitize(T)
        self.check(T)
        return T

    def block(self, T: dict, i: int, *, take: bool = True) -> dict[str, np.ndarray]:
        """Block ``i``'s tensors as float32 numpy, keys relative to the block (taken from ``T``)."""
        pre = self.gr.prefixes[i]
        out = {}
        for k in [k for k in T if k.startswith(pre)]:
            out[k[len(pre):]] = g.to_np(T.pop(k) if take else T[k])
        return out


def install_block(gr: g.Graph, i: int, W: dict[str, np.ndarray], lins: dict[str, g.Lin]) -> None:
    """Block ``i`` computes with the float32 weights ``W`` (relative keys): linear weights to
    the executors, everything else into the module."""
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    rest = []
    for k, v in W.items():
        path, _, leaf = k.rpartition(".")
        if path in lins and leaf in ("weight", "bias"):
            setattr(lins[path], "w" if leaf == "weight" else "b", v)
        else:
            rest.append((k, mx.array(v)))
    if rest:
        gr.blocks[i].update(tree_unflatten(rest))


class Runner:
    """``runner.model`` is the mlx_lm model computing with numpy products (see module docstring).

    Use as a context manager; leaving it restores the model's classes."""

    def __init__(self, gr: g.Graph, ref=None, *, resident: bool | None = None, generation: bool = False):
        """Weights from ``ref`` (a Reference), or else the model's own (quantized) modules.

        ``generation``: the caller is a generation loop (mlx_lm's ``generate_step`` /
        ``BatchGenerator``), which reads only the last position's logits of a call; the LM
        head then computes that position alone (``graph.Vocab.last_only``). Without it a
        batched prefill would form [batch, prompt, vocab] float32 logits eagerly and drop them
        (SmolLM2's calibration prefill: ~0.4 GB)."""
        self.gr = gr
        self.generation = generation
        self.source = RefLoader(ref, gr) if ref is not None else None
        self.model = gr.model
        self.lins = [{p: g.Lin(p, m, g.kind(m) == "switch") for p, m in lin.items()} for lin in gr.linears]
        if resident is None:
            resident = self._float_bytes() <= g.RESIDENT_BYTES
        self.resident = resident
        self._loaded: set[int] = set()
        self._T: dict | None = None

    def _float_bytes(self) -> int:
        n = 0
        for lin in self.gr.linears:
            for m in lin.values():
                w = m["weight"]
                n += w.size * (32 // m.bits if "scales" in m else 1)
        return 4 * n

    def __enter__(self) -> "Runner":
        self._attn = g.numpy_attention().__enter__()
        for i, lins in enumerate(self.lins):
            for p, lin in lins.items():
                g.attach(lin.module, lin, "switch" if lin.switch else "linear")
        if self.source is not None:
            self._T = self.source.open()
            vocab = self.source.top(self._T)
        else:
            vocab = {p: g.Vocab.of(m) for p, m in self.gr.top_modules().items()}
        for p, m in self.gr.top_modules().items():
            vocab[p].last_only = self.generation
            if self.resident:
                vocab[p].keep_dense()
            g.attach(m, vocab[p], "embedding" if g.kind(m) == "embedding" else "head")
        self.gr.hook_blocks(self._call_block)
        return self

    def __exit__(self, *exc) -> None:
        import mlx.core as mx

        self._attn.__exit__()
        self.gr.detach_all()
        self._T = None
        for lins in self.lins:
            for lin in lins.values():
                lin.w = lin.b = None
        mx.clear_cache()

    def _load(self, i: int) -> None:
        if self.source is not None:
            if self._T is None or not any(k.startswith(self.gr.prefixes[i]) for k in self._T):
                self._T = self.source.ref.tensors()  # a new pass over a streamed source
            install_block(self.gr, i, self.source.block(self._T, i), self.lins[i])
            import mlx.core as mx

            mx.clear_cache()  # the block's source arrays, freed once converted
        else:
            for lin in self.lins[i].values():
                lin.w, lin.b = g.dense_weight(lin.module)

    def _call_block(self, i, block, call, args, kwargs):
        if i not in self._loaded:
            self._load(i)
            self._loaded.add(i)
        try:
            return call(block, *args, **kwargs)
        finally:
            if not self.resident:
                for lin in self.lins[i].values():
                    lin.w = lin.b = None
                self._loaded.discard(i)
