"""Streaming: model text in, OpenAI ``delta.content`` / ``delta.tool_calls`` events out.

Content streams as it comes, except a tail that could be the start of the
family's call marker (held back until it is clearly not one), so raw
``<tool_call>`` text never reaches ``content``. A call block is buffered
until its end marker (or the end of the output for marker-less families),
parsed, validated, and only then emitted as two fragments in OpenAI's shape:
``{"index", "id", "type", "function": {"name", "arguments": ""}}`` and
``{"index", "function": {"arguments": "<the whole JSON>"}}``. An invalid call is
never emitted; it is recorded in ``failures`` for the retry loop.

A call identical (same name and arguments) to one already accepted is never
emitted either: small models with parallel calls allowed tend to repeat their
call until ``max_tokens``. ``repeated`` then turns true, and the caller stops
generation; ``accepted_end`` is where the text up to the last accepted block
ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from squish.tools.families.base import ParsedCall, TaggedFamily, find_end
from squish.tools.registry import new_call_id


@dataclass
class ContentDelta:
    text: str


@dataclass
class ToolCallDelta:
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def openai(self) -> dict:
        d: dict = {"index": self.index}
        if self.id is not None:
            d["id"] = self.id
            d["type"] = "function"
            d["function"] = {"name": self.name, "arguments": self.arguments}
        else:
            d["function"] = {"arguments": self.arguments}
        return d


@dataclass
class ToolStream:
    family: TaggedFamily
    # ``check(call) -> None | (cause, message)``; None accepts every parsed call.
    check: Callable[[ParsedCall], tuple[str, str] | None] | None = None
    max_calls: int | None = None  # 1 when parallel_tool_calls is false
    text: str = ""
    failures: list[tuple[str, str]] = field(default_factory=list)
    calls: list[ParsedCall] = field(default_factory=list)
    repeated: bool = False  # a call repeated an accepted one (a loop); stop generating
    accepted_end: int = 0  # end of the last block whose calls were all new
    _pos: int = 0  # everything before this index has been emitted or consumed

    def push(self, delta: str) -> list:
        self.text += delta
        return self._drain(final=False)

    def finish(self) -> list:
        return self._drain(final=True)

    def _drain(self, final: bool) -> list:
        events: list = []
        while True:
            rest = self.text[self._pos:]
            at = self.family.find_start(rest)
            if at < 0:
                keep = self._holdback(rest)
                if final and keep:
                    if keep >= 2 and rest.strip():
                        # The output ended inside a call marker (max_tokens): a cut-off call, not content.
                        self.failures.append(("length", "the reply ended inside a tool-call marker"))
                        rest = rest[: len(rest) - keep]
                    keep = 0
                piece = rest[: len(rest) - keep]
                if piece and (piece.strip() or not self.calls):  # no whitespace between/after calls
                    events.append(ContentDelta(piece))
                self._pos += len(piece)
                return events
            if at > 0:
                if rest[:at].strip():  # whitespace right before a call is not content
                    events.append(ContentDelta(rest[:at]))
                self._pos += at
                rest = rest[at:]
            start_len = len(self.family.start) if rest.startswith(self.family.start) else 0
            end = find_end(rest, self.family.end, start_len) if self.family.end else -1
            if end < 0 and not final:
                return events
            block = rest if end < 0 else rest[: end + len(self.family.end)]
            self._pos += len(block)
            events.extend(self._calls(block))
            if not self.repeated:
                self.accepted_end = self._pos
            if end < 0:
                return events

    def _holdback(self, rest: str) -> int:
        """Length of the longest tail of ``rest`` that could begin a call."""
        if not rest.strip() and self.family.find_start("{") == 0:
            return len(rest)  # marker-less families: a reply may still open with a JSON call
        marker = self.family.start
        for k in range(min(len(marker) - 1, len(rest)), 0, -1):
            if marker.startswith(rest[-k:]):
                return k
        return 0

    def _calls(self, block: str) -> list:
        events = []
        for call in self.family.parse(block).calls:
            problem = self.check(call) if self.check is not None else (
                ("parse_error", call.error) if call.error else None)
            if problem is not None:
                self.failures.append(problem)
                continue
            if any(c.name == call.name and c.arguments == call.arguments for c in self.calls):
                self.repeated = True
                continue
            if self.max_calls is not None and len(self.calls) >= self.max_calls:
                continue
            index = len(self.calls)
            self.calls.append(call)
            events.append(ToolCallDelta(index, new_call_id(), call.name, ""))
            events.append(ToolCallDelta(index, arguments=call.arguments))
        return events
