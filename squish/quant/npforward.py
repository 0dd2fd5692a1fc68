"""A numpy forward pass for llama-family decoder blocks (offline use only).

Why not MLX: on the CPU backend MLX's float32 GEMM runs at ~6 GFLOP/s on this
machine while numpy's BLAS reaches ~200 GFLOP/s (benchmarked in DESIGN §5 spirit:
a 2048^3 matmul). Calibration, layer-by-layer quantization and the quality gate
are GEMM-bound, so they run here. Correctness is anchored to mlx_lm: RoPE tables
are extracted from mlx_lm's own RoPE module for the config, and
``check_against_mlx`` compares a block's output with the mlx_lm module on the same
input (the quantizer calls it before the first layer, tests call it too).

Supported: ``llama``, ``mistral``, ``qwen2`` (q/k/v biases), ``qwen3`` (q/k
RMSNorm). Weight dicts use names relative to the block
(``self_attn.q_proj.weight``, ``mlp.down_proj.weight``, ``input_layernorm.weight`` ...),
numpy float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from squish.errors import InputError

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)


@dataclass
class Arch:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv: int
    head_dim: int
    eps: float
    qk_norm: bool
    tied: bool
    vocab: int
    rope_diag: np.ndarray  # [max_pos, head_dim]
    rope_off: np.ndarray   # [max_pos, head_dim]
    rope_partner: np.ndarray  # [head_dim] index of the rotation partner

    @property
    def rep(self) -> int:
        return self.n_heads // self.n_kv


def model_classes(config: dict):
    from mlx_lm.utils import _get_classes

    return _get_classes(config)


def make_arch(config: dict, max_pos: int = 4096) -> Arch:
    mt = config.get("model_type")
    if mt not in SUPPORTED:
        raise InputError(
            f"calibrated quantization supports model_type {', '.join(SUPPORTED)}; got {mt!r}"
        )
    _, args_cls = model_classes(config)
    args = args_cls.from_dict(config)
    n_heads = args.num_attention_heads
    n_kv = args.num_key_value_heads or n_heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // n_heads
    diag, off, partner = _rope_tables(config, args, head_dim, max_pos)
    return Arch(
        n_layers=args.num_hidden_layers, hidden=args.hidden_size, n_heads=n_heads, n_kv=n_kv,
        head_dim=head_dim, eps=args.rms_norm_eps, qk_norm=(mt == "qwen3"),
        tied=bool(getattr(args, "tie_word_embeddings", False)), vocab=args.vocab_size,
        rope_diag=diag, rope_off=off, rope_partner=partner,
    )


def _rope_tables(config, args, head_dim, max_pos):
    """RoPE at position p is a rotation of coordinate pairs; recover it from mlx_lm.

    Applying the module to identity vectors gives the matrix R_p; we keep its
    diagonal and the entry coupling each coordinate with its partner, and check
    that nothing else is non-zero (i.e. the module is a pairwise rotation).
    """
    import mlx.core as mx
    from mlx_lm.models.rope_utils import initialize_rope

    rope = initialize_rope(
        head_dim, args.rope_theta, getattr(args, "rope_traditional", False),
        getattr(args, "rope_scaling", None), getattr(args, "max_position_embeddings", None),
    )
    eye = mx.broadcast_to(mx.eye(head_dim)[:, None, :], (head_dim, max_pos, head_dim))
    out = np.array(rope(eye[None]).astype(mx.float32))[0]  # [i, p, j] = R_p[j, i]
    R = out.transpose(1, 2, 0)  # [p, j, i]
    half = head_dim // 2
    if getattr(args, "rope_traditional", False):
        partner = np.arange(head_dim) ^ 1
    else:
        partner = np.concatenate([np.arange(half, head_dim), np.arange(half)])
    idx = np.arange(head_dim)
    diag = R[:, idx, idx].copy()
    off = R[:, idx, partner].copy()
    recon = np.zeros_like(R[:8])
    recon[:, idx, idx] = diag[:8]
    recon[:, idx, partner] = off[:8]
    if np.abs(recon - R[:8]).max() > 1e-5:
        raise InputError(f"RoPE variant of {config.get('model_type')} is not a pairwise rotation")
    return diag.astype(np.float32), off.astype(np.float32), partner


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return (x * r) * w


def linear(x: np.ndarray, W: dict, name: str) -> np.ndarray:
    y = x @ W[name + ".weight"].T
    b = W.get(name + ".bias")
    return y + b if b is not None else y


def apply_rope(x: np.ndarray, arch: Arch, pos: np.ndarray) -> np.ndarray:
    """x [B, H, L, D]; pos [B, L] absolute positions."""
    d = arch.rope_diag[pos][:, None]
    o = arch.rope_off[pos][:, None]
    return x * d + x[..., arch.rope_partner] * o


def softmax(x: np.ndarray, axis=-1) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    np.exp(x, out=x)
    x /= x.sum(axis=axis, keepdims=True)
    return x


def attention_ctx(xn: np.ndarray, W: dict, arch: Arch) -> np.ndarray:
    """Attention context (the o_proj input) for full causal sequences xn [B, L, D]."""
    B, L, _ = xn.shape
    hd = arch.head_dim
    q = linear(xn, W, "self_attn.q_proj").reshape(B, L, arch.n_heads, hd).transpose(0, 2, 1, 3)
    k = linear(xn, W, "self_attn.k_proj").reshape(B, L, arch.n_kv, hd).transpose(0, 2, 1, 3)
    v = linear(xn, W, "self_attn.v_proj").reshape(B, L, arch.n_kv, hd).transpose(0, 2, 1, 3)
    if arch.qk_norm:
        q = rmsnorm(q, W["self_attn.q_norm.weight"], arch.eps)
        k = rmsnorm(k, W["self_attn.k_norm.weight"], arch.eps)
    pos = np.broadcast_to(np.arange(L), (B, L))
    q = apply_rope(q, arch, pos)
    k = apply_rope(k, arch, pos)
    if arch.rep > 1:  # contiguous copies keep numpy's batched matmul on the BLAS path
        k = np.repeat(k, arch.rep, axis=1)
        v = np.repeat(v, arch.rep, axis=1)
    s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(hd ** -0.5)
    s += np.triu(np.full((L, L), -np.inf, dtype=np.float32), 1)
    ctx = softmax(s) @ v
    return ctx.transpose(0, 2, 1, 3).reshape(B, L, arch.n_heads * hd)


def mlp_act(xn: np.ndarray, W: dict) -> np.ndarray:
    g = linear(xn, W, "mlp.gate_proj")
    u = linear(xn, W, "mlp.up_proj")
    return (g / (1.0 + np.exp(-g))) * u


def block(x: np.ndarray, W: dict, arch: Arch, capture: dict | None = None) -> np.ndarray:
    """One decoder block on full sequences. ``capture`` receives each linear's input."""
    xn1 = rmsnorm(x, W["input_layernorm.weight"], arch.eps)
    ctx = attention_ctx(xn1, W, arch)
    h = x + linear(ctx, W, "self_attn.o_proj")
    xn2 = rmsnorm(h, W["post_attention_layernorm.weight"], arch.eps)
    act = mlp_act(xn2, W)
    if capture is not None:
        capture.update(attn_in=xn1, o_in=ctx, mlp_in=xn2, down_in=act)
    return h + linear(act, W, "mlp.down_proj")


