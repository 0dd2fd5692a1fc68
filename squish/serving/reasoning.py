"""Reasoning sections: split ``<think>…</think>`` from the answer, and start output
constraints after it.

Models such as Qwen3 and the DeepSeek-R1 distills write a thinking section
before the answer. The markers come from the model (``ChatFacts``, resolved
once at load): both must be single tokens of the vocabulary and the chat
template must use them. Where the section starts depends on the rendered
prompt (``start_state``): a template may open it itself (the prompt ends with
``<think>``), close it to switch thinking off (Qwen3's ``enable_thinking=False``
writes an empty section), or leave the model to open it with its first token.

``ReasoningSplitter`` (text, handler side) turns the generated text into
reasoning and answer parts: the markers are not part of either, the newlines
around the section are dropped, and a tail that could begin the end marker is
held back. ``ReasoningGate`` (a logits processor, engine thread) wraps an
output constraint (tool calls, JSON) so that it starts only after the section:
free decoding while thinking, then up to ``MAX_GAP`` whitespace tokens, then
the constraint, with the tokens left of ``max_tokens`` as its budget. It also
closes a section that reaches its budget by allowing only the end marker, and
says so (``reasoning_closed``): the client's ``budget_tokens``, or, before a
constrained answer, when the tokens left are what that answer needs (its
shortest form, ``squish.tools.budget``) plus ``ANSWER_RESERVE`` where the
budget allows (at most half of ``max_tokens`` then, at least the shortest
form and two tokens).
"""

from __future__ import annotations

MAX_GAP = 4  # whitespace tokens allowed between </think> and a constrained answer
ANSWER_RESERVE = 32  # tokens kept for a constrained answer beyond its minimum


def start_state(prompt: list[int], facts) -> str:
    """"inside" (the prompt opened the section), "answer" (it closed one, or the model
    does not reason), or "open" (the model may open one with its first token)."""
    if not facts.reasons:
        return "answer"
    for t in reversed(prompt[-8:]):
        if t == facts.think_end_id:
            return "answer"
        if t == facts.think_start_id:
            return "inside"
    return "open"


class ReasoningSplitter:
    """Generated text in; ``("reasoning" | "text", piece)`` parts out."""

    def __init__(self, start: str, end: str, state: str):
        self.start, self.end = start, end
        self.state = state  # "open" | "inside" | "after" | "answer"
        self.buf = ""
        self.reasoning_tokens = 0
        self._lead = state == "inside"
        self._touched = False

    def push(self, text: str, tokens: int = 1) -> list[tuple[str, str]]:
        """Parts of ``text``; its ``tokens`` count as reasoning if any of it was inside the
        section (the markers included)."""
        self._touched = self.state == "inside"
        self.buf += text
        out = self._drain(final=False)
        if self._touched:
            self.reasoning_tokens += tokens
        return out

    def finish(self) -> list[tuple[str, str]]:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        while True:
            if self.state == "open":
                s = self.buf.lstrip()
                if s.startswith(self.start):
                    self.state, self.buf, self._lead = "inside", s[len(self.start):], True
                    continue
                if self.start.startswith(s) and not final:
                    return out  # could still become the start marker
                self.state = "answer"
                continue
            if self.state == "inside":
                self._touched = True
                if self._lead:
                    self.buf = self.buf.lstrip()
                    if not self.buf:
                        return out
                    self._lead = False
                i = self.buf.find(self.end)
                if i >= 0:
                    piece = self.buf[:i].rstrip()
                    if piece:
                        out.append(("reasoning", piece))
                    self.state, self.buf = "after", self.buf[i + len(self.end):]
                    continue
                keep = 0
                if not final:  # a tail that could begin the end marker, and the whitespace before it
                    keep = _prefix_tail(self.buf, self.end)
                    rest = self.buf[:len(self.buf) - keep]
                    keep += len(rest) - len(rest.rstrip())
                piece = self.buf[:len(self.buf) - keep]
                if final:
                    piece = piece.rstrip()
                if piece:
                    out.append(("reasoning", piece))
                self.buf = self.buf[len(self.buf) - keep:]
                return out
            if self.state == "after":
                self.buf = self.buf.lstrip()
                if not self.buf:
                    return out
                self.state = "answer"
                continue
            if self.buf:
                out.append(("text", self.buf))
            self.buf = ""
            return out


