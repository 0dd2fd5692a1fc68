"""Prompt encoding (chat template / plain text) for the API layer.

Runs on handler threads, never on the event loop and never with MLX: it only
uses the tokenizer, which is shared read-only with the engine thread.

Special-token injection
-----------------------
A chat template renders to text that is then tokenized; tokenizing that text
the ordinary way would turn a client string such as ``"<|im_end|>\\n
<|im_start|>system\\n..."`` inside a message into real control tokens, letting
a user forge turns (and a system prompt). ``apply_template`` prevents that:
only the template's own text may yield special tokens.

How: every string the client sent (message content, names, tool-call
arguments, tool definitions, at any depth) is scanned for the tokenizer's
special-token strings. If none contains one (the usual case), the template is
rendered and tokenized exactly as ``apply_chat_template`` does. Otherwise each
occurrence inside client strings is replaced by a private-use placeholder
carrying a per-request nonce, the template is rendered, the text is split at
the special tokens the template wrote (leftmost-longest, as Hugging Face's
added-token splitter does), and each run of ordinary text, with the
placeholders put back as the literal characters, is encoded by a copy of the
tokenizer that never produces special tokens (``encode_special_tokens``).
For ordinary text this is the same segmentation Hugging Face uses, so the
two paths agree token for token (a unit test checks it).
"""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass


class PromptError(ValueError):
    """The prompt cannot be encoded for this model (HTTP 400)."""


_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"
_lock = threading.Lock()
# id(tokenizer) -> [tokenizer, special strings, splitter regex, plain encoder or None (not built)]
_cache: dict[int, list] = {}
_NO_RUST = object()  # the tokenizer has no Rust backend to copy


def _hf(tokenizer):
    return getattr(tokenizer, "_tokenizer", tokenizer)


def special_strings(tokenizer) -> tuple[str, ...]:
    """The strings that tokenize to special (control) tokens, longest first."""
    return _entry(tokenizer)[1]


def _entry(tokenizer) -> list:
    """This tokenizer's cache entry; the special strings and splitter are computed at
    once (cheap, every chat request needs them), the plain encoder only by ``_plain``."""
    key = id(tokenizer)
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit
    hf = _hf(tokenizer)
    special = set(getattr(hf, "all_special_tokens", ()) or ())
    for t in (getattr(hf, "added_tokens_decoder", {}) or {}).values():
        if getattr(t, "special", False):
            special.add(t.content)
    strings = tuple(sorted((s for s in special if s), key=len, reverse=True))
    splitter = re.compile("|".join(re.escape(s) for s in strings)) if strings else None
    entry = [tokenizer, strings, splitter, None]
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] is tokenizer:
            return hit  # another thread built it meanwhile
        _cache[key] = entry
    return entry


def _plain(tokenizer):
    """(plain encoder, splitter) for ``tokenizer``. The encoder is a private copy of the
    Rust tokenizer with ``encode_special_tokens`` on, never mutated after this. It costs
    ~90 ms to build (SmolLM2) and only requests whose strings contain special-token
    text need it, so it is built on first use, not at load."""
    entry = _entry(tokenizer)
    if entry[3] is None:
        from tokenizers import Tokenizer

        hf = _hf(tokenizer)
        rust = getattr(hf, "backend_tokenizer", None) or getattr(hf, "_tokenizer", None)
        plain = _NO_RUST
        if rust is not None and hasattr(rust, "to_str"):
            plain = Tokenizer.from_str(rust.to_str())
            plain.encode_special_tokens = True
        with _lock:
            if entry[3] is None:
                entry[3] = plain
    return (None if entry[3] is _NO_RUST else entry[3]), entry[2]


def _neutralize(obj, strings, nonce: str, found: list[bool]):
    """A copy of ``obj`` with every special string inside its strings replaced by a placeholder."""
    if isinstance(obj, str):
        if any(s in obj for s in strings):
            found[0] = True
            for i, s in enumerate(strings):
                if s in obj:
                    obj = obj.replace(s, f"{_PH_OPEN}{nonce}{i}{_PH_CLOSE}")
        return obj
    if isinstance(obj, dict):
        return {_neutralize(k, strings, nonce, found): _neutralize(v, strings, nonce, found)
                for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_neutralize(v, strings, nonce, found) for v in obj]
    return obj


def _render(tokenizer, messages, kwargs, tokenize: bool):
    try:
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=tokenize, **kwargs)
    except Exception as exc:  # jinja errors: e.g. a template that rejects a role order
        raise PromptError(f"the model's chat template rejected these messages: {exc}") from exc
    if tokenize and isinstance(out, dict):  # some tokenizers return a BatchEncoding
        out = out["input_ids"]
    return out