def layer_weights(tensors: dict, i: int, *, take: bool = False) -> dict[str, np.ndarray]:
    """Materialise layer ``i`` of a lazy mlx tensor dict as float32 numpy.

    With ``take``, the layer's entries are removed from ``tensors``: an evaluated
    mx.array keeps its data for as long as the dict references it, so a
    layer-by-layer consumer that does not take would end up holding every
    layer in the source dtype (measured: the whole model, on the 1.5B shape)."""
    import mlx.core as mx

    pre = f"model.layers.{i}."
    out = {}
    for k in [k for k in tensors if k.startswith(pre)]:
        v = tensors.pop(k) if take else tensors[k]
        out[k[len(pre):]] = np.array(v.astype(mx.float32))
    return out


def check_against_mlx(config: dict, W: dict, arch: Arch, x: np.ndarray, tol: float = 2e-3) -> float:
    """Compare :func:`block` with mlx_lm's own block on ``x``; raise if they differ.

    Returns the max abs difference relative to the output's max magnitude.
    """
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    model_cls, args_cls = model_classes(config)
    args = args_cls.from_dict(config)
    module = __import__(model_cls.__module__, fromlist=["TransformerBlock"])
    blk = module.TransformerBlock(args)
    blk.update(tree_unflatten([(k, mx.array(v)) for k, v in W.items()]))
    ref = np.array(blk(mx.array(x), mask="causal", cache=None))
    mine = block(x, W, arch)
    err = float(np.abs(ref - mine).max() / max(np.abs(ref).max(), 1e-6))
    if err > tol:
        raise InputError(
            f"numpy forward disagrees with mlx_lm for {config.get('model_type')} "
            f"(relative error {err:.2e}); this architecture variant is not supported"
        )
    return err


