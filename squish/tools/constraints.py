"""Constrained decoding: llguidance grammars applied to the logits as a mask.

Why llguidance: a Rust core with a small Python wheel (no torch), JSON Schema
and Lark grammars (we need both: ``response_format`` is a schema, a tool call
is markers around a schema), and a per-token mask cost of tens of
microseconds for a 49k vocabulary on this CPU (benchmarks/tool_calling.py
measures the end-to-end decode cost). xgrammar needs torch + triton;
outlines-core covers regexes / schemas but not Lark.

Shape of the hook: a ``Constraint`` is built on the handler thread (a bad
schema is a ``ToolRequestError`` → HTTP 400 before any work is queued). The
engine thread asks it for a fresh per-request ``processor(prompt_len)``, a
``(tokens, logits) -> logits`` callable in mlx_lm's logits-processor shape,
and appends it *last* to the request's processors. ``tokens`` is the whole
sequence so far (prompt + completion, a 1-D ``mx.array``), as mlx_lm's
``generate_step`` and ``BatchGenerator`` pass it; the processor feeds the
tokens generated since its last call to its own matcher, then sets every
disallowed logit to -inf (float32 in, float32 out). Each request of a batch
owns its processor and matcher, so batching needs nothing more.

The per-step processors (loop closing, the token budget) are in
``squish.tools.processors``.

End of sequence: the tokenizer's EOS ids are given to llguidance; the mask
admits EOS exactly when the grammar is complete, and only EOS once nothing
more can follow, so a constrained reply ends with the engine's ordinary EOS
stop. If the matcher ever errs (it cannot, unless a token outside the mask
is sampled, e.g. from NaN logits), the processor records ``error`` and
forces EOS; the output then fails validation and the retry loop takes over.

Constraint kinds:
- ``json_output``: ``response_format`` json_object (any object) / json_schema.
- ``tool_calls`` with ``required`` or a named function: the whole reply is one
  or more call blocks in the model family's format, arguments per schema.
- ``tool_calls`` with ``auto``: free text until the family's call marker
  appears in the output; from there the rest is constrained to call blocks
  (``TriggeredProcessor``), so a started call cannot be malformed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Callable

from squish.tools.errors import ToolRequestError
from squish.tools.families.base import JSON_STYLE, TaggedFamily, json_lit
from squish.tools.spec import OutputFormat, ToolChoice, ToolSpec

if TYPE_CHECKING:
    from squish.tools.processors import MaskProcessor, TriggeredProcessor

GRAMMAR_CACHE_SIZE = 64

_lock = threading.Lock()  # guards the caches below (handler threads build constraints)
_tokenizers: dict[int, tuple[object, object]] = {}  # id(tokenizer) -> (tokenizer, LLTokenizer)
_matchers: OrderedDict = OrderedDict()  # (id(LLTokenizer), grammar) -> compiled LLMatcher template


def ll_tokenizer(tokenizer):
    """The llguidance view of the served tokenizer (built once, ~0.5 s)."""
    with _lock:
        hit = _tokenizers.get(id(tokenizer))
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    from copy import copy

    from llguidance import LLTokenizer

    hf = getattr(tokenizer, "_tokenizer", tokenizer)  # mlx_lm's wrapper, or squish.runtime.tokenizer's
    eos = sorted(getattr(tokenizer, "eos_token_ids", None) or [hf.eos_token_id])
    rust = copy(hf.backend_tokenizer)  # the Rust tokenizer, added tokens included
    rust.no_padding()
    rust.no_truncation()
    llt = LLTokenizer(rust.to_str(), eos_token=eos)
    with _lock:
        _tokenizers[id(tokenizer)] = (tokenizer, llt)
    return llt


def _compile(llt, grammar: str):
    """A compiled matcher template for ``grammar`` (LRU-cached); raises ValueError if invalid."""
    from llguidance import LLMatcher

    key = (id(llt), grammar)
    with _lock:
        m = _matchers.get(key)
        if m is not None:
            _matchers.move_to_end(key)
            return m
    is_err, msgs = LLMatcher.validate_grammar_with_warnings(grammar, llt)
    if is_err:
        raise ValueError(msgs[0] if msgs else "invalid grammar")
    m = LLMatcher(llt, grammar, log_level=0)
    if m.is_error():
        raise ValueError(m.get_error())
    with _lock:
        _matchers[key] = m
        while len(_matchers) > GRAMMAR_CACHE_SIZE:
            _matchers.popitem(last=False)
    return m


def _compile_either(llt, build: Callable[[bool], str], param: str):
    """Compile strictly; if the engine lacks a keyword, leniently (``exact`` False)."""
    try:
        return _compile(llt, build(False)), True
    except ValueError as strict_err:
        try:
            return _compile(llt, build(True)), False
        except ValueError:
            raise ToolRequestError(f"{param}: the schema cannot be used for constrained decoding: {strict_err}",
                                   param) from None


def special_lit(tokenizer) -> Callable[[str], str]:
    """Lark literal for a marker: ``<[id]>`` when it is one token that llguidance treats as
    special (every added token, e.g. Qwen's ``<tool_call>``, which Hugging Face marks
    non-special: as a string literal the grammar would refuse the model's own token and
    force the marker spelled in pieces), else a string."""
    llt = ll_tokenizer(tokenizer)

    def lit(text: str) -> str:
        ids = llt.tokenize_str(text, parse_special=True)
        if len(ids) == 1 and llt.is_special_token(ids[0]):
            return f"<[{ids[0]}]>"
        return json_lit(text)

    return lit


class Constraint:
    """A compiled grammar; ``processor(prompt_len)`` makes a fresh per-request processor.

    ``exact`` is False when the grammar engine had to ignore schema keywords
    (the output is still validated with jsonschema before it is returned).
    """

    def __init__(self, tokenizer, matcher, exact: bool, kind: str):
        self.tokenizer = tokenizer
        self.llt = ll_tokenizer(tokenizer)
        self._template = matcher
        self.exact = exact
        self.kind = kind  # "json_object" | "json_schema" | "tools_required" | "tools_function"

    def new_matcher(self):
        return self._template.deep_copy()

    def processor(self, prompt_len: int, max_tokens: int | None = None) -> "MaskProcessor":
        from squish.tools.processors import MaskProcessor

        return MaskProcessor(self.new_matcher(), prompt_len, self.llt, max_tokens)


class TriggeredConstraint(Constraint):
    """``tool_choice=auto``: unconstrained until the family's call marker, then ``matcher``."""

    def __init__(self, tokenizer, matcher, exact: bool, family: TaggedFamily):
        super().__init__(tokenizer, matcher, exact, "tools_auto")
        self.family = family

    def processor(self, prompt_len: int, max_tokens: int | None = None) -> "TriggeredProcessor":
        from squish.tools.processors import TriggeredProcessor

        return TriggeredProcessor(self, prompt_len, max_tokens)


