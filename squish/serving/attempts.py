"""The attempt loop: generate, validate, retry with a corrective message.

One loop for every reply, streamed or whole. ``run_attempts`` drives
``generate(convo)`` (an async iterator of the engine's ``Delta`` / ``Finish`` /
``Error`` events for one attempt) and yields the core's neutral events
(``squish.serving.events``):

- A plain reply (no tools, no JSON format: ``task`` is None) is one attempt:
  text passes straight through, with its logprobs.
- A reply with tools or a JSON format is judged when its attempt ends
  (``squish.tools.loop.judge``: parse, unknown function, JSON Schema, the
  tool_choice, NaN/Inf, repetition, grammar, length). Content outside call
  blocks streams as it comes (``ToolStream`` holds back a tail that could begin
  a call marker, so call markup never reaches the content); calls are held
  until the attempt is judged, then sent as ``ToolCall`` events; a JSON reply
  is sent once, after it validated. A failed attempt yields ``Restart`` and is
  retried, at most ``loop.DEFAULT_MAX_ATTEMPTS`` times, with the failed reply
  and a corrective user turn appended.
- A value the constraint closed early (a repetition loop, or the token budget)
  parses and validates but is truncated: it counts as a failure and is retried;
  if no later attempt is valid, the newest such reply is returned (``Done.degraded``).
  A budget close in the last of several calls drops only that call.
- ``length`` (the reply could not be completed within ``max_tokens`` even with
  the constraint closing values early) is not retried: the same budget would
  end the same way. The reply ends with ``finish_reason: "length"``, holding
  whatever valid calls came before the cut, as OpenAI ends a reply that
  ran out of tokens.
  A reply the constraint began closing for the budget is retried (a retry often
  fits); if the last attempt still ran out, the reply ends as ``length`` too.
- Every attempt failed otherwise: ``ServeError`` 500 ``tool_call_failed``
  naming the last error (header ``x-should-retry: false``: the server already
  retried). Never a half-parsed call.

A reasoning section (``squish.serving.reasoning``), when the model writes one,
is split off first: it streams as ``ReasoningDelta``, and only the answer after
it is judged.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from squish.runtime import engine as eng
from squish.serving.errors import ENGINE_STATUS, NO_RETRY, ServeError
from squish.serving.events import Done, ReasoningDelta, Restart, TextDelta, ToolCall, Usage
from squish.tools import loop
from squish.tools.reference import Generation
from squish.tools.registry import new_call_id
from squish.tools.stream import ContentDelta, ToolStream

log = logging.getLogger("squish.serving")

Generate = Callable[[list], AsyncIterator]


@dataclass
class _Attempt:
    """What one attempt produced."""

    text: list[str] = field(default_factory=list)  # the answer, after any reasoning section
    content: list[str] = field(default_factory=list)  # content already yielded (outside call blocks)
    final: object = None  # the engine's Finish or Error
    stream: ToolStream | None = None
    split: object = None  # the reasoning splitter, made at the first event (the prompt is known then)
    made: bool = False

    def splitter(self, factory):
        if not self.made:
            self.split, self.made = (factory() if factory is not None else None), True
        return self.split

    @property
    def reasoning_tokens(self) -> int:
        return self.split.reasoning_tokens if self.split is not None else 0


def _tokens(ev) -> int:
    return getattr(ev, "tokens", 1)


class _Counter:
    def __init__(self) -> None:
        self.usage = Usage()
        self.cached_last = 0
        self.reasoning_closed = False
        self.stop_sequence: str | None = None  # of the last attempt

    def add(self, final, prompt_len: int, reasoning_tokens: int) -> None:
        u = self.usage
        if isinstance(final, eng.Finish):
            u.prompt_tokens += final.prompt_tokens
            u.completion_tokens += final.completion_tokens
            u.cached_tokens += final.cached_tokens
            self.cached_last = final.cached_tokens
            self.reasoning_closed |= bool(getattr(final, "reasoning_closed", False))
            self.stop_sequence = final.stop_sequence
        else:
            u.prompt_tokens += prompt_len
        u.reasoning_tokens += reasoning_tokens

    def done(self, reason: str, degraded: str | None = None) -> Done:
        return Done(reason, self.usage, degraded, self.reasoning_closed, self.cached_last,
                    self.stop_sequence if reason == "stop" and degraded is None else None)


def engine_error(final: eng.Error) -> ServeError:
    return ServeError(ENGINE_STATUS.get(final.kind, 500), final.message, code=final.kind)


async def run_attempts(generate: Generate, messages: list, task: loop.Task | None, *,
                       splitter: Callable[[], object] | None = None,
                       stats: loop.ToolStats = loop.STATS,
                       max_attempts: int = loop.DEFAULT_MAX_ATTEMPTS,
                       prompt_len: Callable[[], int] = lambda: 0) -> AsyncIterator:
    """Yield the neutral events of one reply (see the module docstring).

    ``messages`` are the chat template's message dicts (for corrective turns);
    ``splitter()`` makes a fresh reasoning splitter per attempt (or None);
    ``prompt_len()`` is the last submitted prompt's length (usage of an attempt
    that ended with an error)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    count = _Counter()
    if task is None:
        async for ev in _plain(generate, messages, splitter, count, prompt_len):
            yield ev
        return
    convo = list(messages)
    causes: list[str] = []
    last = ""
    fallback = None  # (outcome, content already streamed) of the newest reply closed early
    for attempt in range(1, max_attempts + 1):
        stats.add("attempt")
        att = _Attempt(stream=None if task.fmt is not None else ToolStream(
            task.family, check=_checker(task), max_calls=None if task.parallel else 1))
        async for ev in _consume(generate(convo), att, splitter):
            yield ev
        count.add(att.final, prompt_len(), att.reasoning_tokens)
        gen = _generation(att)
        outcome, err = loop.judge(task, gen)
        if err is None and gen.closed_early and not _drop_closed_call(task, gen, outcome):
            fallback, err = (outcome, "".join(att.content)), loop.CLOSED_EARLY[gen.closed_early]
        if err is None:
            stats.add("rescued" if causes else "ok")
            for ev in _outcome_events(task, outcome, replay=None):
                yield ev
            yield count.done(outcome.finish_reason)
            return
        cause, last = err
        causes.append(cause)
        if cause == "length" and not gen.closed_early:
            # The constraint could not close the reply within max_tokens: the same budget
            # would end the same way, so end here with what is valid, as "length".
            stats.add("length")
            for ev in _partial_events(task, gen):
                yield ev
            yield count.done("length")
            return
        if attempt < max_attempts:
            stats.add("retry", cause)
            yield Restart(cause)
            convo = loop.correction(messages, gen.text, task, last)
    if fallback is not None:
        stats.add("degraded")
        outcome, sent = fallback
        yield Restart(causes[-1])
        for ev in _outcome_events(task, outcome, replay=sent):
            yield ev
        yield count.done(outcome.finish_reason, degraded=causes[-1])
        return
    if causes[-1] == "length":  # even the last try, closed for the budget, ran out: "length", not a 500
        stats.add("length")
        for ev in _partial_events(task, gen):
            yield ev
        yield count.done("length")
        return
    stats.add("failed", causes[-1])
    what = "JSON output" if task.fmt else "tool call"
    log.warning("no valid %s after %d attempt(s): %s", what, max_attempts, ",".join(causes))
    err = ServeError(500, f"the model produced no valid {what} in {max_attempts} attempt(s); last error: {last}",
                     code="tool_call_failed", headers=NO_RETRY)
    err.causes = causes  # each attempt's cause, for logs and tests
    raise err


