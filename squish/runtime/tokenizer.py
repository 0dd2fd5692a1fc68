"""The serving tokenizer: ``tokenizers`` (Rust) and jinja2, without transformers' tokenizer objects.

Why: ``mlx_lm.utils.load_tokenizer`` builds a transformers tokenizer, which parses the
whole ``tokenizer.json`` into Python objects on top of the Rust one, plus mlx_lm's
streaming detokenizer's token map. For a 151k-token vocabulary that costs ~125 MB of
steady RSS (vs ~42 MB for the Rust tokenizer alone) and ~250 MB at the load peak, and
~0.3 s of start-up (measured; docs/benchmarks.md). Squish needs none of it: it
encodes, decodes and renders chat templates, and its streaming detokenizer is its own.

``load`` returns a ``LeanTokenizer`` when the folder is one it reproduces exactly, else
mlx_lm's ``TokenizerWrapper`` (same duck-typed interface, so callers need not care):
- ``tokenizer.json`` with a BPE model, and a ``tokenizer_class`` transformers loads
  from that file as it is, or rebuilds with the same pipeline for byte-level BPE
  (``LEAN_CLASSES``); no ``add_bos_token`` / ``add_eos_token`` switches (classes that
  honour them rewrite the post-processor);
- transformers v5 decodes BPE without ``clean_up_tokenization_spaces``, so neither
  does this; the added tokens of ``tokenizer_config.json`` are added as transformers
  adds them.

Chat templates render as transformers renders them: a sandboxed jinja2 environment
with ``trim_blocks`` / ``lstrip_blocks``, loop controls, ``{% generation %}`` blocks,
a ``tojson`` that keeps non-ASCII text, ``raise_exception`` and ``strftime_now``;
messages without their ``None`` fields, reasoning under all its names; the special
tokens (``bos_token``, ``eos_token``, ...) as variables; and, like mlx_lm's wrapper,
``enable_thinking`` defaulting to whether the vocabulary has thinking markers. A
unit test compares both paths token for token. The template is compiled at load,
never on the first request.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LEAN_CLASSES = frozenset({"PreTrainedTokenizerFast", "TokenizersBackend", "GPT2Tokenizer", "GPT2TokenizerFast",
                          "Qwen2Tokenizer", "Qwen2TokenizerFast"})
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Thinking markers mlx_lm's wrapper looks for (pairs of single tokens), and its multi-token ones.
THINK_PAIRS = (("<think>", "</think>"), ("<longcat_think>", "</longcat_think>"),
               ("<|think:start|>", "<|think:end|>"), ("<|channel>", "<channel|>"))
XTML = ("<|open|>", "<|close|>", "<|sep|>", "<|end_of_msg|>")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _content(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def why_not_lean(path: Path, config: dict) -> str | None:
    """Why this folder's tokenizer needs transformers (None: the lean tokenizer reproduces it)."""
    if not (path / "tokenizer.json").is_file():
        return "no tokenizer.json"
    cls = config.get("tokenizer_class")
    if cls is not None and cls not in LEAN_CLASSES:
        return f"tokenizer_class {cls}"
    if config.get("add_bos_token") or config.get("add_eos_token"):
        return "add_bos_token / add_eos_token"
    return None


def load(path: Path, eos_token_ids=None):
    """The tokenizer of a model folder: a ``LeanTokenizer`` when possible, else mlx_lm's."""
    path = Path(path)
    config = _read_json(path / "tokenizer_config.json")
    why = why_not_lean(path, config)
    if why is None:
        from tokenizers import Tokenizer

        rust = Tokenizer.from_file(str(path / "tokenizer.json"))
        if type(rust.model).__name__ != "BPE":
            why = f"a {type(rust.model).__name__} model"
        else:
            return LeanTokenizer(path, rust, config, eos_token_ids)
    log.info("tokenizer of %s loaded with transformers (%s)", path.name, why)
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(path, eos_token_ids=eos_token_ids)


