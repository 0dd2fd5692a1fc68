"""OpenAI Chat Completions / Completions request bodies as pydantic models.

Validated before any tokenization. Unknown fields are rejected
(``extra="forbid"``) rather than ignored; known OpenAI fields whose feature
Squish does not implement are accepted only at the value that means "off"
(``n=1``, ...), anything else is a 400 naming the parameter. Bookkeeping
fields that cannot change the output (``user``, ``metadata``, ``store``,
``safety_identifier``, ``prompt_cache_key``, ``service_tier`` auto/default)
are accepted and have no effect (docs/api.md). Types are strict (``"8"`` is
not a number; ``8.0`` is an integer, as in JSON Schema: ``common.JSONRoute``).
Type/range problems are 422. ``squish.api.errors`` maps pydantic's errors
onto those codes. ``to_job`` gives the core's request.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from squish.api.common import UnsupportedParameter
from squish.runtime.sampling import MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, MIN_REPETITION_PENALTY, SamplingParams
from squish.serving.request import Job, Message, Reasoning, ToolCallPart, check_stops
from squish.tools import spec

STRICT = ConfigDict(extra="forbid", strict=True)
EFFORT_OFF = ("none", "minimal")  # reasoning efforts that switch a thinking section off


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


def _text_parts(value):
    """Content parts other than text (images, audio, files) are a 400, not a type error."""
    if isinstance(value, list):
        for p in value:
            if isinstance(p, dict) and p.get("type") not in (None, "text"):
                raise UnsupportedParameter("messages.content", f"content parts of type {p.get('type')!r} are "
                                           "not supported: this server's models read text only")
    return value


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class FunctionCall(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCall(BaseModel):
    """An assistant message's ``tool_calls`` entry (as a client sends it back)."""

    model_config = STRICT
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A message as the OpenAI API defines it.

    ``name`` (optional participant name, allowed on system / developer / user
    / assistant messages) is passed to the chat template, which renders it if
    it uses it; the API defines it as optional metadata, so a template without
    it simply does not show it. Assistant messages may carry ``tool_calls``
    (then ``content`` may be null); ``tool`` messages need ``tool_call_id``.
    """

    model_config = STRICT
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, pattern=NAME_PATTERN)
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)
    # An earlier reply's reasoning, as clients of reasoning models send it back (an extension);
    # the chat template shows it if it uses it.
    reasoning_content: str | None = None

    _parts = field_validator("content", mode="before")(_text_parts)

    @model_validator(mode="after")
    def _shape(self):
        if self.reasoning_content is not None and self.role != "assistant":
            raise UnsupportedParameter("messages.reasoning_content", "only assistant messages may carry "
                                       "reasoning_content")
        if self.tool_calls is not None and self.role != "assistant":
            raise UnsupportedParameter("messages.tool_calls", "only assistant messages may carry tool_calls")
        if self.role == "tool":
            if self.tool_call_id is None:
                raise UnsupportedParameter("messages.tool_call_id", "tool messages need a tool_call_id")
            if self.name is not None:
                raise UnsupportedParameter("messages.name", "tool messages do not take a name")
        elif self.tool_call_id is not None:
            raise UnsupportedParameter("messages.tool_call_id", "only tool messages may carry tool_call_id")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise UnsupportedParameter("messages.content",
                                       f"{self.role} messages need content (only an assistant message "
                                       "with tool_calls may omit it)")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def to_message(self) -> Message:
        """The core's message (``developer`` is the system role of newer OpenAI models)."""
        role = "system" if self.role == "developer" else self.role
        calls = [ToolCallPart(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ()]
        return Message(role, None if self.content is None else self.text(), name=self.name, tool_calls=calls,
                       tool_call_id=self.tool_call_id, reasoning=self.reasoning_content)


# What the validators below enforce, in the served OpenAPI document too (JSON Schema cannot
# say "no lone surrogates"; that stays a 400/422 the document does not name).
_NO_CONTROL = "^[^\\u0000-\\u0008\\u000b\\u000c\\u000e-\\u001f\\u007f]*$"
_STOP_ITEM = {"type": "string", "minLength": 1, "maxLength": 256, "pattern": _NO_CONTROL}
STOP_DOC = {"anyOf": [_STOP_ITEM, {"type": "array", "items": _STOP_ITEM, "maxItems": MAX_STOP_STRINGS},
                      {"type": "null"}]}
LOGIT_BIAS_DOC = {"anyOf": [{"type": "object", "maxProperties": 1024, "propertyNames": {"pattern": "^-?[0-9]+$"},
                             "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}},
                            {"type": "null"}]}
PROMPT_DOC = {"anyOf": [{"type": "string", "minLength": 1},
                        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
                        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}]}

TOKEN_ID = re.compile(r"-?[0-9]+")  # a logit_bias key (str.isdigit also takes "²" and "٣", which int() refuses)

Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]


