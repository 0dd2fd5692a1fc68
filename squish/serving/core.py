"""``Core``: runs a ``Job`` on the engine and yields neutral events.

``prepare`` (a 400 / 404 / 503 before any work is queued) checks the job
against the served model and the server's limits, renders the prompt (chat
template, tools natively or through the fallback tool prompt, or a raw
prompt), compiles the output constraint, fixes ``max_tokens`` against the
context, and decides where a reasoning section starts. ``events`` runs the
attempt loop (``attempts.run_attempts``) on the engine: each attempt is one
engine request, cancelled at once when the consumer stops (a streamed client
went away) or, with ``is_gone``, when a whole reply's client disconnects
(polled every ``DISCONNECT_POLL_S``). ``complete`` is ``events`` collected.

Rendering and grammar compilation run on worker threads, never on the event
loop; MLX is only touched by the engine thread.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.concurrency import run_in_threadpool

from squish.runtime import engine as eng
from squish.runtime.prompts import PromptError, encode_chat, encode_text
from squish.serving import reasoning as rs
from squish.serving.attempts import run_attempts
from squish.serving.errors import ClientGone, ServeError, bad_request
from squish.serving.events import Done, Reply, collect
from squish.serving.request import Job, check_text, template_dicts
from squish.tools import budget, constraints, loop, registry, render
from squish.tools.errors import ToolRequestError
from squish.tools.spec import ToolChoice

DISCONNECT_POLL_S = 0.2
DEFAULT_ALIASES = ("default",)  # model names every route accepts for the served model


@dataclass
class Limits:
    """Caps applied to every request (``squish serve`` options)."""

    max_messages: int = 1024
    max_content_chars: int = 500_000
    max_tokens: int = 4096


@dataclass
class Plan:
    """A prepared job: everything ``events`` needs."""

    job: Job
    rid: str
    ids: list[int]  # the first attempt's prompt
    messages: list[dict] | None  # template messages (for corrective retries)
    task: loop.Task | None
    constraint: Any
    max_tokens: int
    deadline: float
    facts: Any
    template_kwargs: dict = field(default_factory=dict)
    done: Done | None = None  # set when the run ends (for the access log)
    last_prompt_len: int = 0
    min_tokens: int = 0  # the shortest constrained reply, in tokens (0: unconstrained)
    context: int = 0  # the context this job may use (the server's, or the job's smaller limit)
    # time.monotonic() when the first attempt went to the engine / its first token came back
    # (adapters that report durations, e.g. Ollama's prompt_eval_duration).
    submitted_at: float | None = None
    first_token_at: float | None = None


class Core:
    def __init__(self, engine, *, limits: Limits | None = None, request_timeout: float = 300.0,
                 stats: loop.ToolStats | None = None, context_override: Callable[[], int | None] | None = None):
        self.engine = engine
        self.limits = limits or Limits()
        self.request_timeout = request_timeout
        self.stats = stats or loop.STATS
        # The context the server allows (None: the model's own, from its config).
        self._context_override = context_override or (lambda: None)

    def context_length(self) -> int:
        return self._context_override() or self.model().facts.context_length

    def job_context(self, job: Job) -> int:
        """The context ``job`` may use: the server's, or the job's own smaller limit."""
        ctx = self.context_length()
        if job.context_limit is None:
            return ctx
        if job.context_limit > ctx:
            raise bad_request(f"{job.context_param} {job.context_limit} exceeds the model's context of {ctx} "
                              f"tokens; send at most {ctx}", job.context_param, "context_length_exceeded")
        return job.context_limit

    # ---- the served model ------------------------------------------------------------------
    def model(self):
        """The loaded model (``LoadedModel``), or a 503 while it loads / if it failed."""
        e = self.engine
        if not e.ready.is_set():
            if e.failed.is_set():
                raise ServeError(503, e.load_error or "model failed to load", code="model_unavailable")
            raise ServeError(503, "the model is still loading; retry shortly", code="model_loading",
                             headers={"Retry-After": "2"})
        return e.model_info

    def names(self) -> list[str]:
        """Names the served model answers to besides its own: ``default`` and its catalog name."""
        info = self.model()
        out = [info.name, *DEFAULT_ALIASES]
        catalog = ((info.manifest or {}).get("source") or {}).get("catalog")
        if catalog:
            out.append(catalog)
        return out

    def resolve_model(self, name: str, param: str = "model") -> str:
        """The served model's name for ``name``, or a 404 listing what is served."""
        info = self.model()
        if name in self.names():
            return info.name
        raise ServeError(404, f"model '{name}' is not served here; this server serves '{info.name}' "
                         "(also reachable as 'default')", param=param, code="model_not_found")

    # ---- prepare -----------------------------------------------------------------------------
    async def prepare(self, job: Job, rid: str) -> Plan:
        info = self.model()
        facts = info.facts
        self.resolve_model(job.model)
        self._check_limits(job)
        ctx = self.job_context(job)
        kwargs = self._template_kwargs(job, facts)
        task = constraint = None
        messages = template_dicts(job.messages) if job.messages is not None else None
        if job.messages is not None and job.structured:
            task, constraint = await run_in_threadpool(self._compile, job, info)
            ids = await self._render_tools(info.tokenizer, messages, task, kwargs)
        elif job.messages is not None:
            ids = await self._render(info.tokenizer, messages, kwargs, job.messages_param)
        else:
            ids = await self._raw_prompt(job, info)
        max_tokens = self._max_tokens(job, len(ids), ctx)
        need = 0
        if constraint is not None:
            need = await run_in_threadpool(self._check_budget, job, task, info.tokenizer, max_tokens)
        return Plan(job, rid, ids, messages, task, constraint, max_tokens,
                    time.monotonic() + self.request_timeout, facts, kwargs, min_tokens=need, context=ctx)

    async def count_tokens(self, job: Job) -> int:
        """The length in tokens of the chat prompt ``prepare`` would render for ``job`` (tools
        included); nothing is compiled or generated. Raises as ``prepare`` does (400 / 404 / 503)."""
        info = self.model()
        self.resolve_model(job.model)
        self._check_limits(job)
        kwargs = self._template_kwargs(job, info.facts)
        messages = template_dicts(job.messages or [])
        if job.structured:
            ids = await self._render_tools(info.tokenizer, messages, self._task(job, info), kwargs)
        else:
            ids = await self._render(info.tokenizer, messages, kwargs, job.messages_param)
        return len(ids)

    def _check_limits(self, job: Job) -> None:
        lim = self.limits
        if job.messages is not None:
            if len(job.messages) > lim.max_messages:
                raise bad_request(f"too many messages: {len(job.messages)} > {lim.max_messages}",
                                  job.messages_param, "too_many_messages")
            total = 0
            for i, m in enumerate(job.messages):
                where = f"{job.messages_param}[{i}]"
                for s in (m.content or "", m.reasoning or "", *(x for c in m.tool_calls for x in (c.name, c.arguments))):
                    _check_chars(s, where)
                    total += len(s)
            if total > lim.max_content_chars:
                raise bad_request(f"messages are too long: {total} characters > {lim.max_content_chars}",
                                  job.messages_param, "messages_too_long")
        elif isinstance(job.prompt, str):
            _check_chars(job.prompt, "prompt")
            if len(job.prompt) > lim.max_content_chars:
                raise bad_request(f"prompt is too long: {len(job.prompt)} characters > {lim.max_content_chars}",
                                  "prompt", "prompt_too_long")
        elif job.prompt is not None and len(job.prompt) > lim.max_content_chars:
            raise bad_request(f"prompt is too long: {len(job.prompt)} tokens", "prompt", "prompt_too_long")
        bias = job.sampling.logit_bias
        if bias:
            facts = self.model().facts
            bad = [k for k in bias if not 0 <= k < facts.vocab_size]
            if bad:
                raise bad_request(f"logit_bias token id {bad[0]} is outside the vocabulary [0, {facts.vocab_size})",
                                  "logit_bias", "invalid_value")
            control = sorted(k for k, v in bias.items() if v > 0 and k in facts.control_ids)
            if control:
                raise bad_request(f"logit_bias may not raise control token {control[0]} (a special token such as a "
                                  "turn marker); lowering it is allowed", "logit_bias", "invalid_value")
        if job.max_tokens is not None and job.max_tokens > lim.max_tokens:
            raise bad_request(f"{job.max_tokens_param} {job.max_tokens} exceeds this server's cap of "
                              f"{lim.max_tokens}", job.max_tokens_param, "max_tokens_too_large")

    @staticmethod
    def _template_kwargs(job: Job, facts) -> dict:
        want = job.reasoning.enabled
        if want is None and job.reasoning.budget_tokens is None:
            return {}
        p = job.reasoning.param
        if not facts.reasons:
            if want:
                raise bad_request("this model does not write a reasoning section, so thinking cannot be "
                                  "switched on", p, "reasoning_not_supported")
            return {}
        if want is None:
            return {}
        if facts.thinking_switch:
            return {"enable_thinking": bool(want)}
        if not want:
            raise bad_request("this model's chat template has no switch for its reasoning section, so "
                              "thinking cannot be switched off", p, "reasoning_not_supported")
        return {}

    @staticmethod
    def _task(job: Job, info) -> loop.Task:
        choice = job.tool_choice or ToolChoice("auto" if job.tools else "none")
        return loop.Task(registry.by_name(info.facts.tool_family), job.tools, choice,
                         job.parallel_tool_calls, job.output)

    def _compile(self, job: Job, info):
        """The tool / JSON task and its constraint (worker thread: llguidance compiles here)."""
        task = self._task(job, info)
        try:
            if job.output is not None:
                constraint = constraints.json_output(info.tokenizer, job.output)
            else:
                constraint = constraints.tool_calls(info.tokenizer, task.family, job.tools, task.choice,
                                                    job.parallel_tool_calls)
        except ToolRequestError as exc:
            raise bad_request(str(exc), exc.param) from exc
        return task, constraint

    async def _render(self, tok, messages: list[dict], kwargs: dict, param: str) -> list[int]:
        try:
            return await run_in_threadpool(encode_chat, tok, messages, **kwargs)
        except PromptError as exc:
            raise bad_request(str(exc), param) from exc

    async def _render_tools(self, tok, messages: list[dict], task: loop.Task, kwargs: dict) -> list[int]:
        try:
            return await run_in_threadpool(render.encode_chat, tok, messages, task.tools, task.choice,
                                           task.family, kwargs)
        except ToolRequestError as exc:
            raise bad_request(str(exc), exc.param) from exc

    async def _raw_prompt(self, job: Job, info) -> list[int]:
        if isinstance(job.prompt, str):
            ids = await run_in_threadpool(encode_text, info.tokenizer, job.prompt)
        else:
            vocab = info.facts.vocab_size
            if any(t < 0 or t >= vocab for t in job.prompt or ()):
                raise bad_request(f"prompt token ids must be in [0, {vocab})", "prompt")
            ids = list(job.prompt or ())
        if not ids:
            raise bad_request("the prompt encodes to zero tokens", "prompt")
        return ids

    def _max_tokens(self, job: Job, n_prompt: int, ctx: int) -> int:
        room = ctx - n_prompt
        what = (f"the model's context of {ctx} tokens" if job.context_limit is None
                else f"the context of {ctx} tokens that {job.context_param} asks for")
        if room <= 0:
            raise ServeError(400, f"the prompt is {n_prompt} tokens, which does not fit {what}",
                             param=job.messages_param, code="context_length_exceeded")
        if job.max_tokens is None:
            return min(self.limits.max_tokens, room)
        if job.max_tokens > room:
            raise ServeError(400, f"prompt ({n_prompt} tokens) + {job.max_tokens_param} ({job.max_tokens}) exceeds "
                             f"{what}; lower {job.max_tokens_param} to at most {room}",
                             param=job.max_tokens_param, code="context_length_exceeded")
        return job.max_tokens

    @staticmethod
    def _check_budget(job: Job, task: loop.Task, tok, max_tokens: int) -> int:
        """A reply the grammar demands cannot fit a budget below its shortest form: say so now.
        Returns that shortest form's length in tokens."""
        need = budget.min_tokens(tok, task.family, task.tools, task.choice, task.fmt)
        if need and max_tokens < need:
            what = "JSON reply" if task.fmt is not None else "tool call"
            raise bad_request(f"{job.max_tokens_param} {max_tokens} is below the {need} tokens the shortest "
                              f"valid {what} needs; raise {job.max_tokens_param} to at least {need}",
                              job.max_tokens_param, "max_tokens_too_small")
        return need

    # ---- run ---------------------------------------------------------------------------------
    def _gate(self, plan: Plan, ids: list[int], constraint):
        """Wrap the constraint so it starts after a reasoning section (or None / unchanged)."""
        facts, r = plan.facts, plan.job.reasoning
        state = rs.start_state(ids, facts)
        if state == "answer" or (constraint is None and r.budget_tokens is None):
            return constraint, state
        reserve = 0
        if constraint is not None:  # what the answer needs, plus a margin when the budget allows
            reserve = min(plan.min_tokens + rs.ANSWER_RESERVE, max(plan.min_tokens + 2, plan.max_tokens // 2))
        return rs.GatedConstraint(constraint, facts, state, budget_tokens=r.budget_tokens,
                                  reserve=reserve), state

    async def events(self, plan: Plan, is_gone: Callable[[], Awaitable[bool]] | None = None) -> AsyncIterator:
        info = self.model()
        facts = plan.facts
        states: list[str] = []

        async def generate(convo: list) -> AsyncIterator:
            if not states:
                ids, max_tokens = plan.ids, plan.max_tokens
            else:
                ids = await self._render_tools(info.tokenizer, convo, plan.task, plan.template_kwargs)
                max_tokens = min(plan.max_tokens, (plan.context or self.context_length()) - len(ids))
                if max_tokens < 1:
                    raise ServeError(500, "the corrective retry no longer fits the model's context",
                                     code="tool_call_failed")
            constraint, state = self._gate(plan, ids, plan.constraint)
            states.append(state)
            plan.last_prompt_len = len(ids)
            async for ev in self._submit(plan, ids, max_tokens, constraint, len(states), is_gone):
                yield ev

        def splitter():  # called at an attempt's first event, after generate() decided the state
            if not facts.reasons or not states or states[-1] == "answer":
                return None
            return rs.ReasoningSplitter(facts.think_start, facts.think_end, states[-1])

        async for ev in run_attempts(generate, plan.messages or [], plan.task, splitter=splitter,
                                     stats=self.stats, prompt_len=lambda: plan.last_prompt_len):
            if isinstance(ev, Done):
                plan.done = ev
            yield ev

    async def _submit(self, plan: Plan, ids: list[int], max_tokens: int, constraint, attempt: int,
                      is_gone) -> AsyncIterator:
        remaining = plan.deadline - time.monotonic()
        if remaining <= 0:
            raise ServeError(504, f"request timed out after {self.request_timeout:g}s", code="timeout")
        params = _with_max_tokens(plan.job.sampling, max_tokens)
        rid = plan.rid if attempt == 1 else f"{plan.rid}.{attempt}"
        req = eng.Request(rid, ids, params, remaining, asyncio.get_running_loop(), asyncio.Queue(),
                          constraint=constraint)
        try:
            self.engine.submit(req)
        except eng.QueueFull as exc:
            raise ServeError(503, str(exc), code="server_busy", headers={"Retry-After": "1"}) from exc
        except eng.NotReady as exc:
            raise ServeError(503, str(exc), code="model_loading", headers={"Retry-After": "2"}) from exc
        if plan.submitted_at is None:
            plan.submitted_at = time.monotonic()
        done = False
        next_poll = time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                if is_gone is None:
                    ev = await req.events.get()
                else:
                    # Polled on a clock, not only when the engine is quiet: a fast model's
                    # tokens arrive more often than the poll period.
                    ev = await _next_event(req.events, next_poll - time.monotonic())
                    if time.monotonic() >= next_poll:
                        if await is_gone():
                            raise ClientGone()
                        next_poll = time.monotonic() + DISCONNECT_POLL_S
                    if ev is None:
                        continue
                done = not isinstance(ev, eng.Delta)
                if plan.first_token_at is None and not done:
                    plan.first_token_at = time.monotonic()
                yield ev
                if done:
                    return
        finally:
            if not done:
                self.engine.cancel(req.rid)

    async def complete(self, plan: Plan, is_gone: Callable[[], Awaitable[bool]] | None = None) -> Reply:
        """The whole reply (raises ``ServeError``, or ``ClientGone`` when ``is_gone`` says so)."""
        return await collect(self.events(plan, is_gone))


async def _next_event(queue: asyncio.Queue, wait_s: float):
    """The next engine event, or None when none came within ``wait_s``."""
    try:
        return queue.get_nowait()
    except asyncio.QueueEmpty:
        pass
    try:
        return await asyncio.wait_for(queue.get(), max(wait_s, 0.001))
    except asyncio.TimeoutError:
        return None


def _with_max_tokens(params, max_tokens: int):
    from dataclasses import replace

    return replace(params, max_tokens=max_tokens)


def _check_chars(text: str, where: str) -> None:
    try:
        check_text(text, where)
    except ValueError as exc:
        raise bad_request(str(exc), where, "invalid_characters") from None
