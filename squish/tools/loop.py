"""The tool / JSON reply policy: what a reply must be, how an attempt is judged,
the corrective message, and the retry counters.

The loop that applies it (generate, judge, retry) is the serving core's
(``squish.serving.attempts``), shared by streamed and whole replies. An attempt
fails when:

- generation hit NaN/Inf logits (``numerical``), a repetition loop
  (``repetition``), a grammar error (``grammar``), or ``max_tokens`` in the
  middle of a call or JSON value (``length``);
- a call does not parse (``parse_error``), names an unknown function
  (``unknown_tool``), or its arguments fail the tool's JSON Schema
  (``schema_error``, checked with ``jsonschema``); with ``required`` or a named
  ``tool_choice``, a reply without a call (``no_call``), or a call to another
  function (``unknown_tool``); with ``none`` (and tools given), a reply that
  calls a function anyway (``call_not_allowed``: its raw markup must not
  reach ``content``);
- a ``response_format`` reply is not JSON, not an object, or fails the schema.

After a failure the next attempt sees the failed reply as an assistant turn
and a corrective user turn naming the error (``CORRECTION``).

With ``parallel_tool_calls`` false, only the first valid call is returned.
With parallel calls, a last call cut off by ``max_tokens`` after complete,
valid calls is dropped (the complete ones are returned, as a stream would
have sent them).

Counters (``ToolStats``, thread-safe) for ``/metrics``: attempts, retries by
cause, and requests by result.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

from squish.tools import validate
from squish.tools.families.base import TaggedFamily
from squish.tools.registry import to_openai
from squish.tools.spec import OutputFormat, ToolChoice, ToolSpec

DEFAULT_MAX_ATTEMPTS = 3
CALL_NOT_ALLOWED = "call_not_allowed"
CLOSED_EARLY = {
    "repetition": ("repetition", "the reply got stuck repeating itself inside a value"),
    "length": ("length", "the reply ran out of tokens inside a value (it was closed early)"),
}
CORRECTION = (
    "Your previous reply was invalid: {error}. Reply again, correctly: {expected}"
)


class ToolStats:
    """Process-wide retry counters; ``snapshot()`` is what /metrics exports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._c: Counter = Counter()

    def add(self, event: str, cause: str = "", n: int = 1) -> None:
        with self._lock:
            self._c[(event, cause)] += n

    def snapshot(self) -> dict[tuple[str, str], int]:
        """``{(event, cause): count}``; events: ``attempt``, ``retry`` (cause),
        ``rescued``, ``degraded``, ``length``, ``failed`` (cause), ``ok``."""
        with self._lock:
            return dict(self._c)


STATS = ToolStats()


@dataclass
class Outcome:
    content: str | None
    tool_calls: list[dict] = field(default_factory=list)
    finish_reason: str = "stop"  # "stop" | "length" | "tool_calls"
    value: object = None  # the parsed JSON of a response_format reply
    attempts: int = 1
    causes: list[str] = field(default_factory=list)  # cause of each failed attempt

    @property
    def degraded(self) -> bool:
        """Every attempt failed; this is the newest reply the constraint closed early."""
        return len(self.causes) == self.attempts


@dataclass
class Task:
    """What one request asks of the reply."""

    family: TaggedFamily
    tools: list[ToolSpec] = field(default_factory=list)
    choice: ToolChoice = field(default_factory=lambda: ToolChoice("none"))
    parallel: bool = True
    fmt: OutputFormat | None = None

    @property
    def wants_calls(self) -> bool:
        return self.choice.mode in ("required", "function")

    def expected(self) -> str:
        if self.choice.mode == "function":
            return f"call the function {self.choice.name} in the format described."
        if self.choice.mode == "required":
            return "call one of the functions in the format described."
        if self.choice.mode == "auto":
            return "either answer in plain text or call a function in the format described."
        if self.fmt is not None and self.fmt.schema is not None:
            return "reply with one JSON object that matches the schema, and nothing else."
        return "reply with one JSON object, and nothing else."


def judge(task: Task, gen) -> tuple[Outcome | None, tuple[str, str] | None]:
    """Turn one generation into an ``Outcome``, or a ``(cause, message)`` failure."""
    if gen.problem == "numerical":
        return None, ("numerical", "the model produced NaN/Inf logits")
    if gen.problem == "repetition":
        return None, ("repetition", "the reply got stuck repeating itself")
    if gen.problem == "grammar":
        return None, ("grammar", f"constrained decoding failed: {gen.constraint_error}")
    if task.fmt is not None:
        if gen.finish_reason == "length":
            return None, ("length", "max_tokens ended the reply before the JSON value was complete")
        value, err = validate.check_json_output(gen.text, task.fmt.schema)
        if err is not None:
            return None, err
        return Outcome(gen.text.strip(), value=value), None
    if task.choice.mode == "none":
        if task.tools and called(task.family, gen.text):
            return None, (CALL_NOT_ALLOWED, "tool_choice is 'none', so the reply must not call a function")
        return Outcome(gen.text, finish_reason=gen.finish_reason), None
    parsed = task.family.parse(gen.text)
    by_name = {t.name: t for t in task.tools}
    calls = parsed.calls
    for i, call in enumerate(parsed.calls):
        err = validate.check_call(call, by_name)
        if err is None and task.choice.mode == "function" and call.name != task.choice.name:
            err = (validate.UNKNOWN_TOOL, f"called {call.name!r}, but {task.choice.name!r} was required")
        if err is not None:
            if gen.finish_reason == "length":
                if i > 0 and i == len(parsed.calls) - 1:
                    calls = parsed.calls[:i]  # complete calls, then one cut off by max_tokens: drop it
                    break
                return None, ("length", "max_tokens ended the reply in the middle of a tool call")
            return None, err
    calls = calls[:1] if not task.parallel else calls
    if not calls:
        if task.wants_calls:
            if gen.finish_reason == "length":
                return None, ("length", "max_tokens ended the reply before a tool call was complete")
            return None, (validate.NO_CALL, "the reply did not call a function")
        return Outcome(parsed.content, finish_reason=gen.finish_reason), None
    return Outcome(parsed.content or None, to_openai(calls), "tool_calls"), None


def called(family: TaggedFamily, text: str) -> bool:
    """Whether ``text`` holds a call attempt: a family marker, or a parseable call."""
    if family.end and family.start in text:
        return True
    return any(c.error is None for c in family.parse(text).calls)


def correction(messages: list, gen_text: str, task: Task, error: str) -> list:
    return [*messages,
            {"role": "assistant", "content": gen_text},
            {"role": "user", "content": CORRECTION.format(error=error, expected=task.expected())}]