# ---------------------------------------------------------------- full model


class StreamedLayers:
    """The float32 block weights of a lazy tensor source, one full pass at a time.

    Each pass (``iter``) opens a fresh lazy dict with ``open_tensors()`` and takes
    (drops) every layer once converted, so a whole-model numpy pass holds one layer
    in float32, and nothing in the source dtype, at any time. Costs one conversion
    of the model per pass."""

    def __init__(self, open_tensors, n_layers: int):
        self.open_tensors, self.n = open_tensors, n_layers

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        T = self.open_tensors()
        for i in range(self.n):
            yield layer_weights(T, i, take=True)


class VocabRows:
    """A [vocab, D] matrix (embedding, LM head) kept as stored, read in float32 by pieces.

    A 152k-token vocabulary at D=1536 is 890 MB in float32, five decoder layers'
    worth; this keeps only the stored array (bf16, float16, or MLX-quantized with
    ``scales``/``biases``) and converts what each use needs: ``rows[ids]`` gathers
    rows, ``project(x)`` computes ``x @ W.T`` over ``CHUNK`` rows at a time. Float32
    out, float32 accumulation (numpy BLAS)."""

    CHUNK = 8192

    def __init__(self, weight, scales=None, biases=None, *, group_size: int = 64, bits: int = 4,
                 mode: str = "affine"):
        self.weight, self.scales, self.biases = weight, scales, biases
        self._q = dict(group_size=group_size, bits=bits, mode=mode)
        dim = weight.shape[1] * 32 // bits if scales is not None else weight.shape[1]
        self.shape = (weight.shape[0], dim)

    @classmethod
    def of(cls, module) -> "VocabRows":
        """From an ``nn.Embedding`` / ``nn.Linear`` or their quantized forms."""
        if "scales" in module:
            return cls(module.weight, module.scales, module.get("biases"), group_size=module.group_size,
                       bits=module.bits, mode=getattr(module, "mode", "affine"))
        return cls(module.weight)

    def _f32(self, pick) -> np.ndarray:
        import mlx.core as mx

        w = pick(self.weight)
        if self.scales is not None:
            b = pick(self.biases) if self.biases is not None else None
            w = mx.dequantize(w, pick(self.scales), b, **self._q)
        return np.array(w.astype(mx.float32))

    def rows(self, start: int, stop: int) -> np.ndarray:
        return self._f32(lambda a: a[start:stop])

    def __getitem__(self, ids) -> np.ndarray:
        import mlx.core as mx

        ids = np.asarray(ids)
        flat = mx.array(ids.reshape(-1).astype(np.int32))
        return self._f32(lambda a: mx.take(a, flat, axis=0)).reshape(*ids.shape, self.shape[1])

    def project(self, x: np.ndarray) -> np.ndarray:
        """``x [..., D] @ W.T`` -> float32 ``[..., vocab]``."""
        out = np.empty((*x.shape[:-1], self.shape[0]), np.float32)
        for a in range(0, self.shape[0], self.CHUNK):
            b = min(a + self.CHUNK, self.shape[0])
            out[..., a:b] = x @ self.rows(a, b).T
        return out

    def dense(self) -> np.ndarray:
        """The whole matrix in float32 (tests; defeats the purpose elsewhere)."""
        return self.rows(0, self.shape[0])


def project(x: np.ndarray, head) -> np.ndarray:
    """Logits ``x @ head.T`` for a numpy head or a :class:`VocabRows`."""
    return head.project(x) if isinstance(head, VocabRows) else x @ head.T


