"""Streaming detokenization with stop strings, and the repetition-loop detector.

``TextStream`` turns generated token ids into text deltas such that:
- a UTF-8 character is never split: a delta is only emitted once the decoded
  window no longer ends in the replacement character U+FFFD (a multi-byte
  character spread over several byte-level tokens is held until complete);
- a stop string is never split or leaked: text that could be the beginning of
  a stop string is held back until it either completes the stop string (the
  stream then ends, the stop string itself is not returned, as OpenAI does) or
  can no longer match (it is then released).

Decoding uses a small sliding window (``prefix``..end) of tokens, so a step
costs two short ``decode`` calls regardless of the completion length, and the
result is identical to decoding the whole sequence for byte-level BPE and
SentencePiece tokenizers alike. Pure Python; no MLX.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    def __init__(self, tokenizer):
        self._tok = tokenizer
        self.tokens: list[int] = []
        self._prefix = 0  # window start: decoded text before it is final
        self._read = 0  # tokens before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids) if ids else ""

    def add(self, token: int) -> str:
        self.tokens.append(token)
        done = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        if len(full) > len(done) and not full.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.tokens)
            return full[len(done) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held (an incomplete character comes out as U+FFFD)."""
        done = self._decode(self.tokens[self._prefix : self._read])
        full = self._decode(self.tokens[self._prefix :])
        self._prefix = self._read = len(self.tokens)
        return full[len(done) :] if len(full) > len(done) else ""


class TextStream:
    """Token ids in, safe text deltas out; ``stopped`` once a stop string hit, and
    ``stop_hit`` says which (the one the text was cut at; at a tie, the shortest)."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self._decoder = IncrementalDecoder(tokenizer)
        self._stop = tuple(s for s in stop if s)
        self._held = ""
        self.stopped = False
        self.stop_hit: str | None = None

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        return self._feed(self._decoder.add(token))

    def finish(self) -> str:
        """Flush at the end of generation (length / EOS)."""
        if self.stopped:
            return ""
        text = self._feed(self._decoder.flush())
        if not self.stopped:
            text += self._held
            self._held = ""
        return text

    def _feed(self, text: str) -> str:
        if not self._stop:
            return text
        buf = self._held + text
        hits = [(i, len(s), s) for s, i in ((s, buf.find(s)) for s in self._stop) if i >= 0]
        if hits:
            at, _, self.stop_hit = min(hits)
            self.stopped = True
            self._held = ""
            return buf[:at]
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold]


def detect_loop(tokens: list[int], min_span: int = 64, max_period: int = 32) -> bool:
    """True when the tail of ``tokens`` is periodic: some block of at most
    ``max_period`` tokens repeated over the last ``max(min_span, 4 * period)``
    tokens (e.g. 64 identical tokens, or a 16-token sentence said 4 times).
    Ordinary prose, lists and code never repeat exactly at that length."""
    n = len(tokens)
    for p in range(1, max_period + 1):
        span = max(min_span, 4 * p)
        if span > n:
            break
        tail = tokens[n - span :]
        if tail[p:] == tail[:-p]:
            return True
    return False