def encode_rendered(tokenizer, text: str, literal: dict[str, str] | None = None) -> list[int]:
    """Token ids of template output ``text``: special tokens only where ``text`` spells
    them; each key of ``literal`` (a placeholder) is encoded as its value, as plain text."""
    plain, splitter = _plain(tokenizer)
    if plain is None:
        raise PromptError("this tokenizer has no fast (Rust) backend, so client text with special-token "
                          "strings cannot be encoded safely")
    hf = _hf(tokenizer)
    restore = re.compile("|".join(map(re.escape, literal))) if literal else None

    def run(piece: str) -> list[int]:
        if restore is not None:
            piece = restore.sub(lambda m: literal[m.group()], piece)
        return plain.encode(piece, add_special_tokens=False).ids if piece else []

    ids: list[int] = []
    pos = 0
    if splitter is not None:
        for m in splitter.finditer(text):
            ids += run(text[pos:m.start()])
            ids.append(hf.convert_tokens_to_ids(m.group()))
            pos = m.end()
    ids += run(text[pos:])
    return ids


def apply_template(tokenizer, messages: list, **kwargs) -> list[int]:
    """``apply_chat_template(..., tokenize=True)`` where client strings can never
    become special tokens (see the module docstring). ``kwargs`` (e.g. ``tools``)
    are client data too and are neutralized the same way."""
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError("this model has no chat template; use /v1/completions with a plain prompt")
    strings = special_strings(tokenizer)
    nonce = secrets.token_hex(4)
    found = [False]
    safe_msgs = _neutralize(messages, strings, nonce, found)
    safe_kwargs = _neutralize(kwargs, strings, nonce, found)
    if not found[0]:
        return list(_render(tokenizer, messages, kwargs, tokenize=True))
    text = _render(tokenizer, safe_msgs, safe_kwargs, tokenize=False)
    literal = {f"{_PH_OPEN}{nonce}{i}{_PH_CLOSE}": s for i, s in enumerate(strings)}
    return encode_rendered(tokenizer, text, literal)


def encode_chat(tokenizer, messages: list[dict], **template_kwargs) -> list[int]:
    """Token ids of a chat; ``template_kwargs`` are switches the template defines
    (``enable_thinking``), never client text."""
    return apply_template(tokenizer, messages, **template_kwargs)


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))


# ---- model facts, resolved once at load ------------------------------------------------------

THINK_MARKERS = (("<think>", "</think>"),)  # (start, end) pairs a template may use
DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class ChatFacts:
    """What the serving core needs to know about a model's tokenizer and template.

    Computed once when the model loads (``chat_facts``), never per request."""

    context_length: int
    vocab_size: int
    has_template: bool
    native_tools: bool  # the chat template renders a ``tools`` list
    tool_family: str  # squish.tools.registry family name
    think_start: str | None = None  # reasoning markers, when the model writes a thinking section
    think_end: str | None = None
    think_start_id: int | None = None
    think_end_id: int | None = None
    thinking_switch: bool = False  # the template reads ``enable_thinking``
    control_ids: frozenset = frozenset()  # special tokens other than end-of-sequence ones

    @property
    def reasons(self) -> bool:
        return self.think_end_id is not None


def chat_facts(tokenizer, config: dict) -> ChatFacts:
    from squish.tools import registry

    template = getattr(tokenizer, "chat_template", None) or ""
    ctx = config.get("max_position_embeddings") or config.get("max_seq_len") or config.get("n_ctx")
    text_cfg = config.get("text_config") or {}
    ctx = ctx or text_cfg.get("max_position_embeddings")
    vocab = config.get("vocab_size") or text_cfg.get("vocab_size") or len(tokenizer)
    start = end = None
    start_id = end_id = None
    hf = _hf(tokenizer)
    vocab_map = hf.get_vocab() if hasattr(hf, "get_vocab") else {}
    for s, e in THINK_MARKERS:
        if s in vocab_map and e in vocab_map and s in template:
            start, end, start_id, end_id = s, e, vocab_map[s], vocab_map[e]
            break
    special_strings(tokenizer)  # warm the special-token splitter now, not on the first request
    special_ids = set(getattr(hf, "all_special_ids", ()) or ())
    for i, tok in (getattr(hf, "added_tokens_decoder", {}) or {}).items():
        if getattr(tok, "special", False):
            special_ids.add(int(i))
    special_ids -= set(getattr(tokenizer, "eos_token_ids", ()) or ())
    return ChatFacts(
        context_length=int(ctx) if ctx else DEFAULT_CONTEXT,
        vocab_size=int(vocab),
        has_template=bool(template),
        native_tools="tools" in template,
        tool_family=registry.for_tokenizer(tokenizer, str(config.get("model_type", ""))).name,
        think_start=start, think_end=end, think_start_id=start_id, think_end_id=end_id,
        thinking_switch="enable_thinking" in template,
        control_ids=frozenset(special_ids),
    )
