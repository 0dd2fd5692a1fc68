"""Tokenizer rebuilt from GGUF metadata, on tiny vocabularies of both kinds:
byte-level BPE and SentencePiece (scores, byte fallback, space prefix)."""

from __future__ import annotations

import json

import pytest

from squish.quant.gguf_tokenizer import (
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    build_tokenizer,
    write_tokenizer,
)
from squish.errors import InputError


def byte_alphabet() -> list[str]:
    """GPT-2's byte -> printable-character table, in byte order."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def meta(pre="smollm", **over):
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_alphabet() + [
        "Ġt", "he", "Ġthe", "12", "<think>"]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    m = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
         "tokenizer.ggml.merges": ["Ġ t", "h e", "Ġt he", "1 2"], "tokenizer.ggml.token_type": types,
         "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
         "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.unknown_token_id": 0}
    m.update(over)
    return m


TEXTS = ["Hello world.", "12345", "def f(x):\n    return x  # two  spaces\n\n\tdone",
         "emoji 🤖🎉 and CJK 你好，世界", "accents: café naïve Ærø", "  lead and trail  ", "a\r\nb"]


@pytest.mark.parametrize("pre", ["smollm", "gpt-2", "llama-bpe", "qwen2"])
def test_round_trip_and_merges(pre):
    tok = build_tokenizer(meta(pre))
    for text in TEXTS:
        assert tok.decode(tok.encode(text).ids) == text, (pre, text)
    assert tok.encode(" the").tokens == ["Ġthe"]


def test_smollm_splits_digits_one_by_one():
    tok = build_tokenizer(meta("smollm"))
    assert tok.encode("12345").tokens == ["1", "2", "3", "4", "5"]
    # llama3 groups digits by three, so the "1 2" merge applies there.
    assert build_tokenizer(meta("llama-bpe")).encode("12345").tokens == ["12", "3", "4", "5"]


def test_special_and_user_defined_tokens_stay_whole():
    tok = build_tokenizer(meta())
    enc = tok.encode("<|im_start|>user\nhi<|im_end|><think>")
    assert enc.ids[0] == 1 and enc.ids[-2] == 2 and enc.tokens[-1] == "<think>"
    assert tok.decode(enc.ids, skip_special_tokens=True) == "user\nhi<think>"


def test_qwen2_normalizes_to_nfc():
    tok = build_tokenizer(meta("qwen2"))
    assert tok.decode(tok.encode("cafe\u0301").ids) == "caf\u00e9"


def test_split_regexes_match_the_reference_definitions():
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert QWEN2_SPLIT == PRETOKENIZE_REGEX
    # Llama 3 differs from Qwen2 only in grouping up to three digits.
    assert LLAMA3_SPLIT == QWEN2_SPLIT.replace(r"\p{N}|", r"\p{N}{1,3}|", 1)


def test_add_bos_token_prepends_bos():
    tok = build_tokenizer(meta("llama-bpe", **{"tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("hi").ids[0] == 1
    assert build_tokenizer(meta()).encode("hi").ids[0] != 1


@pytest.mark.parametrize("over,match", [
    ({"tokenizer.ggml.model": "t5"}, "tokenizer model 't5'"),
    ({"tokenizer.ggml.model": "llama"}, "one score per token"),
    ({"tokenizer.ggml.pre": "default"}, "pre-tokenizer 'default'.*smollm"),
    ({"tokenizer.ggml.merges": []}, "no merges"),
    ({"tokenizer.ggml.merges": ["a b c"]}, "merge"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "token_type"),
])
def test_refusals(over, match):
    with pytest.raises(InputError, match=match):
        build_tokenizer(meta(**over))


def test_written_files_load_in_transformers(tmp_path):
    from transformers import AutoTokenizer

    m = meta(**{"tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['content'] }}"
                                          "<|im_end|>{% endfor %}"})
    out = write_tokenizer(m, tmp_path / "tok", {"max_position_embeddings": 128})
    special = json.loads((out / "special_tokens_map.json").read_text())
    assert special["bos_token"] == "<|im_start|>" and special["unk_token"] == "<|endoftext|>"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token_id == 2 and tok.pad_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "the"}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tok.decode(ids) == "<|im_start|>the<|im_end|>"


# --- SentencePiece ("llama") vocabularies ------------------------------------------------

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gguf_tiny import spm_vocab  # noqa: E402

from squish.quant.gguf_tokenizer import build_tokenizer_files, spm_merges  # noqa: E402


def test_spm_merges_follow_the_scores_not_the_left_to_right_order():
    # "▁cat": with "at" scored above "▁c", llama.cpp merges a+t first, then ▁+c, then ▁c+at.
    tok = build_tokenizer(spm_vocab())
    assert tok.encode("cat", add_special_tokens=False).tokens == ["▁cat"]
    m = spm_vocab(pieces=("at", "▁c"))  # no "▁cat": stops at the two pieces
    assert build_tokenizer(m).encode("cat", add_special_tokens=False).tokens == ["▁c", "at"]
    m = spm_vocab(pieces=("▁c", "ca", "at"))  # "▁c" best: ▁+c, then a+t; "ca" never forms
    assert build_tokenizer(m).encode("cat", add_special_tokens=False).tokens == ["▁c", "at"]
    m = spm_vocab(pieces=("ca", "▁c", "at"))  # "ca" best: c+a first, leaving ▁ and t
    assert build_tokenizer(m).encode("cat", add_special_tokens=False).tokens == ["▁", "ca", "t"]


def test_spm_merge_list_ranks_by_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = spm_merges(tokens, [1] * 6, [0, 0, 0, -2.0, -1.0, -3.0], vocab)
    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_spm_space_prefix_byte_fallback_and_round_trip():
    tok = build_tokenizer(spm_vocab())
    enc = tok.encode("the cat é!")
    assert enc.tokens[:3] == ["<bos>", "▁the", "▁cat"]
    assert "<0xC3>" in enc.tokens and "<0xA9>" in enc.tokens  # é is not in the vocabulary
    for text in ["the cat é!", "  two  spaces", "line\nbreak", "emoji 🤖"]:
        assert tok.decode(tok.encode(text).ids) == text, text
    no_prefix = build_tokenizer({**spm_vocab(), "tokenizer.ggml.add_space_prefix": False})
    assert no_prefix.encode("the", add_special_tokens=False).tokens == ["t", "he"]
    assert no_prefix.decode(no_prefix.encode(" the cat").ids) == " the cat"


def test_spm_prefix_after_each_special_token_as_llama_cpp_does():
    tok = build_tokenizer(spm_vocab())
    assert tok.encode("<eos>the", add_special_tokens=False).tokens == ["<eos>", "▁the"]


def test_gemma_style_files_get_turn_template_and_end_of_turn(tmp_path):
    from mlx_lm.tokenizer_utils import SPMStreamingDetokenizer, load

    files = build_tokenizer_files({**spm_vocab(gemma=True), "general.architecture": "gemma3"}, {})
    assert files.eos_token_ids == [1, 5] and files.bos_token_id == 2
    assert files.notes and "gemma3 turn format" in files.notes[0]
    tok = load(files.write(tmp_path / "tok"), eos_token_ids=files.eos_token_ids)
    assert isinstance(tok.detokenizer, SPMStreamingDetokenizer)  # mlx_lm recognises the decoder
    text = tok.apply_chat_template([{"role": "system", "content": "Be brief."},
                                    {"role": "user", "content": "hi"},
                                    {"role": "assistant", "content": "hello"},
                                    {"role": "user", "content": "the cat"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"
                    "hello<end_of_turn>\n<start_of_turn>user\nthe cat<end_of_turn>\n<start_of_turn>model\n")
    ids = tok.encode(text, add_special_tokens=False)
    assert ids[:2] == [2, 4] and tok.decode(ids) == text
    assert tok.encode("a  b", add_special_tokens=False)[1] == files.tokenizer.token_to_id("  ")
    # A file with its own template keeps it; other architectures get none.
    own = build_tokenizer_files({**spm_vocab(gemma=True), "general.architecture": "gemma3",
                                 "tokenizer.chat_template": "X"}, {})
    assert own.config["chat_template"] == "X" and not own.notes
    assert "chat_template" not in build_tokenizer_files(spm_vocab(), {}).config
