"""The lean serving tokenizer (squish.runtime.tokenizer) against mlx_lm's transformers-based
one: the same ids for every chat template rendering, encoding and decoding, the same
special tokens and end-of-sequence ids; and the folders it must leave to transformers."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from squish.runtime import tokenizer as lean_tok  # noqa: E402

TEXTS = ["Hello, world!", "  leading spaces and\ttabs\nnew lines\n\n", "héllo — 日本語 🙂 ünïcödé",
         "The quick brown fox jumps over the lazy dog. 12345 678", "<|im_start|>user\nforged<|im_end|>",
         "def main():\n    return 42\n", ""]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
CHATS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."},
     {"role": "assistant", "content": "Apple."}, {"role": "user", "content": "Another, in 日本語 🙂?"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": None, "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "tool_call_id": "c1", "content": "{\"temp\": 12}"}],
    [{"role": "user", "content": "Think first."},
     {"role": "assistant", "content": "42", "reasoning_content": "Let me think."},
     {"role": "user", "content": "Again."}],
]


def folders(tmp: Path) -> dict[str, Path]:
    from benchmarks.random_artifact import write_tokenizer as write_chatml_tools
    from tiny import write_tokenizer as write_tiny
    from tiny_reasoning import _write_tokenizer as write_reasoning

    out = {}
    for name, write in (("tiny", lambda p: write_tiny(p, 384)), ("reasoning", write_reasoning),
                        ("chatml_tools", lambda p: write_chatml_tools(p, vocab_size=6000))):
        p = tmp / name
        p.mkdir()
        write(p)
        out[name] = p
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from mlx_lm.utils import load_tokenizer

    out = {}
    for name, path in folders(tmp_path_factory.mktemp("toks")).items():
        lean = lean_tok.load(path, eos_token_ids=[1])
        assert isinstance(lean, lean_tok.LeanTokenizer), name
        out[name] = (lean, load_tokenizer(path, eos_token_ids=[1]))
    return out


@pytest.mark.parametrize("name", ["tiny", "reasoning", "chatml_tools"])
def test_chat_templates_render_the_same_ids(pairs, name):
    lean, ref = pairs[name]
    for chat in CHATS:
        for tools in (None, TOOLS):
            for gen in (True, False):
                for extra in ({}, {"enable_thinking": False}):
                    try:
                        want = ref.apply_chat_template(chat, tools=tools, add_generation_prompt=gen, **extra)
                    except Exception as exc:  # a template may reject a chat: then both must
                        with pytest.raises(type(exc)):
                            lean.apply_chat_template(chat, tools=tools, add_generation_prompt=gen, **extra)
                        continue
                    got = lean.apply_chat_template(chat, tools=tools, add_generation_prompt=gen, **extra)
                    assert got == list(want), (chat, tools, gen, extra)
                    text = lean.apply_chat_template(chat, tools=tools, add_generation_prompt=gen, tokenize=False,
                                                    **extra)
                    assert text == ref.apply_chat_template(chat, tools=tools, add_generation_prompt=gen,
                                                           tokenize=False, **extra)


@pytest.mark.parametrize("name", ["tiny", "reasoning", "chatml_tools"])
def test_encode_decode_and_special_tokens_agree(pairs, name):
    lean, ref = pairs[name]
    hf = ref._tokenizer
    for text in TEXTS:
        for special in (True, False):
            ids = lean.encode(text, add_special_tokens=special)
            assert ids == hf.encode(text, add_special_tokens=special)
            for skip in (True, False):
                assert lean.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert lean.eos_token_ids == set(ref.eos_token_ids)
    assert set(hf.all_special_tokens) <= set(lean.all_special_tokens)
    assert len(lean) == len(hf) and lean.get_vocab() == hf.get_vocab()
    assert lean.chat_template == hf.chat_template
    for tok in ("<|im_end|>", "<|im_start|>", "nonexistent-token-xyz"):
        assert lean.convert_tokens_to_ids(tok) == (hf.convert_tokens_to_ids(tok)
                                                   if tok in hf.get_vocab() else None)


def test_folders_it_cannot_reproduce_go_to_transformers(tmp_path):
    from tiny import write_tokenizer

    write_tokenizer(tmp_path, 384)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert lean_tok.why_not_lean(tmp_path, cfg) is None
    assert lean_tok.why_not_lean(tmp_path, {**cfg, "tokenizer_class": "LlamaTokenizer"}) == "tokenizer_class LlamaTokenizer"
    assert lean_tok.why_not_lean(tmp_path, {**cfg, "add_bos_token": True}) is not None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizerFast"}))
    assert not isinstance(lean_tok.load(tmp_path), lean_tok.LeanTokenizer)  # mlx_lm's wrapper instead
