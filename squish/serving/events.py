"""The neutral events the core emits, and a whole reply as those events collected.

A run yields, in order: any number of ``ReasoningDelta`` / ``TextDelta`` /
``ToolCall`` events, possibly a ``Restart`` (an attempt failed validation and a
corrective retry follows), and exactly one ``Done`` last. Errors are raised
(``ServeError``), never yielded. A streamed reply encodes each event as it
comes; it cannot take back what it sent, so after a ``Restart`` the retry's
output simply follows. A whole reply (``collect``) drops what the failed
attempt produced.

``ToolCall`` events are complete, validated calls (their arguments JSON text
validates against the tool's schema): a protocol that streams arguments in
fragments splits them itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TextDelta:
    text: str
    logprobs: list = field(default_factory=list)  # squish.runtime.sampling.TokenLogprob
    # Content a stream already sent in an earlier attempt, repeated for whole replies: the
    # reply returned is that attempt's (a degraded fallback). Streams skip it.
    replay: bool = False


@dataclass
class ReasoningDelta:
    text: str


@dataclass
class ToolCall:
    index: int  # 0, 1, ... within the reply
    id: str
    name: str
    arguments: str  # JSON text


@dataclass
class Restart:
    cause: str  # why the attempt failed (a squish_tool_retries_total cause)


@dataclass
class Done:
    finish_reason: str  # "stop" | "length" | "tool_calls"
    usage: Usage
    # Valid, but a value was closed early in every attempt ("repetition" / "length"):
    # the newest such reply is returned rather than an error (docs/tools.md).
    degraded: str | None = None
    reasoning_closed: bool = False  # the reasoning section was closed at its budget
    cached_prompt_tokens: int = 0  # of the last attempt (for logs)
    stop_sequence: str | None = None  # finish_reason "stop" because this client stop string hit


Event = TextDelta | ReasoningDelta | ToolCall | Restart | Done


@dataclass
class Reply:
    """A whole reply: the events of a run, collected."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    done: Done | None = None

    @property
    def finish_reason(self) -> str:
        return self.done.finish_reason if self.done else "stop"

    @property
    def usage(self) -> Usage:
        return self.done.usage if self.done else Usage()


async def collect(events: AsyncIterator[Any]) -> Reply:
    reply = Reply()
    text: list[str] = []
    thought: list[str] = []
    async for ev in events:
        if isinstance(ev, TextDelta):
            text.append(ev.text)
            reply.logprobs.extend(ev.logprobs)
        elif isinstance(ev, ReasoningDelta):
            thought.append(ev.text)
        elif isinstance(ev, ToolCall):
            reply.tool_calls.append(ev)
        elif isinstance(ev, Restart):
            text.clear()
            thought.clear()
            reply.logprobs.clear()
            reply.tool_calls.clear()
        elif isinstance(ev, Done):
            reply.done = ev
    reply.content = "".join(text)
    reply.reasoning = "".join(thought)
    return reply
