"""Per-step logits processors of constrained decoding (engine thread).

A ``squish.tools.constraints.Constraint`` makes one per request; see that module for the
grammar side and the hook's shape.

Loops inside a value: a grammar keeps the syntax legal but cannot make a small
model stop repeating itself inside a string (measured on SmolLM2-135M:
``"query": "…/search/search/search…"`` until ``max_tokens``, a cut-off call).
So each processor watches its own output with ``detect_loop`` over
``LOOP_SPAN`` tokens; when it fires, the next steps keep only the allowed
tokens that close the looping value: inside a JSON string (tracked from the
output bytes), tokens starting with ``"``; then, if the grammar allows it at
that point, one token starting with ``}`` or ``]`` (so a loop over array items
ends the array). "Allowed" is llguidance's mask, so required fields, enums,
``minLength`` and ``minItems`` still hold: when no closer is allowed, the mask
is left alone.

Token budget: a value can also run on without repeating exactly (SmolLM2 wrote
an ever longer array of near-identical e-mail addresses). A processor given
``max_tokens`` finishes the reply when the tokens left are no more than what
closing it needs (one per open string and bracket, and ``END_RESERVE`` for the
call's end marker; 10 tokens inside a string of a SmolLM2 call with flat
arguments): from then on each step keeps EOS if the grammar allows it, else
the allowed closers as above (tokens made only of closers first).
``PENDING_RESERVE`` tokens earlier, no new item or key may start where the
value could close instead. ``closed_early`` is "length" only when that narrowing excluded
the token the model preferred (argmax of the grammar-masked logits). ``closed_early`` says why a reply was closed
early ("repetition" or "length"); the retry loop treats such a reply as a
failed attempt it may still fall back on (``squish.tools.loop``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from squish.tools.constraints import TriggeredConstraint

LOOP_SPAN = 24  # tokens of exact repetition (period <= 32, >= 4 repeats) before a value is closed
# Tokens kept, beyond one per open string / bracket, for what follows the JSON: SmolLM2's
# "\n</tool_call>" is 6 tokens as the grammar forces them, then EOS. PENDING_RESERVE tokens
# before that, no new item may start (a token starting with ","): ", \"note\": \"" is 4 tokens.
# Measured with the adversarial walk in tests/integration/test_tools_constraints.py.
END_RESERVE = 7
PENDING_RESERVE = 4

_lock = threading.Lock()  # guards the cache below (engine threads of several models)
_closers: dict[int, tuple] = {}  # id(LLTokenizer) -> (LLTokenizer, quote, bracket, pure, comma)


def closer_tokens(llt):
    """Per-token boolean numpy arrays over the vocabulary: starts with ``"``, starts
    with ``}``/``]``, made of ``"}]`` only, starts with ``,``.

    The JSON style has no whitespace between tokens (``JSON_STYLE``), so a
    closer is always the first byte of its token. Built once per tokenizer
    (~25 ms for a 49k vocabulary)."""
    import numpy as np

    with _lock:
        hit = _closers.get(id(llt))
        if hit is not None and hit[0] is llt:
            return hit[1:]
    data = [llt.decode_bytes([t]) for t in range(llt.vocab_size)]
    quote = np.array([b[:1] == b'"' for b in data], dtype=np.bool_)
    bracket = np.array([b[:1] in (b"}", b"]") for b in data], dtype=np.bool_)
    pure = np.array([len(b) > 0 and not b.strip(b'"}]') for b in data], dtype=np.bool_)
    comma = np.array([b[:1] == b"," for b in data], dtype=np.bool_)
    with _lock:
        _closers[id(llt)] = (llt, quote, bracket, pure, comma)
    return quote, bracket, pure, comma


class JsonScan:
    """Whether a byte stream is inside a JSON string (escapes included), and how
    many objects / arrays are open."""

    def __init__(self) -> None:
        self.inside = False
        self.depth = 0
        self._escape = False

    def feed(self, data: bytes) -> None:
        for b in data:
            if not self.inside:
                self.inside = b == 0x22
                if b in (0x7B, 0x5B):  # { [
                    self.depth += 1
                elif b in (0x7D, 0x5D) and self.depth:  # } ]
                    self.depth -= 1
            elif self._escape:
                self._escape = False
            elif b == 0x5C:
                self._escape = True
            elif b == 0x22:
                self.inside = False


def _tolist(tokens, start: int) -> list[int]:
    """``tokens[start:]`` as ints, read from the host buffer: slicing the ``mx.array``
    would be a new op, queued behind the forward pass the processor just dispatched."""
    import numpy as np

    return np.asarray(tokens)[start:].tolist()


class MaskProcessor:
    """mlx_lm logits processor: feed new tokens to the matcher, mask the rest to -inf.

    ``budget``: how many tokens the matcher may consume in all (None: no limit)."""

    def __init__(self, matcher, prompt_len: int, llt, budget: int | None = None):
        import numpy as np

        self.matcher = matcher
        self.prompt_len = prompt_len
        self.consumed = 0  # completion tokens fed to the matcher
        self.error: str | None = None
        self.loops_closed = 0
        self.budget = budget
        self.budget_closed = False  # the budget changed the reply (see _feed)
        self._budget_mode = False  # the finishing level was reached (for tests)
        self._check = None  # (argmax of the grammar-only logits, the narrowed mask) of the last step
        self._llt = llt
        self._eos = list(llt.eos_tokens)
        words = (llt.vocab_size + 31) // 32
        self._bitmask = np.full((1, words), -1, dtype=np.int32)
        self._output: list[int] = []  # tokens this matcher has consumed
        self._strings = JsonScan()
        self._closing: str | None = None  # None | "string" | "bracket"
        self._watch_from = 0  # loop detection looks at _output[_watch_from:]

    def __call__(self, tokens, logits):
        import mlx.core as mx

        # Start this step's forward pass now: reading the newest token (``_feed``)
        # waits for the previous step, and the matcher then computes the mask on
        # the CPU while the model runs, instead of before it is dispatched.
        mx.async_eval(logits)
        self._feed(tokens)
        return self._mask(logits)

    def _feed(self, tokens) -> None:
        n = len(tokens) - self.prompt_len
        if n > self.consumed and self._check is not None:
            # A finishing step narrowed the mask: did it change what the model preferred?
            # (For greedy decoding this is exact; it only counts real cuts as "length".)
            best, narrowed = self._check
            self._check = None
            if not narrowed[int(best.item())]:
                self.budget_closed = True
        if n > self.consumed:
            for t in _tolist(tokens, self.prompt_len + self.consumed):
                if self.error is None and not self.matcher.consume_token(t):
                    self.error = self.matcher.get_error() or f"token {t} rejected by the grammar"
                self.advance(t)
            self.consumed = n
            self._watch()

    @property
    def closed_early(self) -> str | None:
        """Why the reply was closed early: "length" (token budget), "repetition", or None."""
        return "length" if self.budget_closed else "repetition" if self.loops_closed else None

    def advance(self, t: int) -> None:
        """Track the output the matcher consumed: JSON string state and loop closing."""
        was_inside = self._strings.inside
        self._strings.feed(self._llt.decode_bytes([t]))
        self._output.append(t)
        if self._closing == "string" and was_inside and not self._strings.inside:
            self._closing = "bracket"
        elif self._closing == "bracket":
            self._stop_closing()

    def _stop_closing(self) -> None:
        self._closing = None
        self._watch_from = len(self._output)

    def _watch(self) -> None:
        from squish.runtime.detokenizer import detect_loop

        if self._closing is None and self.error is None and len(self._output) - self._watch_from >= LOOP_SPAN \
                and detect_loop(self._output[self._watch_from:], min_span=LOOP_SPAN):
            self._closing = "string" if self._strings.inside else "bracket"
            self.loops_closed += 1

    def _mask(self, logits):
        import mlx.core as mx
        import numpy as np

        if self.error is None:
            self.matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
            if self.matcher.is_error():
                self.error = self.matcher.get_error()
        if self.error is not None:
            return _only(logits, self._eos)
        vocab = logits.shape[-1]
        bits = np.unpackbits(self._bitmask.view(np.uint8), bitorder="little")
        if bits.shape[0] < vocab:
            bits = np.concatenate([bits, np.zeros(vocab - bits.shape[0], np.uint8)])
        bits = bits[:vocab].astype(np.bool_)
        level = self._budget_level()
        if level:
            narrowed = self._finish(bits) if level == 2 else self._no_new_items(bits)
            if (narrowed != bits).any():
                grammar_only = mx.where(mx.array(bits), logits, mx.array(float("-inf"), dtype=logits.dtype))
                self._check = (mx.argmax(grammar_only.reshape(-1)), narrowed)
            bits = narrowed
        elif self._closing is not None:
            bits = self._closers(bits)
        allowed = mx.array(bits)
        return mx.where(allowed, logits, mx.array(float("-inf"), dtype=logits.dtype))

    def _budget_level(self) -> int:
        """0: no budget pressure; 1: no new items; 2: finish (see the module docstring)."""
        if self.budget is None:
            return 0
        scan = self._strings
        needed = scan.depth + scan.inside + END_RESERVE
        left = self.budget - len(self._output)
        if left <= needed:
            self._budget_mode = True
            return 2
        return 1 if left <= needed + PENDING_RESERVE and not scan.inside and scan.depth else 0

    def _no_new_items(self, bits):
        """Where an object or array could close, it may not take a new item instead."""
        quote, bracket, pure, comma = closer_tokens(self._llt)
        n = min(len(bits), len(bracket))
        if not (bits[:n] & bracket[:n]).any():
            return bits
        out = bits.copy()
        out[:n] &= ~comma[:n]
        return out

    def _finish(self, bits):
        """The budget is nearly spent: EOS if the grammar allows it, else close what is
        open; where nothing can close (a required key, a value's start, the end
        marker), the grammar's own mask."""
        import numpy as np

        eos = [t for t in self._eos if t < len(bits) and bits[t]]
        if eos:
            out = np.zeros_like(bits)
            out[eos] = True
            return out
        quote, bracket, pure, _ = closer_tokens(self._llt)
        return _narrow(bits, quote if self._strings.inside else bracket, pure)

    def _closers(self, bits):
        """``bits`` narrowed to the allowed tokens that close the looping value, if any."""
        quote, bracket, pure, _ = closer_tokens(self._llt)
        narrowed = _narrow(bits, quote if self._closing == "string" else bracket, pure)
        if narrowed is bits and self._closing == "bracket":  # the grammar wants more here (a required field)
            self._stop_closing()
        return narrowed


