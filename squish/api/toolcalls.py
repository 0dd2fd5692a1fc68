"""Chat completions with ``tools`` or a JSON ``response_format``: the engine side of issue 5.

A request goes: ``plan`` (on a worker thread: parse ``tools`` / ``tool_choice``
/ ``response_format`` with ``squish.tools.spec``, compile the llguidance
constraint; a bad schema or an unknown function is a 400 naming the field) ->
attempts. Each attempt renders the conversation (``squish.tools.render``,
native template or fallback tool prompt), submits it to the engine with the
constraint (its logits processor runs last in the batch), and judges the
reply. A failed attempt is retried with a corrective message, at most
``loop.DEFAULT_MAX_ATTEMPTS`` times (``squish.tools.loop``).

Client-visible behaviour (documented in docs/tools.md):

- Non-streaming: ``message.tool_calls`` (valid against their schemas) with
  ``finish_reason: "tool_calls"``, or ``content`` (a JSON ``response_format``
  reply always parses, and validates against a given schema). ``usage``
  counts every attempt (the tokens were computed).
- Streaming with tools: content deltas stream live (a tail that could begin a
  call marker is held back, so raw call markup never reaches ``content``);
  each call is held until its block is complete and valid, then sent as
  ``delta.tool_calls[i]`` fragments (id + name, then the arguments). An
  attempt that sent at least one call ends with ``finish_reason:
  "tool_calls"`` (a later invalid call in the same reply is dropped and
  counted). An attempt that sent no call is retried, in the same stream, when
  a call was required, a call was attempted but invalid, or generation failed
  (NaN/Inf, repetition, grammar); the retry's content streams after what was
  already sent. Streaming with a JSON ``response_format``: the reply is
  validated first and sent as one content delta.
- Every attempt failed: HTTP 500 ``tool_call_failed`` (type ``server_error``,
  header ``x-should-retry: false``: the server already retried), or, once a
  stream has started, a final ``data: {"error": {...}}`` event with the same
  code and no ``[DONE]``. Never a half-parsed call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from starlette.concurrency import run_in_threadpool

from squish.api.errors import APIError, error_body
from squish.api.streaming import SSE_DONE, ChatShapes, sse
from squish.runtime import engine as eng
from squish.tools import constraints, loop, registry, render, spec, validate
from squish.tools.errors import ToolCallFailed
from squish.tools.reference import Generation
from squish.tools.stream import ContentDelta, ToolStream

log = logging.getLogger("squish.api")

DISCONNECT_POLL_S = 0.2  # as in routes: how often a non-streamed request checks its client
NO_RETRY = {"x-should-retry": "false"}
_ERROR_STATUS = {"timeout": 504, "queue_timeout": 503, "internal": 500}


class ClientGone(Exception):
    """The client of a non-streamed request disconnected."""


@dataclass
class Plan:
    task: loop.Task
    constraint: Any  # squish.tools.constraints.Constraint | None


def needs_tools(body) -> bool:
    """Whether the chat request goes through the tool / structured-output layer."""
    fmt = body.response_format is not None and body.response_format.get("type") != "text"
    return bool(body.tools) or body.tool_choice is not None or fmt or any(m.role == "tool" or m.tool_calls for m in body.messages)


def plan(tokenizer, model_type: str, body) -> Plan:
    """Parse and compile on a worker thread (jsonschema checks, llguidance compile)."""
    tools = spec.parse_tools(body.tools)
    choice = spec.parse_tool_choice(body.tool_choice, tools)
    fmt = spec.parse_response_format(body.response_format)
    family = registry.for_tokenizer(tokenizer, model_type)
    parallel = body.parallel_tool_calls is not False
    if fmt is not None:
        constraint = constraints.json_output(tokenizer, fmt)
    else:
        constraint = constraints.tool_calls(tokenizer, family, tools, choice, parallel)
    return Plan(loop.Task(family, tools, choice, parallel, fmt), constraint)


class Usage:
    def __init__(self) -> None:
        self.prompt = self.completion = self.cached = 0

    def add(self, req: eng.Request, ev) -> None:
        if isinstance(ev, eng.Finish):
            self.prompt += ev.prompt_tokens
            self.completion += ev.completion_tokens
            self.cached += ev.cached_tokens
        else:
            self.prompt += len(req.prompt)

    def finish(self, reason: str) -> eng.Finish:
        return eng.Finish(reason, self.prompt, self.completion, self.cached)


class Run:
    """One chat request on the tool path: renders, submits and collects its attempts."""

    def __init__(self, request, e: eng.Engine, body, p: Plan, max_tokens: Callable[[int], int],
                 account: Callable[[str, Any], None]):
        self.account = account  # (http status, Finish | None) -> None: request metrics + access log
        self.request, self.e, self.body, self.plan = request, e, body, p
        self.task = p.task
        self.tok = e.model_info.tokenizer
        self.state = request.app.state
        self.rid = request.state.request_id
        self.deadline = time.monotonic() + self.state.request_timeout
        self._max_tokens = max_tokens
        self.first_max: int | None = None
        self._first_ids: list[int] | None = None
        self.attempt = 0
        self.usage = Usage()
        self.stats = self.state.metrics.tool_stats
        self.degraded: str | None = None  # cause, when a non-streamed reply is a degraded fallback

    async def render(self, convo: list) -> list[int]:
        t = self.task
        return await run_in_threadpool(render.encode_chat, self.tok, convo, t.tools, t.choice, t.family)

    async def prepare(self, messages: list) -> None:
        """Render the first attempt up front: a bad tool message (400) or a prompt that does
        not fit (400) is a plain HTTP error, even for a stream."""
        self._first_ids = await self.render(messages)
        self.first_max = self._max_tokens(len(self._first_ids))

    async def submit(self, convo: list) -> eng.Request:
        self.attempt += 1
        if self.attempt == 1 and self._first_ids is not None:
            ids, max_tokens = self._first_ids, self.first_max
        else:
            ids = await self.render(convo)
            max_tokens = min(self.first_max, self.state.context_length - len(ids))
            if max_tokens < 1:
                raise ToolCallFailed("the corrective retry no longer fits the model's context", ["length"])
        params = self.body.sampling(max_tokens, False, 0)
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise APIError(504, f"request timed out after {self.state.request_timeout:g}s", code="timeout")
        req = eng.Request(f"{self.rid}.{self.attempt}", ids, params, remaining, asyncio.get_running_loop(),
                          asyncio.Queue(), constraint=self.plan.constraint)
        try:
            self.e.submit(req)
        except eng.QueueFull as exc:
            raise APIError(503, str(exc), code="server_busy", headers={"Retry-After": "1"}) from exc
        except eng.NotReady as exc:
            raise APIError(503, str(exc), code="model_loading", headers={"Retry-After": "2"}) from exc
        return req

    async def events(self, req: eng.Request, poll: bool):
        """The request's events up to its final one; cancels it in the engine if abandoned."""
        done = False
        try:
            while True:
                if poll:
                    try:
                        ev = await asyncio.wait_for(req.events.get(), DISCONNECT_POLL_S)
                    except asyncio.TimeoutError:
                        if await self.request.is_disconnected():
                            raise ClientGone() from None
                        continue
                else:
                    ev = await req.events.get()
                if not isinstance(ev, eng.Delta):
                    done = True
                    self.usage.add(req, ev)
                yield ev
                if done:
                    return
        finally:
            if not done:
                self.e.cancel(req.rid)

    @staticmethod
    def generation(text: str, final) -> Generation:
        if isinstance(final, eng.Error):
            if final.kind != "numerical":
                raise APIError(_ERROR_STATUS.get(final.kind, 500), final.message, code=final.kind)
            return Generation(text, "stop", "numerical")
        reason = "length" if final.reason == "length" else "stop"
        return Generation(text, reason, final.problem, constraint_error=final.constraint_error,
                          closed_early=final.closed_early)

    async def generate(self, convo: list) -> Generation:
        """One attempt, collected (the ``generate`` of ``loop.complete``)."""
        req = await self.submit(convo)
        texts: list[str] = []
        final = None
        watch = self.watch()
        async with contextlib.aclosing(self.events(req, poll=True)) as evs:
            async for ev in evs:
                if isinstance(ev, eng.Delta):
                    texts.append(ev.text)
                    if watch is not None and not watch.repeated:
                        watch.push(ev.text)
                        if watch.repeated:
                            self.e.cancel(req.rid)  # a repeated call: the reply is complete
                else:
                    final = ev
        text = "".join(texts)
        if watch is not None and watch.repeated:
            text = text[:watch.accepted_end]
        return self.generation(text, final)

    def watch(self) -> ToolStream | None:
        """A parser that notices a repeated call (parallel calls on), to stop generating."""
        t = self.task
        if t.fmt is not None or not t.tools or t.choice.mode == "none":
            return None
        return ToolStream(t.family, check=self.check, max_calls=None if t.parallel else 1)

    def check(self, call) -> tuple[str, str] | None:
        """Per-call validation for ``ToolStream``: the call must be allowed and valid."""
        t = self.task
        if t.choice.mode == "none":
            return loop.CALL_NOT_ALLOWED, "tool_choice is 'none', so the reply must not call a function"
        err = validate.check_call(call, {x.name: x for x in t.tools})
        if err is None and t.choice.mode == "function" and call.name != t.choice.name:
            err = (validate.UNKNOWN_TOOL, f"called {call.name!r}, but {t.choice.name!r} was required")
        return err