class _Common(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    min_p: Probability = 0.0
    repetition_penalty: float = Field(default=1.0, ge=MIN_REPETITION_PENALTY, le=10.0)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = Field(
        default=None, json_schema_extra=LOGIT_BIAS_DOC)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = Field(default=None, json_schema_extra=STOP_DOC)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # Bookkeeping: accepted, no effect on the output (docs/api.md).
    user: str | None = Field(default=None, max_length=256)
    metadata: dict[str, str] | None = None
    store: bool | None = None
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    service_tier: Literal["auto", "default"] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        return check_stops(v, "stop")

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return v
        if len(v) > 1024:
            raise ValueError("logit_bias is limited to 1024 entries")
        for k in v:
            if not TOKEN_ID.fullmatch(k):
                raise ValueError(f"logit_bias keys must be token ids, got {k!r}")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.n != 1:
            raise UnsupportedParameter("n", "n > 1 is not supported; send separate requests")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedParameter("stream_options", "stream_options is only allowed when stream is true")
        return self

    def stop_tuple(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def sampling(self, logprobs: bool, top_logprobs: int) -> SamplingParams:
        """Sampling parameters (``max_tokens`` is filled in by the core)."""
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
            stop=self.stop_tuple(),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
        )


# Request examples in the served OpenAPI document (/docs shows them; the reliability fuzz
# sends them in its examples phase). "default" names the served model on every route.
CHAT_EXAMPLES = [
    {"model": "default", "messages": [{"role": "user", "content": "List three fruits."}], "max_tokens": 16},
    {"model": "default", "messages": [{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Name a colour."}],
     "max_tokens": 8, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}},
    {"model": "default", "messages": [{"role": "user", "content": "Weather in Paris?"}], "max_tokens": 48,
     "tools": [{"type": "function", "function": {
         "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                               "required": ["city"]}}}],
     "tool_choice": "required", "temperature": 0},
    {"model": "default", "messages": [{"role": "user", "content": "A fruit as JSON."}], "max_tokens": 32,
     "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "fruit", "schema": {
         "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}},
]
COMPLETION_EXAMPLES = [
    {"model": "default", "prompt": "The capital of France is", "max_tokens": 8},
    {"model": "default", "prompt": "Once upon a time", "max_tokens": 8, "stream": True, "seed": 1},
]


class ChatRequest(_Common):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": CHAT_EXAMPLES})

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    # Checked in depth by squish.tools.spec (a bad schema or name is a 400 naming the field).
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    # Reasoning models: "none" and "minimal" switch the thinking section off, any other effort
    # on (the chat templates Squish serves have an on/off switch only; docs/api.md).
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _chat_unsupported(self):
        structured = bool(self.tools) and self.tool_choice != "none"
        fmt = self.response_format is not None and self.response_format.get("type") != "text"
        if structured and fmt:
            raise UnsupportedParameter(
                "response_format", "response_format json_object/json_schema cannot be combined with tools "
                "unless tool_choice is 'none'; send one or the other")
        if self.parallel_tool_calls is not None and not self.tools:
            raise UnsupportedParameter("parallel_tool_calls", "parallel_tool_calls is only allowed when tools are given")
        if self.logprobs and (structured or fmt):
            raise UnsupportedParameter(
                "logprobs", "logprobs are not available with tools or response_format (the reply may come "
                "from a corrective retry); drop logprobs or send a plain chat request")
        if self.top_logprobs is not None and not self.logprobs:
            raise UnsupportedParameter("top_logprobs", "top_logprobs requires logprobs to be true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            if self.max_tokens != self.max_completion_tokens:
                raise UnsupportedParameter(
                    "max_completion_tokens", "max_tokens and max_completion_tokens disagree; send one"
                )
        for key, value in (self.chat_template_kwargs or {}).items():
            if key != "enable_thinking":
                raise UnsupportedParameter(
                    "chat_template_kwargs", f"chat_template_kwargs.{key} is not supported: only "
                    "enable_thinking (a boolean) may be set; the rest of the template is the model's")
            if not isinstance(value, bool):
                raise UnsupportedParameter("chat_template_kwargs", "chat_template_kwargs.enable_thinking "
                                           "must be a boolean")
        if self.reasoning_effort is not None and self.chat_template_kwargs:
            want = self.reasoning_effort not in EFFORT_OFF
            if self.chat_template_kwargs.get("enable_thinking", want) != want:
                raise UnsupportedParameter("reasoning_effort", "reasoning_effort and "
                                           "chat_template_kwargs.enable_thinking disagree; send one")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def reasoning(self) -> Reasoning:
        if self.reasoning_effort is not None:
            return Reasoning(self.reasoning_effort not in EFFORT_OFF, param="reasoning_effort")
        if self.chat_template_kwargs and "enable_thinking" in self.chat_template_kwargs:
            return Reasoning(self.chat_template_kwargs["enable_thinking"], param="chat_template_kwargs")
        return Reasoning()

    def to_job(self) -> Job:
        """The core's request (``ToolRequestError`` for bad tools / tool_choice / response_format)."""
        tools = spec.parse_tools(self.tools)
        choice = spec.parse_tool_choice(self.tool_choice, tools) if self.tool_choice is not None else None
        return Job(
            route="chat", model=self.model, messages=[m.to_message() for m in self.messages],
            tools=tools, tool_choice=choice, parallel_tool_calls=self.parallel_tool_calls is not False,
            output=spec.parse_response_format(self.response_format),
            sampling=self.sampling(self.logprobs, self.top_logprobs or 0),
            max_tokens=self.requested_max_tokens(), reasoning=self.reasoning(),
            max_tokens_param="max_completion_tokens" if self.max_completion_tokens else "max_tokens",
        )


class CompletionRequest(_Common):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": COMPLETION_EXAMPLES})

    prompt: str | list[str] | list[int] = Field(json_schema_extra=PROMPT_DOC)
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _completion_unsupported(self):
        if self.echo:
            raise UnsupportedParameter("echo", "echo is not supported")
        if self.suffix:
            raise UnsupportedParameter("suffix", "suffix (insertion) is not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedParameter("best_of", "best_of > 1 is not supported")
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise ValueError("prompt must not be empty")
            if isinstance(self.prompt[0], str) and len(self.prompt) != 1:
                raise UnsupportedParameter("prompt", "batched prompts are not supported; send one prompt per request")
        return self

    def requested_max_tokens(self) -> int:
        # The legacy completions API defaults max_tokens to 16.
        return self.max_tokens if self.max_tokens is not None else 16

    def to_job(self) -> Job:
        prompt = self.prompt[0] if isinstance(self.prompt, list) and isinstance(self.prompt[0], str) else self.prompt
        return Job(route="completions", model=self.model, prompt=prompt,
                   sampling=self.sampling(self.logprobs is not None, self.logprobs or 0),
                   max_tokens=self.requested_max_tokens())