async def _plain(generate, messages, splitter, count: _Counter, prompt_len):
    att = _Attempt()
    final = None
    async for ev in generate(messages):
        split = att.splitter(splitter)
        if isinstance(ev, eng.Delta):
            if split is None:
                if ev.text or ev.logprobs:
                    yield TextDelta(ev.text, ev.logprobs)
                continue
            first = True
            for kind, text in split.push(ev.text, _tokens(ev)):
                if kind == "reasoning":
                    yield ReasoningDelta(text)
                else:
                    yield TextDelta(text, ev.logprobs if first else [])
                    first = False
        else:
            final = ev
    split = att.splitter(splitter)
    if split is not None:
        for kind, text in split.finish():
            yield ReasoningDelta(text) if kind == "reasoning" else TextDelta(text)
    if isinstance(final, eng.Error):
        raise engine_error(final)
    count.add(final, prompt_len(), att.reasoning_tokens)
    yield count.done(final.reason)


async def _consume(events, att: _Attempt, splitter):
    """Yield an attempt's live events (reasoning, content outside calls); fill ``att``."""
    async for ev in events:
        split = att.splitter(splitter)
        if not isinstance(ev, eng.Delta):
            att.final = ev
            continue
        parts = split.push(ev.text, _tokens(ev)) if split is not None else [("text", ev.text)]
        for kind, text in parts:
            if kind == "reasoning":
                yield ReasoningDelta(text)
            else:
                for out in _answer(att, text):
                    yield out
    split = att.splitter(splitter)
    if split is not None:
        for kind, text in split.finish():
            if kind == "reasoning":
                yield ReasoningDelta(text)
            else:
                for out in _answer(att, text):
                    yield out
    if att.stream is not None and not att.stream.repeated:
        for out in _content(att, att.stream.finish()):
            yield out