class NumpyLM:
    """Whole-model numpy forward from per-layer weight dicts (for generation/eval).

    ``layers`` is an iterable of block weight dicts with a length, walked once per
    forward pass (a list, or a :class:`StreamedLayers`); ``embed`` [vocab, D];
    ``norm`` [D]; ``head`` [vocab, D] (the embedding when tied). ``embed`` and
    ``head`` are numpy arrays or :class:`VocabRows`.
    """

    def __init__(self, arch: Arch, layers, embed, norm, head):
        self.arch, self.layers, self.embed, self.norm, self.head = arch, layers, embed, norm, head

    def logits(self, tokens: np.ndarray) -> np.ndarray:
        x = self.embed[tokens]
        for W in self.layers:
            x = block(x, W, self.arch)
        return project(rmsnorm(x, self.norm, self.arch.eps), self.head)

    def generate(self, prompts: list[list[int]], n_new: int, rng: np.random.Generator,
                 temperature: float, top_p: float, banned: list[int]) -> list[list[int]]:
        """Batched sampling with a per-sample KV cache (prompts may differ in length)."""
        a = self.arch
        B = len(prompts)
        lens = np.array([len(p) for p in prompts])
        T = lens.max() + n_new
        K = [np.zeros((B, a.n_kv, T, a.head_dim), np.float32) for _ in range(len(self.layers))]
        V = [np.zeros((B, a.n_kv, T, a.head_dim), np.float32) for _ in range(len(self.layers))]
        last = np.zeros((B, a.hidden), np.float32)
        xs = [self.embed[np.array(p)][None] for p in prompts]
        for li, W in enumerate(self.layers):  # one pass; prompts one by one (short, unequal)
            for b in range(B):
                xs[b] = self._step_block(xs[b], W, K[li][b:b + 1], V[li][b:b + 1], np.array([0]))
        for b in range(B):
            last[b] = xs[b][0, -1]
        del xs
        out = [list(p) for p in prompts]
        pos = lens.copy()
        for _ in range(n_new):
            lg = project(rmsnorm(last, self.norm, a.eps), self.head)
            lg[:, banned] = -np.inf
            tok = _sample(lg, rng, temperature, top_p)
            x = self.embed[tok][:, None]
            for li, W in enumerate(self.layers):
                x = self._step_block(x, W, K[li], V[li], pos)
            last = x[:, -1]
            for b in range(B):
                out[b].append(int(tok[b]))
            pos += 1
        return out

    def _step_block(self, x, W, Kc, Vc, start):
        """Block on x [B, L, D] whose first token sits at position start[b]; updates caches."""
        a = self.arch
        B, L, _ = x.shape
        hd = a.head_dim
        xn = rmsnorm(x, W["input_layernorm.weight"], a.eps)
        q = linear(xn, W, "self_attn.q_proj").reshape(B, L, a.n_heads, hd).transpose(0, 2, 1, 3)
        k = linear(xn, W, "self_attn.k_proj").reshape(B, L, a.n_kv, hd).transpose(0, 2, 1, 3)
        v = linear(xn, W, "self_attn.v_proj").reshape(B, L, a.n_kv, hd).transpose(0, 2, 1, 3)
        if a.qk_norm:
            q = rmsnorm(q, W["self_attn.q_norm.weight"], a.eps)
            k = rmsnorm(k, W["self_attn.k_norm.weight"], a.eps)
        pos = start[:, None] + np.arange(L)[None]
        q = apply_rope(q, a, pos)
        k = apply_rope(k, a, pos)
        for b in range(B):
            Kc[b, :, start[b]:start[b] + L] = k[b]
            Vc[b, :, start[b]:start[b] + L] = v[b]
        end = int(start.max()) + L
        kk, vv = Kc[:, :, :end], Vc[:, :, :end]
        qq = q.reshape(B, a.n_kv, a.rep, L, hd)
        s = (qq @ kk[:, :, None].transpose(0, 1, 2, 4, 3)) * (hd ** -0.5)
        kpos = np.arange(end)
        mask = kpos[None, None, :] > pos[:, :, None]  # [B, L, end]
        s = np.where(mask[:, None, None], -np.inf, s)
        ctx = (softmax(s) @ vv[:, :, None]).reshape(B, a.n_heads, L, hd)
        ctx = ctx.transpose(0, 2, 1, 3).reshape(B, L, -1)
        h = x + linear(ctx, W, "self_attn.o_proj")
        xn2 = rmsnorm(h, W["post_attention_layernorm.weight"], a.eps)
        return h + linear(mlp_act(xn2, W), W, "mlp.down_proj")


def _sample(logits, rng, temperature, top_p, top_k: int = 64):
    """Temperature + nucleus sampling, the nucleus taken among the ``top_k`` best tokens."""
    lg = logits / max(temperature, 1e-6)
    k = min(top_k, lg.shape[1])
    cand = np.argpartition(-lg, k - 1, axis=-1)[:, :k]
    cl = np.take_along_axis(lg, cand, -1).astype(np.float64)
    order = np.argsort(-cl, axis=-1)
    cand = np.take_along_axis(cand, order, -1)
    ps = softmax(np.take_along_axis(cl, order, -1))
    keep = np.cumsum(ps, -1) - ps < top_p
    ps = np.where(keep, ps, 0)
    ps /= ps.sum(-1, keepdims=True)
    u = rng.random((ps.shape[0], 1))
    idx = np.minimum((np.cumsum(ps, -1) < u).sum(-1), k - 1)
    return cand[np.arange(ps.shape[0]), idx]