# ---- builders (handler thread) ------------------------------------------------

def json_output(tokenizer, fmt: OutputFormat) -> Constraint:
    from llguidance import LLMatcher

    llt = ll_tokenizer(tokenizer)
    schema = fmt.schema if fmt.kind == "json_schema" else {"type": "object"}

    def build(lenient: bool) -> str:
        return LLMatcher.grammar_from_json_schema(schema, overrides={**JSON_STYLE, "lenient": lenient})

    matcher, exact = _compile_either(llt, build, "response_format.json_schema.schema")
    return Constraint(tokenizer, matcher, exact, fmt.kind)


def tool_calls(tokenizer, family: TaggedFamily, tools: list[ToolSpec], choice: ToolChoice,
               parallel: bool = True) -> Constraint | None:
    """The constraint for ``tools`` + ``tool_choice``; None for ``none``."""
    if choice.mode == "none" or not tools:
        return None
    if choice.mode == "function":
        tools = [t for t in tools if t.name == choice.name]
        if not tools:
            raise ToolRequestError(f"tool_choice names unknown function {choice.name!r}", "tool_choice")
    llt = ll_tokenizer(tokenizer)
    lit = special_lit(tokenizer)
    matcher, exact = _compile_either(
        llt, lambda lenient: family.grammar(tools, parallel, lit, lenient), "tools"
    )
    if choice.mode == "auto":
        return TriggeredConstraint(tokenizer, matcher, exact, family)
    return Constraint(tokenizer, matcher, exact, "tools_required" if choice.mode == "required" else "tools_function")
