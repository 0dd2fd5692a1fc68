"""Ollama API request bodies (``/api/chat``, ``/api/generate``, ``/api/show``) as pydantic models.

Field names, defaults and meanings follow Ollama's docs/api.md and its Go types
(``api/types.go``). Validated before any tokenization; unknown fields (also
unknown ``options``) are a 400 naming them. ``options`` that would change the
output and that Squish cannot honour (mirostat, tfs_z, typical_p, a
``repeat_last_n`` other than the penalty window, ``penalize_newline: false``
with a penalty on) are a 400 naming the option, except at the value that
turns them off; performance-only options (num_thread, num_gpu, num_batch,
use_mmap, ...) are accepted and have no effect (docs/api-ollama.md).

Where Ollama's defaults differ from OpenAI's, an absent option takes Ollama's
documented default (docs/modelfile.mdx): temperature 0.8, top_k 40, top_p 0.9,
min_p 0, repeat_penalty 1 (off), num_predict -1 (no limit: as much as fits,
up to the server's ``--max-tokens``). ``to_job`` gives the core's request.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from squish.api.common import UnsupportedParameter
from squish.runtime.sampling import MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY, \
    REPETITION_CONTEXT, SamplingParams
from squish.serving.request import Job, Message, Reasoning, ToolCallPart, check_stops
from squish.tools import spec

STRICT = ConfigDict(extra="forbid", strict=True)

# Ollama's defaults for options a request leaves out (api.DefaultOptions, docs/modelfile.mdx).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.9
THINK_LEVELS = ("low", "medium", "high", "max")
# A Go duration ("5m", "1h30m", "-1s") or a plain number of seconds, as keep_alive takes it.
_AMOUNT = r"(\d+(?:\.\d*)?|\.\d+)"
_UNIT = r"(ns|us|µs|ms|s|m|h)"
_DURATION = re.compile(rf"^-?(?:{_AMOUNT}{_UNIT})+$")
_NUMBER = re.compile(rf"^-?{_AMOUNT}$")


def keep_alive_seconds(value: int | float | str) -> float:
    """``keep_alive`` in seconds (negative: forever), or ValueError for a malformed one."""
    if isinstance(value, (int, float)):
        return float(value)
    s = value.strip()
    if _NUMBER.match(s):
        return float(s)
    if not _DURATION.match(s):
        raise ValueError(value)
    scale = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    sign = -1.0 if s.startswith("-") else 1.0
    return sign * sum(float(n) * scale[u] for n, u in re.findall(_AMOUNT + _UNIT, s))


class OllamaOptions(BaseModel):
    """``options`` (Ollama's Modelfile parameters), as far as Squish honours them."""

    model_config = STRICT
    # Honoured.
    num_predict: int | None = None
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, ge=0.0, le=10.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    num_ctx: int | None = Field(default=None, ge=1)
    repeat_last_n: int | None = Field(default=None, ge=-1)
    penalize_newline: bool | None = None
    # Would change the output: accepted only at the value that turns them off.
    mirostat: int | None = None
    mirostat_tau: float | None = None  # only read by mirostat
    mirostat_eta: float | None = None
    tfs_z: float | None = None
    typical_p: float | None = None
    vocab_only: bool | None = None
    embedding_only: bool | None = None
    # Performance / memory only: accepted, no effect on the output.
    num_keep: int | None = None  # tokens kept when a context shifts; Squish never shifts (an overflow is a 400)
    numa: bool | None = None
    num_batch: int | None = None
    num_gpu: int | None = None
    main_gpu: int | None = None
    low_vram: bool | None = None
    f16_kv: bool | None = None
    logits_all: bool | None = None
    use_mmap: bool | None = None
    use_mlock: bool | None = None
    num_thread: int | None = None
    draft_num_predict: int | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return check_stops(v, "options.stop")

    @model_validator(mode="after")
    def _unsupported(self):
        def no(name: str, why: str):
            raise UnsupportedParameter(f"options.{name}", f"options.{name} {why}")

        if self.num_predict is not None and (self.num_predict == 0 or self.num_predict < -2):
            no("num_predict", "must be a positive number of tokens, -1 (no limit) or -2 (fill the context)")
        if self.repeat_penalty is not None and 0 < self.repeat_penalty < MIN_REPETITION_PENALTY:
            no("repeat_penalty", f"must be 0 (off), 1 (off) or between {MIN_REPETITION_PENALTY} and 10")
        if self.mirostat not in (None, 0):
            no("mirostat", "(Mirostat sampling) is not supported; send 0 or leave it out, and use "
               "temperature / top_p / top_k / min_p")
        if self.tfs_z not in (None, 1.0):
            no("tfs_z", "(tail-free sampling) is not supported; send 1 (off) or leave it out")
        if self.typical_p not in (None, 1.0):
            no("typical_p", "(locally typical sampling) is not supported; send 1 (off) or leave it out")
        if self.vocab_only or self.embedding_only:
            no("vocab_only" if self.vocab_only else "embedding_only", "is not supported: this server "
               "loads the whole model to generate text")
        penalised = self.penalties_active()
        if penalised and self.repeat_last_n not in (None, REPETITION_CONTEXT, 0):
            no("repeat_last_n", f"{self.repeat_last_n} is not supported: penalties look back over the last "
               f"{REPETITION_CONTEXT} tokens; send {REPETITION_CONTEXT}, 0 (penalties off) or leave it out")
        if penalised and self.penalize_newline is False:
            no("penalize_newline", "false is not supported: penalties apply to every token, newlines included; "
               "leave it out or send true")
        return self

    def penalties_active(self) -> bool:
        """Whether a repeat / presence / frequency penalty changes the output."""
        return self.repeat_penalty not in (None, 0, 1.0) or bool(self.presence_penalty) \
            or bool(self.frequency_penalty)

    def max_tokens(self) -> int | None:
        """num_predict as the core's max_tokens (None: as much as fits, -1 and -2 alike)."""
        return self.num_predict if self.num_predict is not None and self.num_predict > 0 else None

    def sampling(self, logprobs: bool = False, top_logprobs: int = 0) -> SamplingParams:
        off = self.repeat_last_n == 0  # Ollama: 0 turns the penalties off
        rep = self.repeat_penalty
        stop = () if self.stop is None else ((self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        return SamplingParams(
            temperature=DEFAULT_TEMPERATURE if self.temperature is None else self.temperature,
            top_p=DEFAULT_TOP_P if self.top_p is None else (self.top_p or 1.0),  # Ollama: top_p 0 is off
            top_k=DEFAULT_TOP_K if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            seed=self.seed if self.seed is not None and self.seed >= 0 else None,  # Ollama: -1 is random
            presence_penalty=0.0 if off else (self.presence_penalty or 0.0),
            frequency_penalty=0.0 if off else (self.frequency_penalty or 0.0),
            repetition_penalty=1.0 if off or not rep else rep,  # Ollama: 0 is off
            stop=stop, logprobs=logprobs, top_logprobs=top_logprobs,
        )


# ---- messages ------------------------------------------------------------------------------

class OllamaToolCallFunction(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64)
    arguments: dict[str, Any] | str = Field(default_factory=dict)  # an object, as Ollama sends it
    index: int | None = None


class OllamaToolCall(BaseModel):
    """An assistant message's ``tool_calls`` entry, as a client sends it back."""

    model_config = STRICT
    id: str | None = Field(default=None, max_length=256)
    type: Literal["function"] | None = None
    function: OllamaToolCallFunction

    def arguments_json(self, where: str) -> str:
        args = self.function.arguments
        if isinstance(args, str):  # JSON text (OpenAI's habit); must still be an object
            try:
                args = json.loads(args) if args.strip() else {}
            except ValueError as exc:
                raise UnsupportedParameter(where, f"{where} is not valid JSON: {exc}") from None
            if not isinstance(args, dict):
                raise UnsupportedParameter(where, f"{where} must be a JSON object")
        return json.dumps(args, ensure_ascii=False)


class OllamaMessage(BaseModel):
    """A message of ``/api/chat`` (role, content, thinking, images, tool_calls, tool_name)."""

    model_config = STRICT
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None  # absent / null: "" (Ollama's Go type is a plain string)
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = Field(default=None, min_length=1, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=256)

    @field_validator("role", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v  # Ollama lowercases roles

    @model_validator(mode="after")
    def _shape(self):
        if self.images:
            raise UnsupportedParameter("messages.images", "images are not supported: this server serves "
                                       "text-only models")
        if self.thinking is not None and self.role != "assistant":
            raise UnsupportedParameter("messages.thinking", "only assistant messages may carry thinking")
        if self.tool_calls and self.role != "assistant":
            raise UnsupportedParameter("messages.tool_calls", "only assistant messages may carry tool_calls")
        for name in ("tool_name", "tool_call_id"):
            if self.role != "tool" and getattr(self, name) is not None:
                raise UnsupportedParameter(f"messages.{name}", f"only tool messages may carry {name}")
        return self


def to_messages(messages: list[OllamaMessage]) -> list[Message]:
    """The core's messages. A tool message names the function it answers (``tool_name``);
    without it, the i-th tool message after an assistant turn answers that turn's i-th call,
    as Ollama's own templates read them."""
    out: list[Message] = []
    calls: list[tuple[str | None, str]] = []  # (id, name) of the last assistant turn's calls
    ids: set[str] = set()  # call ids seen so far
    answered = 0
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if m.role == "assistant":
            parts = [ToolCallPart(c.id, c.function.name,
                                  c.arguments_json(f"{where}.tool_calls[{j}].function.arguments"))
                     for j, c in enumerate(m.tool_calls or ())]
            calls, answered = [(c.id, c.name) for c in parts], 0
            ids.update(c.id for c in parts if c.id)
            out.append(Message("assistant", m.content or "", tool_calls=parts, reasoning=m.thinking or None))
            continue
        if m.role != "tool":
            out.append(Message(m.role, m.content or ""))
            continue
        name, call_id = m.tool_name, m.tool_call_id if m.tool_call_id in ids else None
        if name is None and call_id is None:
            if answered >= len(calls):
                raise UnsupportedParameter(f"{where}.tool_name", f"{where}.tool_name is required: the tool "
                                           "message does not follow an assistant message's tool call it could answer")
            call_id, name = calls[answered]
        elif name is not None and call_id is None and name not in _earlier_names(out):
            raise UnsupportedParameter(f"{where}.tool_name", f"{where}.tool_name {name!r} does not match a tool "
                                       "call of an earlier assistant message")
        answered += 1
        out.append(Message("tool", m.content or "", name=name, tool_call_id=call_id))
    return out


def _earlier_names(messages: list[Message]) -> set[str]:
    return {c.name for m in messages for c in m.tool_calls}


# ---- requests ------------------------------------------------------------------------------

class _Generation(BaseModel):
    """Fields ``/api/chat`` and ``/api/generate`` share."""

    model_config = STRICT
    model: str = Field(min_length=1, max_length=256)
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: OllamaOptions | None = None
    keep_alive: int | float | str | None = None  # accepted; the model stays loaded (docs/api-ollama.md)
    think: bool | str | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Ollama's context-overflow handling; Squish never truncates or shifts (an overflow is a 400).
    truncate: bool | None = None
    shift: bool | None = None

    @model_validator(mode="after")
    def _common(self):
        if isinstance(self.think, str) and self.think not in THINK_LEVELS:
            raise UnsupportedParameter("think", f"invalid think value {self.think!r}: send true, false, "
                                       "\"low\", \"medium\", \"high\" or \"max\"")
        if isinstance(self.format, str) and self.format not in ("", "json"):
            raise UnsupportedParameter("format", f"format must be \"json\" or a JSON Schema object, "
                                       f"got {self.format!r}")
        if self.keep_alive is not None:
            try:
                keep_alive_seconds(self.keep_alive)
            except ValueError:
                raise UnsupportedParameter("keep_alive", f"keep_alive {self.keep_alive!r} is not a duration: "
                                           "send a number of seconds or a duration such as \"5m\"") from None
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedParameter("top_logprobs", "top_logprobs requires logprobs to be true")
        return self

    @property
    def opts(self) -> OllamaOptions:
        return self.options or OllamaOptions()

    def unload(self) -> bool:
        """An unload request (keep_alive 0 and nothing to generate)."""
        return self.keep_alive is not None and keep_alive_seconds(self.keep_alive) == 0

    @property
    def formatted(self) -> bool:
        """A ``format`` was asked for (``{}`` is a schema: any JSON value)."""
        return self.format is not None and self.format != ""

    def output(self) -> spec.OutputFormat | None:
        if not self.formatted:
            return None
        if self.format == "json":
            return spec.OutputFormat("json_object")
        return spec.OutputFormat("json_schema", spec.check_schema(self.format, "format"), "response")

    def reasoning(self) -> Reasoning:
        return Reasoning(None if self.think is None else bool(self.think), param="think")

    def _job(self, route: str, model: str, **kw) -> Job:
        o = self.opts
        return Job(route=route, model=model, sampling=o.sampling(self.logprobs, self.top_logprobs or 0),
                   max_tokens=o.max_tokens(), reasoning=self.reasoning(), context_limit=o.num_ctx,
                   max_tokens_param="options.num_predict", context_param="options.num_ctx", **kw)


class OllamaChatRequest(_Generation):
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None  # checked in depth by squish.tools.spec

    @model_validator(mode="after")
    def _chat(self):
        if self.tools and self.formatted:
            raise UnsupportedParameter("format", "format cannot be combined with tools: send one or the other")
        if self.logprobs and (self.tools or self.formatted):
            raise UnsupportedParameter("logprobs", "logprobs are not available with tools or format (the "
                                       "reply may come from a corrective retry)")
        return self

    def to_job(self, model: str) -> Job:
        """The core's request (``ToolRequestError`` for bad tools or format)."""
        tools = spec.parse_tools(self.tools)
        return self._job("ollama_chat", model, messages=to_messages(self.messages), tools=tools,
                         output=self.output())


class OllamaGenerateRequest(_Generation):
    prompt: str | None = None
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None
    # Image generation (Ollama's experimental image models): not served here.
    width: int | None = None
    height: int | None = None
    steps: int | None = None

    @model_validator(mode="after")
    def _generate(self):
        if self.suffix:
            raise UnsupportedParameter("suffix", "suffix (fill-in-the-middle) is not supported; send the text "
                                       "before the gap as the prompt")
        if self.template:
            raise UnsupportedParameter("template", "template is not supported: the model's own chat template "
                                       "is always used (send raw: true to pass a prompt without a template)")
        if self.context:
            raise UnsupportedParameter("context", "context (deprecated in Ollama) is not supported and never "
                                       "returned; send the conversation as messages to /api/chat")
        if self.images:
            raise UnsupportedParameter("images", "images are not supported: this server serves text-only models")
        for name in ("width", "height", "steps"):
            if getattr(self, name) is not None:
                raise UnsupportedParameter(name, f"{name} is for image generation models, which this server "
                                           "does not serve")
        if self.raw and self.system:
            raise UnsupportedParameter("system", "raw mode does not take a system prompt: write it into the prompt")
        if self.raw and self.think is not None:
            raise UnsupportedParameter("think", "think switches the chat template, which raw mode skips")
        if self.raw and self.formatted:
            raise UnsupportedParameter("format", "format needs the chat template, which raw mode skips; send "
                                       "raw: false (or use /api/chat)")
        if self.logprobs and self.formatted:
            raise UnsupportedParameter("logprobs", "logprobs are not available with format (the reply may come "
                                       "from a corrective retry)")
        return self

    def to_job(self, model: str) -> Job:
        if self.raw:
            return self._job("ollama_generate", model, prompt=self.prompt)
        messages = [Message("system", self.system)] if self.system else []
        messages.append(Message("user", self.prompt or ""))
        return self._job("ollama_generate", model, messages=messages, output=self.output())


class OllamaShowRequest(BaseModel):
    model_config = STRICT
    model: str | None = Field(default=None, min_length=1, max_length=256)
    name: str | None = Field(default=None, min_length=1, max_length=256)  # the older field name
    verbose: bool = False

    @model_validator(mode="after")
    def _named(self):
        if self.model is None and self.name is None:
            raise ValueError("model is required")
        return self
