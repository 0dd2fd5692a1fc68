"""Rebuild a Hugging Face tokenizer (``tokenizer.json`` & co.) from GGUF metadata.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary
(``tokenizer.ggml.tokens``), the BPE merges, per-token types and the special
ids, and names the pre-tokenizer only by a tag (``tokenizer.ggml.pre``). We
rebuild the tokenizer with the ``tokenizers`` library from those pieces.

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are
supported; SentencePiece (``"llama"``) vocabularies are refused. The
pre-tokenizer for each supported tag reproduces llama.cpp's split regexes for
that tag (which in turn reproduce the original ``tokenizer.json``):

- ``smollm`` (also starcoder, refact): digits split one by one, then the GPT-2
  regex — ``Digits(individual_digits)`` + ``ByteLevel(use_regex=True)``.
- ``gpt-2``: the GPT-2 regex alone (llama.cpp's "default" tag uses other
  regexes and is refused).
- ``llama-bpe`` (Llama 3): the Llama 3 regex (numbers in groups of up to 3),
  with ``ignore_merges`` as in the original tokenizer and llama.cpp.
- ``qwen2``: the Qwen2 regex (single digits) and the NFC normalizer of the
  original Qwen2 tokenizer.

Token types: CONTROL (3) and UNKNOWN (2) tokens become special added tokens,
USER_DEFINED (4) tokens plain added tokens (matched whole, as llama.cpp does).
``tokenizer.ggml.scores`` is ignored: byte-level BPE ranks merges by the merge
list, not by scores.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from squish.errors import InputError

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# tag -> (pre-tokenizer recipe, NFC normalizer, ignore_merges)
PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    "smollm": ("digits+gpt2", False, False),
    "starcoder": ("digits+gpt2", False, False),
    "refact": ("digits+gpt2", False, False),
    "gpt-2": ("gpt2", False, False),
    "gpt2": ("gpt2", False, False),
    "llama-bpe": ("llama3", False, True),
    "llama3": ("llama3", False, True),
    "qwen2": ("qwen2", True, False),
}

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 2, 3, 4


def _pre_tokenizer(recipe: str) -> Any:
    from tokenizers import Regex, pre_tokenizers

    if recipe == "digits+gpt2":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if recipe == "gpt2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}[recipe]
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(split), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _meta_list(meta: dict[str, Any], key: str) -> list:
    v = meta.get(key)
    if v is None:
        return []
    return v.tolist() if hasattr(v, "tolist") else list(v)


def _meta_scalar(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    v = meta.get(key, default)
    return v.item() if hasattr(v, "item") else v


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's byte-level BPE tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = _meta_scalar(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise InputError(f"GGUF tokenizer model '{kind}' is not supported "
                         "(only byte-level BPE, tokenizer.ggml.model = 'gpt2')")
    pre = str(_meta_scalar(meta, "tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"GGUF pre-tokenizer '{pre}' is not supported; supported: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))}")
    recipe, nfc, ignore_merges = PRE_TOKENIZERS[pre]
    tokens = [str(t) for t in _meta_list(meta, "tokenizer.ggml.tokens")]
    merges_raw = _meta_list(meta, "tokenizer.ggml.merges")
    if not tokens or not merges_raw:
        raise InputError("GGUF tokenizer has no tokens or no merges (tokenizer.ggml.tokens/merges)")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InputError("GGUF tokenizer vocabulary has duplicate tokens")
    merges = []
    for m in merges_raw:
        pair = str(m).split(" ")
        if len(pair) != 2:
            raise InputError(f"GGUF tokenizer merge {m!r} is not two tokens separated by a space")
        merges.append((pair[0], pair[1]))
    types = _meta_list(meta, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise InputError("GGUF tokenizer.ggml.token_type length differs from the vocabulary size")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges,
                               fuse_unk=False, byte_fallback=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(recipe)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise InputError("GGUF tokenizer: added tokens changed the vocabulary size")
    bos_id = _meta_scalar(meta, "tokenizer.ggml.bos_token_id")
    if bool(_meta_scalar(meta, "tokenizer.ggml.add_bos_token", False)) and bos_id is not None:
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
                                          special_tokens=[(bos, int(bos_id))]),
        ])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _special_token(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    i = _meta_scalar(meta, f"tokenizer.ggml.{key}")
    if i is None:
        return None
    if not 0 <= int(i) < len(tokens):
        raise InputError(f"GGUF tokenizer.ggml.{key} = {i} is outside the vocabulary")
    return tokens[int(i)]


def write_tokenizer(meta: dict[str, Any], out_dir: Path, config: dict[str, Any]) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    to ``out_dir`` (created if needed) and return it."""
    tok = build_tokenizer(meta)
    tokens = [str(t) for t in _meta_list(meta, "tokenizer.ggml.tokens")]
    types = _meta_list(meta, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    named = {name: _special_token(meta, tokens, key) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id"))}
    named = {k: v for k, v in named.items() if v is not None}
    extra = [t for t, ty in zip(tokens, types)
             if ty == TOKEN_CONTROL and t not in named.values()]
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": bool(_meta_scalar(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_meta_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("max_position_embeddings", 0)) or 1 << 30,
    }
    template = _meta_scalar(meta, "tokenizer.chat_template")
    if template:
        tok_config["chat_template"] = str(template)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    with open(out_dir / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
    with open(out_dir / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump({**named, "additional_special_tokens": extra}, f, indent=2, ensure_ascii=False)
    return out_dir
