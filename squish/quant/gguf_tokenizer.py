"""Rebuild a Hugging Face tokenizer (``tokenizer.json`` & co.) from GGUF metadata.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary
(``tokenizer.ggml.tokens``), per-token types, the special ids and either BPE
merges (byte-level vocabularies) or per-token scores (SentencePiece). We rebuild
the tokenizer with the ``tokenizers`` library so that it splits text as llama.cpp
does with the same file.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``): the pre-tokenizer is named
only by a tag (``tokenizer.ggml.pre``); each supported tag reproduces llama.cpp's
split regexes for it (which in turn reproduce the original ``tokenizer.json``):

- ``smollm`` (also starcoder, refact): digits split one by one, then the GPT-2
  regex — ``Digits(individual_digits)`` + ``ByteLevel(use_regex=True)``.
- ``gpt-2``: the GPT-2 regex alone (llama.cpp's "default" tag uses other
  regexes and is refused).
- ``llama-bpe`` (Llama 3): the Llama 3 regex (numbers in groups of up to 3),
  with ``ignore_merges`` as in the original tokenizer and llama.cpp.
- ``qwen2``: the Qwen2 regex (single digits) and the NFC normalizer of the
  original Qwen2 tokenizer.
``tokenizer.ggml.scores`` is ignored there: byte-level BPE ranks merges by the
merge list.

SentencePiece (``"llama"``: Llama 2, Mistral, Phi-3, Gemma): llama.cpp merges
adjacent pieces greedily, always the pair whose merged piece has the highest
score, and falls back to ``<0xXX>`` byte tokens. A BPE model whose merges are
every (left, right) split of every normal token, ranked by the merged token's
score, makes the same choices; spaces become ``▁`` and, when
``tokenizer.ggml.add_space_prefix`` is true (llama.cpp's default), a ``▁`` is
prepended to each stretch of text (llama.cpp does so at the start and after each
special token; ``tokenizers`` normalizes each stretch between added tokens).

Token types: CONTROL (3) and UNKNOWN (2) tokens become special added tokens,
USER_DEFINED (4) tokens plain added tokens (matched whole, as llama.cpp does).
The end-of-generation ids are the EOS id, the ``eot``/``eom`` ids when present,
and the control tokens llama.cpp itself treats as ending a turn.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
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


def _vocab(meta: dict[str, Any]) -> tuple[list[str], list[int], dict[str, int]]:
    tokens = [str(t) for t in _meta_list(meta, "tokenizer.ggml.tokens")]
    if not tokens:
        raise InputError("GGUF tokenizer has no tokens (tokenizer.ggml.tokens)")
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise InputError("GGUF tokenizer vocabulary has duplicate tokens")
    types = _meta_list(meta, "tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise InputError("GGUF tokenizer.ggml.token_type length differs from the vocabulary size")
    return tokens, [int(t) for t in types], vocab


def _bpe_model(meta: dict[str, Any], tokens: list[str], vocab: dict[str, int]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    pre = str(_meta_scalar(meta, "tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise InputError(f"GGUF pre-tokenizer '{pre}' is not supported; supported: "
                         f"{', '.join(sorted(PRE_TOKENIZERS))}")
    recipe, nfc, ignore_merges = PRE_TOKENIZERS[pre]
    merges_raw = _meta_list(meta, "tokenizer.ggml.merges")
    if not merges_raw:
        raise InputError("GGUF tokenizer has no merges (tokenizer.ggml.merges)")
    merges = []
    for m in merges_raw:
        pair = str(m).split(" ")
        if len(pair) != 2:
            raise InputError(f"GGUF tokenizer merge {m!r} is not two tokens separated by a space")
        merges.append((pair[0], pair[1]))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges,
                               fuse_unk=False, byte_fallback=False))
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(recipe)
    tok.decoder = decoders.ByteLevel()
    return tok


def spm_merges(tokens: list[str], types: list[int], scores: list[float],
               vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of every normal token into two vocabulary pieces, best score first
    (ties: lower token id, then shorter left piece)."""
    ranked = []
    add, known = ranked.append, vocab.__contains__
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_NORMAL and len(t) > 1:
            score = -scores[i]
            for k in range(1, len(t)):
                if known(t[:k]) and known(t[k:]):
                    add((score, i, k))
    ranked.sort()
    return [(tokens[i][:k], tokens[i][k:]) for _, i, k in ranked]