def _environment():
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}`` (assistant masks in training): its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _templates(path: Path, config: dict) -> dict[str, str]:
    """Named chat templates: ``chat_template.jinja`` / ``.json``, else tokenizer_config's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return {"default": jinja.read_text(encoding="utf-8")}
    raw = _read_json(path / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(raw, str):
        return {"default": raw}
    if isinstance(raw, list):
        return {t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t}
    return {}


def _plain_messages(messages: list) -> list[dict]:
    out = []
    for m in messages:
        m = {k: v for k, v in dict(m).items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


class LeanTokenizer:
    """The tokenizer interface Squish uses (and mlx_lm's wrapper offers), on ``tokenizers``."""

    def __init__(self, path: Path, rust, config: dict, eos_token_ids=None):
        from tokenizers import AddedToken

        self.name_or_path = str(path)
        self.backend_tokenizer = rust
        for spec in (config.get("added_tokens_decoder") or {}).values():
            content = _content(spec)
            if content and rust.token_to_id(content) is None:
                token = AddedToken(content, single_word=spec.get("single_word", False), lstrip=spec.get("lstrip", False),
                                   rstrip=spec.get("rstrip", False), normalized=spec.get("normalized", False),
                                   special=spec.get("special", False))
                (rust.add_special_tokens if spec.get("special") else rust.add_tokens)([token])
        self.added_tokens_decoder = rust.get_added_tokens_decoder()
        stm = _read_json(path / "special_tokens_map.json")
        self.special_tokens_map = {k: v for k in SPECIAL_KEYS
                                   if (v := _content(config.get(k)) or _content(stm.get(k))) is not None}
        self.eos_token = self.special_tokens_map.get("eos_token")
        self.bos_token = self.special_tokens_map.get("bos_token")
        self.eos_token_id = rust.token_to_id(self.eos_token) if self.eos_token else None
        ids = [eos_token_ids] if isinstance(eos_token_ids, int) else list(eos_token_ids or [])
        self.eos_token_ids = set(ids) | ({self.eos_token_id} if self.eos_token_id is not None else set())
        self._named = _templates(path, config)
        self.chat_template = self._named.get("default") or next(iter(self._named.values()), None)
        env = _environment() if self._named else None
        self._compiled = {name: env.from_string(t) for name, t in self._named.items()}
        self.has_thinking = any(rust.token_to_id(a) is not None and rust.token_to_id(b) is not None
                                for a, b in THINK_PAIRS) or all(rust.token_to_id(t) is not None for t in XTML)
        special = set(self.special_tokens_map.values())
        special |= {t.content for t in self.added_tokens_decoder.values() if t.special}
        self.all_special_tokens = sorted(special)
        self.all_special_ids = sorted(i for t in special if (i := rust.token_to_id(t)) is not None)

    # ---- the tokenizer ---------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if isinstance(ids, int):
            ids = [ids]
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            return self.backend_tokenizer.token_to_id(tokens)
        return [self.backend_tokenizer.token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids):
        if isinstance(ids, int):
            return self.backend_tokenizer.id_to_token(ids)
        return [self.backend_tokenizer.id_to_token(i) for i in ids]

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    # ---- chat templates ------------------------------------------------------------------------
    def apply_chat_template(self, messages: list, tools: list | None = None, add_generation_prompt: bool = False,
                            tokenize: bool = True, **kwargs: Any):
        if not self._compiled:
            raise ValueError(f"{self.name_or_path} has no chat template")
        name = "tool_use" if tools is not None and "tool_use" in self._compiled else "default"
        template = self._compiled.get(name) or next(iter(self._compiled.values()))
        kwargs.setdefault("enable_thinking", self.has_thinking)
        text = template.render(messages=_plain_messages(messages), tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **{**self.special_tokens_map, **kwargs})
        return self.encode(text, add_special_tokens=False) if tokenize else text