def failed_error(exc: ToolCallFailed) -> APIError:
    return APIError(500, str(exc), code="tool_call_failed", headers=NO_RETRY)


async def complete(run: Run, messages: list, shapes: ChatShapes) -> dict:
    """The non-streamed reply (raises ``APIError`` / ``ClientGone``)."""
    try:
        out = await loop.complete(run.generate, messages, run.task, stats=run.stats)
    except ToolCallFailed as exc:
        log.warning("%s: no valid %s after %d attempt(s): %s", run.rid,
                    "JSON output" if run.task.fmt else "tool call", run.attempt, ",".join(exc.attempts))
        raise failed_error(exc) from None
    if out.degraded:
        run.degraded = out.causes[-1]
    return shapes.message(out.content, out.tool_calls, out.finish_reason, run.usage.finish(out.finish_reason))


async def stream(run: Run, messages: list, shapes: ChatShapes, include_usage: bool):
    """SSE chunks of the streamed reply; see the module docstring for the policy."""
    yield sse(shapes.first())
    task = run.task
    convo = list(messages)
    causes: list[str] = []
    last = ""
    fallback = None  # a valid JSON reply whose looping value the constraint cut short (loop.complete)

    def done(reason: str, result: str):
        run.stats.add(result)
        fin = run.usage.finish(reason)
        run.account("200", fin)
        yield sse(shapes.finish(reason))
        if include_usage:
            yield sse(shapes.usage_chunk(fin))
        yield SSE_DONE

    try:
        for attempt in range(1, loop.DEFAULT_MAX_ATTEMPTS + 1):
            run.stats.add("attempt")
            req = await run.submit(convo)
            ts = None if task.fmt is not None else ToolStream(
                task.family, check=run.check, max_calls=None if task.parallel else 1)
            texts: list[str] = []
            final = None
            async with contextlib.aclosing(run.events(req, poll=False)) as evs:
                async for ev in evs:
                    if isinstance(ev, eng.Delta):
                        texts.append(ev.text)
                        if ts is not None and not ts.repeated:
                            for chunk in _chunks(shapes, ts.push(ev.text)):
                                yield chunk
                            if ts.repeated:
                                run.e.cancel(req.rid)  # a repeated call: the reply is complete
                    else:
                        final = ev
            gen = run.generation("".join(texts), final)
            if ts is not None and not ts.repeated:
                for chunk in _chunks(shapes, ts.finish()):
                    yield chunk
                reason, err = _judge_stream(task, gen, ts)
            else:
                outcome, err = loop.judge(task, gen)
                if err is None and gen.closed_early:
                    fallback, err = outcome, loop.CLOSED_EARLY[gen.closed_early]
                if err is None:
                    yield sse(shapes.content(outcome.content))
                    reason = outcome.finish_reason
            if err is None:
                # sent tool calls are final, even when the constraint cut a loop short in them
                result = "degraded" if gen.closed_early else "rescued" if causes else "ok"
                for chunk in done(reason, result):
                    yield chunk
                return
            cause, last = err
            causes.append(cause)
            if attempt < loop.DEFAULT_MAX_ATTEMPTS:
                run.stats.add("retry", cause)
                convo = loop.correction(messages, gen.text, task, last)
        if fallback is not None:
            yield sse(shapes.content(fallback.content))
            for chunk in done(fallback.finish_reason, "degraded"):
                yield chunk
            return
        run.stats.add("failed", causes[-1])
        raise ToolCallFailed(
            f"the model produced no valid {'JSON output' if task.fmt else 'tool call'} in "
            f"{loop.DEFAULT_MAX_ATTEMPTS} attempt(s); last error: {last}", causes)
    except ToolCallFailed as exc:
        log.warning("%s: streamed request failed after %d attempt(s): %s", run.rid, run.attempt,
                    ",".join(exc.attempts))
        run.account("500", None)
        yield sse(error_body(500, str(exc), None, "tool_call_failed"))
    except APIError as exc:
        run.account(str(exc.status), None)
        yield sse(error_body(exc.status, exc.message, exc.param, exc.code))


def _judge_stream(task: loop.Task, gen: Generation, ts: ToolStream):
    """``(finish_reason, None)`` or ``(None, (cause, message))`` for a streamed attempt."""
    if ts.calls:
        return "tool_calls", None
    if gen.problem is not None:
        return None, loop.judge(task, gen)[1]
    if ts.failures:
        if gen.finish_reason == "length":
            return None, ("length", "max_tokens ended the reply in the middle of a tool call")
        return None, ts.failures[-1]
    if task.wants_calls:
        if gen.finish_reason == "length":
            return None, ("length", "max_tokens ended the reply before a tool call was complete")
        return None, (validate.NO_CALL, "the reply did not call a function")
    return gen.finish_reason, None


def _chunks(shapes: ChatShapes, events: list):
    """One chunk per event, as OpenAI sends them (a call: id + name, then its arguments)."""
    for ev in events:
        if isinstance(ev, ContentDelta):
            yield sse(shapes.content(ev.text))
        else:
            yield sse(shapes.tool_calls([ev.openai()]))