def _spm_model(meta: dict[str, Any], tokens: list[str], types: list[int],
               vocab: dict[str, int]) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = [float(x) for x in _meta_list(meta, "tokenizer.ggml.scores")]
    if len(scores) != len(tokens):
        raise InputError("GGUF SentencePiece tokenizer needs one score per token "
                         "(tokenizer.ggml.scores)")
    unk_id = _meta_scalar(meta, "tokenizer.ggml.unknown_token_id")
    unk = tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(tokens) else None
    tok = Tokenizer(models.BPE(vocab=vocab, merges=spm_merges(tokens, types, scores, vocab),
                               unk_token=unk, fuse_unk=True, byte_fallback=True))
    prefix = bool(_meta_scalar(meta, "tokenizer.ggml.add_space_prefix", True))
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if prefix else replace
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def build_tokenizer(meta: dict[str, Any]) -> Any:
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's tokenizer."""
    from tokenizers import AddedToken, processors

    kind = _meta_scalar(meta, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise InputError(f"GGUF tokenizer model '{kind}' is not supported (byte-level BPE "
                         "'gpt2' or SentencePiece 'llama')")
    tokens, types, vocab = _vocab(meta)
    tok = _bpe_model(meta, tokens, vocab) if kind == "gpt2" else _spm_model(meta, tokens, types, vocab)
    special = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise InputError("GGUF tokenizer: added tokens changed the vocabulary size")
    steps = [processors.ByteLevel(trim_offsets=False)] if kind == "gpt2" else []
    bos_id = _meta_scalar(meta, "tokenizer.ggml.bos_token_id")
    if bool(_meta_scalar(meta, "tokenizer.ggml.add_bos_token", kind == "llama")) and bos_id is not None:
        bos = tokens[int(bos_id)]
        steps.append(processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1",
            special_tokens=[(bos, int(bos_id))]))
    if steps:
        tok.post_processor = steps[0] if len(steps) == 1 else processors.Sequence(steps)
    return tok


def _special_token(meta: dict[str, Any], tokens: list[str], key: str) -> str | None:
    i = _meta_scalar(meta, f"tokenizer.ggml.{key}")
    if i is None:
        return None
    if not 0 <= int(i) < len(tokens):
        raise InputError(f"GGUF tokenizer.ggml.{key} = {i} is outside the vocabulary")
    return tokens[int(i)]


# Control tokens that end a chat turn: llama.cpp treats these as end-of-generation
# whatever the file's eos id says (Gemma's <eos> is 1, its turns end with 106).
TURN_ENDS = ("<end_of_turn>", "<|eot_id|>", "<|im_end|>", "<|end|>", "<|eom_id|>")

# Gemma's turn format, for Gemma GGUFs converted without a chat template. Gemma has
# no system role: a system message is put in front of the first user message.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{% set ns.system = ns.system + m['content'] + '\n\n' %}{% else %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if m['role'] != 'assistant' %}{{ ns.system }}{% set ns.system = '' %}{% endif %}"
    "{{ m['content'] | trim }}<end_of_turn>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
DEFAULT_TEMPLATES = {"gemma3": (GEMMA_TEMPLATE, ("<start_of_turn>", "<end_of_turn>"))}


@dataclass
class TokenizerFiles:
    """The rebuilt tokenizer and what goes beside it; ``write`` puts them in a folder."""

    tokenizer: Any
    config: dict[str, Any]  # tokenizer_config.json
    special: dict[str, Any]  # special_tokens_map.json
    bos_token_id: int | None
    eos_token_ids: list[int]
    notes: list[str] = field(default_factory=list)
    chat: bool = True  # the file brings its own chat template (a pretrained model has none)

    def write(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(out_dir / "tokenizer.json"))
        for name, data in (("tokenizer_config.json", self.config),
                           ("special_tokens_map.json", self.special)):
            with open(out_dir / name, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=2, ensure_ascii=False)
        return out_dir


def build_tokenizer_files(meta: dict[str, Any], config: dict[str, Any]) -> TokenizerFiles:
    tok = build_tokenizer(meta)
    tokens, types, vocab = _vocab(meta)
    named = {name: _special_token(meta, tokens, key) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("pad_token", "padding_token_id"), ("unk_token", "unknown_token_id"))}
    named = {k: v for k, v in named.items() if v is not None}
    extra = [t for t, ty in zip(tokens, types)
             if ty == TOKEN_CONTROL and t not in named.values()]
    kind = _meta_scalar(meta, "tokenizer.ggml.model")
    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": bool(_meta_scalar(meta, "tokenizer.ggml.add_bos_token", kind == "llama")),
        "add_eos_token": bool(_meta_scalar(meta, "tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": extra,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(config.get("max_position_embeddings", 0)) or 1 << 30,
    }
    notes = []
    template = _meta_scalar(meta, "tokenizer.chat_template")
    chat = bool(template)
    arch = str(_meta_scalar(meta, "general.architecture", ""))
    if not template and arch in DEFAULT_TEMPLATES:
        default, needs = DEFAULT_TEMPLATES[arch]
        if all(vocab.get(t) is not None and types[vocab[t]] == TOKEN_CONTROL for t in needs):
            template = default
            notes.append(f"the GGUF has no chat template; used Squish's {arch} turn format")
    if template:
        tok_config["chat_template"] = str(template)
    eos: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        if (t := _special_token(meta, tokens, key)) is not None and vocab[t] not in eos:
            eos.append(vocab[t])
    eos += [vocab[t] for t in TURN_ENDS
            if t in vocab and types[vocab[t]] == TOKEN_CONTROL and vocab[t] not in eos]
    bos = _special_token(meta, tokens, "bos_token_id")
    return TokenizerFiles(tok, tok_config, {**named, "additional_special_tokens": extra},
                          vocab[bos] if bos is not None else None, eos, notes, chat)


def write_tokenizer(meta: dict[str, Any], out_dir: Path, config: dict[str, Any]) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``
    to ``out_dir`` (created if needed) and return it."""
    return build_tokenizer_files(meta, config).write(out_dir)