class TriggeredProcessor:
    """Free text until the family's call marker is generated, then a ``MaskProcessor``.

    On the marker, the constrained matcher is fed the text from the marker on
    (re-tokenized; llguidance matches bytes, so any tokenization of the same
    text is accepted), and masks every later step.
    """

    def __init__(self, constraint: "TriggeredConstraint", prompt_len: int, max_tokens: int | None = None):
        self.constraint = constraint
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.inner: MaskProcessor | None = None
        self.generated: list[int] = []

    @property
    def error(self) -> str | None:
        return self.inner.error if self.inner is not None else None

    @property
    def closed_early(self) -> str | None:
        return self.inner.closed_early if self.inner is not None else None

    def __call__(self, tokens, logits):
        if self.inner is not None:
            return self.inner(tokens, logits)
        n = len(tokens) - self.prompt_len
        if n > len(self.generated):
            self.generated.extend(_tolist(tokens, self.prompt_len + len(self.generated)))
            text = self.constraint.tokenizer.decode(self.generated)
            at = self.constraint.family.find_start(text)
            if at >= 0:
                llt = self.constraint.llt
                ids = llt.tokenize_str(text[at:], parse_special=True)
                budget = None if self.max_tokens is None else len(ids) + self.max_tokens - n
                inner = MaskProcessor(self.constraint.new_matcher(), len(tokens), llt, budget)
                if not inner.matcher.consume_tokens(ids):
                    inner.error = inner.matcher.get_error() or "the call start was rejected by the grammar"
                for t in ids:
                    inner.advance(t)
                self.inner = inner
                return inner._mask(logits)
        return logits


def _narrow(bits, pick, pure):
    """``bits & pick``, preferring tokens made of closers only (``"}}`` closes; ``",``
    opens the next item); ``bits`` itself if no allowed token is in ``pick``. ``pick``
    and ``pure`` may be shorter than ``bits``: the rest is False."""
    n = min(len(bits), len(pick))
    narrowed = bits.copy()
    narrowed[:n] &= pick[:n]
    narrowed[n:] = False
    if not narrowed.any():
        return bits
    only = narrowed.copy()
    only[:n] &= pure[:n]
    return only if only.any() else narrowed


def _only(logits, ids: list[int]):
    import mlx.core as mx

    keep = mx.zeros(logits.shape[-1], dtype=mx.bool_)
    if ids:
        keep[mx.array(ids)] = True
    return mx.where(keep, logits, mx.array(float("-inf"), dtype=logits.dtype))