def _prefix_tail(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that begins ``marker``."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-k:]):
            return k
    return 0


class GatedConstraint:
    """``Constraint``-shaped (``processor(prompt_len, max_tokens)``): an inner constraint
    (or None) that starts after the reasoning section, and that section's budget."""

    def __init__(self, inner, facts, state: str, *, budget_tokens: int | None, reserve: int, llt=None):
        self.inner, self.facts, self.state = inner, facts, state
        self.budget_tokens, self.reserve = budget_tokens, reserve
        self.llt = llt if llt is not None else getattr(inner, "llt", None)

    def processor(self, prompt_len: int, max_tokens: int | None = None) -> "ReasoningGate":
        return ReasoningGate(self, prompt_len, max_tokens)


class ReasoningGate:
    """The logits processor of a ``GatedConstraint`` (engine thread only)."""

    def __init__(self, gate: GatedConstraint, prompt_len: int, max_tokens: int | None):
        self.g = gate
        self.prompt_len = prompt_len
        self.max_tokens = max_tokens
        self.state = gate.state  # "open" | "inside" (a gate is only used for these)
        self.seen = 0  # generated tokens looked at
        self.thought = 0  # tokens of the reasoning section
        self.gap = 0  # whitespace tokens after it
        self.inner = None  # the inner constraint's processor, once it runs
        self._inner_at = -1  # position (in generated tokens) the current inner starts at
        self.reasoning_closed = False

    # read by the engine when the request ends
    @property
    def error(self):
        return getattr(self.inner, "error", None)

    @property
    def closed_early(self):
        return getattr(self.inner, "closed_early", None)

    def __call__(self, tokens, logits):
        import numpy as np

        n = len(tokens) - self.prompt_len
        if n > self.seen:
            for t in np.asarray(tokens)[self.prompt_len + self.seen:].tolist():
                self._advance(int(t))
                self.seen += 1
        if self.state == "inside":
            return self._thinking(logits)
        if self.g.inner is None:
            return logits
        if self.state == "open":  # the first token: open the section, or start the answer
            out = self._inner(tokens, logits, at=0)
            return _allow(out, logits, [self.g.facts.think_start_id])
        if self.state == "gap":
            out = self._inner(tokens, logits, at=self.seen)
            if self.gap < MAX_GAP and not self.reasoning_closed:  # a closed section left no room
                return _allow(out, logits, None, _whitespace(self.g.llt))
            return out
        return self.inner(tokens, logits)  # "answer": the inner constraint runs alone

    def _advance(self, t: int) -> None:
        f = self.g.facts
        if self.state == "open":
            self.state = "inside" if t == f.think_start_id else "answer"
            if self.state == "inside":
                self.inner = None
        elif self.state == "inside":
            self.thought += 1
            if t == f.think_end_id:
                self.state = "gap"
        elif self.state == "gap":
            ws = _whitespace(self.g.llt) if self.g.llt is not None else None
            if ws is not None and t < len(ws) and ws[t]:
                self.gap += 1
            else:
                self.state = "answer"  # the inner processor made at this position consumes it

    def _inner(self, tokens, logits, at: int):
        if self.inner is None or self._inner_at != at:
            left = None if self.max_tokens is None else self.max_tokens - at
            self.inner = self.g.inner.processor(self.prompt_len + at, left)
            self._inner_at = at
        return self.inner(tokens, logits)

    def _thinking(self, logits):
        left = None if self.max_tokens is None else self.max_tokens - self.seen
        over_budget = self.g.budget_tokens is not None and self.thought >= self.g.budget_tokens
        if over_budget or (left is not None and self.g.inner is not None and left <= self.g.reserve):
            self.reasoning_closed = True
            return _allow(None, logits, [self.g.facts.think_end_id])
        return logits


_WS: dict[int, tuple] = {}


def _whitespace(llt):
    """Per-token booleans: the token decodes to whitespace only (cached per llguidance tokenizer)."""
    import numpy as np

    hit = _WS.get(id(llt))
    if hit is not None and hit[0] is llt:
        return hit[1]
    data = [llt.decode_bytes([t]) for t in range(llt.vocab_size)]
    ws = np.array([len(b) > 0 and not b.strip() for b in data], dtype=np.bool_)
    _WS[id(llt)] = (llt, ws)
    return ws


def _allow(masked, logits, ids, extra=None):
    """``masked`` (or all -inf when None) with the original logits put back at ``ids`` /
    where ``extra`` (a per-token boolean array) is true."""
    import mlx.core as mx
    import numpy as np

    vocab = logits.shape[-1]
    keep = np.zeros(vocab, dtype=np.bool_)
    if ids:
        keep[[i for i in ids if i is not None and i < vocab]] = True
    if extra is not None:
        n = min(vocab, len(extra))
        keep[:n] |= extra[:n]
    base = masked if masked is not None else mx.full(logits.shape, float("-inf"), dtype=logits.dtype)
    return mx.where(mx.array(keep), logits, base)
