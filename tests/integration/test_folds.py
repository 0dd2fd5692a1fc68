"""AWQ fold points are found by running each family's own mlx_lm block, and every fold
found is exact; modules no fold reaches are named. Tiny random models, in memory."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny import tiny_config  # noqa: E402

from squish.quant import graph as g  # noqa: E402
from squish.quant.awq import apply_fold  # noqa: E402
from squish.quant.blockwise import trace_block  # noqa: E402
from squish.quant.folds import column_map, discover, probe_factors  # noqa: E402


def _block0(arch: str, seed: int = 0):
    """Block 0 of a random tiny model with its real call arguments (from the model's own
    forward pass) and numpy executors for its linears."""
    import mlx.core as mx

    mx.random.seed(seed)
    model = g.build_model(tiny_config(arch))
    mx.eval(model.parameters())
    gr = g.Graph(model)
    seen = {}

    def on_block(i, block, call, args, kwargs):
        seen.update(call=call, args=args, kwargs=kwargs)
        raise g.Stop()

    gr.hook_blocks(on_block)
    tokens = np.random.default_rng(seed).integers(0, 384, (2, 24))
    try:
        model(mx.array(tokens))
    except g.Stop:
        pass
    gr.unhook_blocks()
    lins = {}
    for p, m in gr.linears[0].items():
        lin = g.Lin(p, m, g.kind(m) == "switch")
        lin.w, lin.b = g.dense_weight(m)
        g.attach(m, lin, "switch" if lin.switch else "linear")
        lins[p] = lin
    block = gr.blocks[0]

    def run():
        return trace_block(block, lins, seen["call"], seen["args"], seen["kwargs"], norms=True)

    return block, lins, run


def _folds(plan):
    return {(f.producer, f.consumers, f.style) for f in plan.folds}


def test_llama_block_folds_and_gqa_index():
    block, lins, run = _block0("llama")
    plan = discover(block, lins, run)
    got = {(f.producer, f.consumers) for f in plan.folds}
    assert got == {
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("mlp.up_proj", ("mlp.down_proj",)),
    }
    vo = next(f for f in plan.folds if f.producer == "self_attn.v_proj")
    hd, rep = 32, 2  # 4 query heads share 2 kv heads of 32
    c = np.arange(128)
    assert np.array_equal(vo.index, (c // hd // rep) * hd + c % hd)
    assert plan.unscaled == {}


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "starcoder2", "phi3", "qwen3_moe"])
def test_every_fold_found_is_exact_with_other_factors(arch):
    block, lins, run = _block0(arch)
    plan = discover(block, lins, run)
    assert plan.folds
    ref = run().out
    rng = np.random.default_rng(7)
    undo = []
    for f in plan.folds:
        shape = lins[f.producer].w.shape[:-1] if f.style in ("linear", "experts") else \
            (lins[f.consumers[0]].w.shape[-1],)
        undo.append(apply_fold(f, rng.uniform(0.2, 5.0, shape).astype(np.float32), block, lins))
    out = run().out
    assert any(not np.array_equal(a, b) for a, b in [(ref, out)])  # weights did change ...
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())  # ... the function did not
    for u in reversed(undo):
        u()
    np.testing.assert_array_equal(run().out, ref)


def test_gemma_norms_fold_as_one_plus_weight():
    block, lins, run = _block0("gemma3_text")
    styles = {f.producer: f.style for f in discover(block, lins, run).folds}
    assert styles["input_layernorm"] == "norm1p"
    assert styles["pre_feedforward_layernorm"] == "norm1p"


def test_unfoldable_modules_are_named_with_a_reason():
    # starcoder2: c_proj reads GELU(c_fc(x)), which no per-channel factor passes through
    block, lins, run = _block0("starcoder2")
    plan = discover(block, lins, run)
    assert "mlp.c_proj" in plan.unscaled and "not a per-channel linear" in plan.unscaled["mlp.c_proj"]
    assert ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "norm") in _folds(plan)


def test_moe_norm_fold_reaches_router_and_experts():
    block, lins, run = _block0("qwen3_moe")
    plan = discover(block, lins, run)
    norm = next(f for f in plan.folds if f.producer == "post_attention_layernorm")
    assert set(norm.consumers) == {"mlp.gate", "mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj"}
    assert ("mlp.switch_mlp.up_proj", ("mlp.switch_mlp.down_proj",), "experts") in _folds(plan)


def test_column_map_reads_the_channel_each_column_took():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 6)).astype(np.float32)
    idx = np.array([0, 1, 2, 0, 1, 2, 3, 4, 5, 3, 4, 5])  # GQA-like repeat
    s = probe_factors(6, 0)
    assert np.array_equal(column_map(v[:, idx], (v / s)[:, idx], s), idx)
    assert column_map(np.tanh(v), np.tanh(v / s), s) is None  # not linear: no map