def _answer(att: _Attempt, text: str):
    att.text.append(text)
    ts = att.stream
    if ts is None or ts.repeated:
        return []  # JSON is sent once it validated; after a repeated call nothing more is content
    return _content(att, ts.push(text))


def _content(att: _Attempt, events: list) -> list:
    out = []
    for e in events:
        if isinstance(e, ContentDelta):
            att.content.append(e.text)
            out.append(TextDelta(e.text))
    return out


def _checker(task: loop.Task):
    """Per-call validation for ``ToolStream`` (content/markup separation, repeated calls)."""
    from squish.tools import validate

    tools = {t.name: t for t in task.tools}

    def check(call):
        if task.choice.mode == "none":
            return loop.CALL_NOT_ALLOWED, "tool_choice is 'none', so the reply must not call a function"
        err = validate.check_call(call, tools)
        if err is None and task.choice.mode == "function" and call.name != task.choice.name:
            err = (validate.UNKNOWN_TOOL, f"called {call.name!r}, but {task.choice.name!r} was required")
        return err

    return check


def _generation(att: _Attempt) -> Generation:
    """The attempt as the judge sees it. A repeated call (a small-model loop) ends the reply at
    the last accepted call block; engine errors other than NaN/Inf end the request."""
    final = att.final
    text = "".join(att.text)
    if att.stream is not None and att.stream.repeated:
        text = text[:att.stream.accepted_end]
    if isinstance(final, eng.Error):
        if final.kind != "numerical":
            raise engine_error(final)
        return Generation(text, "stop", "numerical")
    reason = "length" if final.reason == "length" and not (att.stream and att.stream.repeated) else "stop"
    return Generation(text, reason, final.problem, constraint_error=final.constraint_error,
                      closed_early=final.closed_early)


def _outcome_events(task: loop.Task, outcome: loop.Outcome, replay: str | None) -> list:
    """The judged reply's held-back parts: a JSON reply, or the calls (plus, for a fallback
    from an earlier attempt, its content, marked as already streamed)."""
    out: list = []
    if task.fmt is not None:
        out.append(TextDelta(outcome.content or ""))
        return out
    if replay:
        out.append(TextDelta(replay, replay=True))
    for i, c in enumerate(outcome.tool_calls):
        out.append(ToolCall(i, c["id"], c["function"]["name"], c["function"]["arguments"]))
    return out


def _partial_events(task: loop.Task, gen: Generation) -> list:
    """A reply cut by max_tokens: the complete, valid calls before the cut (JSON: the raw text)."""
    if task.fmt is not None:
        return [TextDelta(gen.text)]
    tools = {t.name: t for t in task.tools}
    from squish.tools import validate

    out = []
    for call in task.family.parse(gen.text).calls:
        if validate.check_call(call, tools) is not None:
            break
        out.append(ToolCall(len(out), new_call_id(), call.name, call.arguments))
        if not task.parallel:
            break
    return out


def _drop_closed_call(task: loop.Task, gen: Generation, outcome: loop.Outcome) -> bool:
    """A budget close ("length") in the last of several calls: drop that call from
    ``outcome`` and return True; the others are complete and untouched. (A repetition
    loop may be in any call, so this is for budget closes only.)"""
    if gen.closed_early != "length" or task.fmt is not None or not outcome.tool_calls:
        return False
    raw = len(task.family.parse(gen.text).calls)
    if raw < 2:
        return False
    if len(outcome.tool_calls) == raw:  # parallel calls on: all were kept, the last was the cut one
        outcome.tool_calls = outcome.tool_calls[:-1]
    return True


def arguments_object(arguments: str) -> dict:
    """A call's arguments as an object (for protocols that send them parsed)."""
    return json.loads(arguments)
