"""Anthropic Messages request bodies as pydantic models, and the core's ``Job``.

Validated before any tokenization. Unknown fields are a 400 naming the field
(``extra="forbid"``); types are strict; Anthropic answers every invalid request
with 400 ``invalid_request_error`` (``squish.api.errors`` sends a 422 as 400 on
these routes). What cannot be served is refused with a clear 400, never
dropped: image and document blocks, Anthropic's server tools, text citations,
``thinking`` of type ``between_tools``, ``output_config.effort`` other than the
default ``high``, ``speed: "fast"``, a final assistant turn (a prefill).
Bookkeeping that cannot change the output is accepted with no effect:
``metadata``, ``cache_control`` (anywhere; the prefix cache reuses shared
prompt prefixes on its own), ``service_tier``, ``inference_geo``,
``workspace_id``, ``user_profile_id``, ``speed: "standard"``, a thinking block's
``signature``, a tool's ``eager_input_streaming`` (calls stream whole, once
validated). docs/api-anthropic.md lists every field.

Conversion (``chat_messages``): ``system`` and a message's text blocks are
joined with a blank line; an assistant's ``tool_use`` blocks become its tool
calls and its ``thinking`` blocks its earlier reasoning (``redacted_thinking``
holds another provider's encrypted thinking, which no model here can read: it is
dropped); each ``tool_result`` becomes a tool message naming the call it
answers (``is_error`` prefixes its text with "Error: "). Consecutive turns of
one role are combined into one, as Anthropic does.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from squish.api.common import UnsupportedParameter
from squish.runtime.sampling import SamplingParams
from squish.serving.errors import bad_request
from squish.serving.request import Job, Message, Reasoning, ToolCallPart, check_stops
from squish.tools import spec
from squish.tools.errors import ToolRequestError

STRICT = ConfigDict(extra="forbid", strict=True)
ID_PATTERN = r"^[A-Za-z0-9_-]{1,256}$"


def _text_or(blocks):
    """A string or a list of ``blocks``: errors name only the branch the value took."""
    kind = Discriminator(lambda v: "text" if isinstance(v, str) else "blocks")
    return Annotated[Union[Annotated[str, Tag("text")], Annotated[list[blocks], Tag("blocks")]], kind]


class CacheControl(BaseModel):
    model_config = STRICT
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None
    citations: list[dict[str, Any]] | None = None

    @field_validator("citations")
    @classmethod
    def _citations(cls, v):
        if v:
            raise UnsupportedParameter("citations", "text blocks with citations are not supported (this server "
                                       "has no documents to cite); send the text without them")
        return v


class MediaBlock(BaseModel):
    """Content a text-only model cannot read: always refused."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image", "document", "search_result", "container_upload"]

    @model_validator(mode="after")
    def _refuse(self):
        raise UnsupportedParameter("content", f"{self.type} blocks are not supported: the models this server "
                                   "runs read text only; send the content as text blocks")


class ToolUseBlock(BaseModel):
    model_config = STRICT
    type: Literal["tool_use"]
    id: str = Field(pattern=ID_PATTERN)
    name: str = Field(min_length=1, max_length=128)
    input: dict[str, Any]
    cache_control: CacheControl | None = None


ResultContent = Annotated[Union[TextBlock, MediaBlock], Field(discriminator="type")]


class ToolResultBlock(BaseModel):
    model_config = STRICT
    type: Literal["tool_result"]
    tool_use_id: str = Field(pattern=ID_PATTERN)
    content: _text_or(ResultContent) | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None

    def text(self) -> str:
        c = self.content
        text = c if isinstance(c, str) else "\n\n".join(b.text for b in c or ())
        return f"Error: {text}" if self.is_error else text


class ThinkingBlock(BaseModel):
    model_config = STRICT
    type: Literal["thinking"]
    thinking: str
    signature: str  # accepted as sent; Squish's own signatures are checksums, never verified


class RedactedThinkingBlock(BaseModel):
    model_config = STRICT
    type: Literal["redacted_thinking"]
    data: str


Block = Annotated[Union[TextBlock, ToolUseBlock, ToolResultBlock, ThinkingBlock, RedactedThinkingBlock, MediaBlock],
                  Field(discriminator="type")]
ALLOWED = {"user": ("text", "tool_result"), "assistant": ("text", "tool_use", "thinking", "redacted_thinking"),
           "system": ("text",)}


class InputMessage(BaseModel):
    model_config = STRICT
    role: Literal["user", "assistant", "system"]
    content: _text_or(Block)

    def blocks(self) -> list:
        return self.content if isinstance(self.content, list) else [TextBlock(type="text", text=self.content)]


class Metadata(BaseModel):
    model_config = STRICT
    user_id: str | None = Field(default=None, max_length=256)


class Tool(BaseModel):
    """A client tool. Anthropic's server tools (typed ``bash_...``, ``web_search_...``, ...) are refused."""

    model_config = STRICT
    type: Literal["custom"] | None = None
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None
    strict: bool | None = None  # every call is validated against input_schema either way
    eager_input_streaming: bool | None = None  # no effect: calls stream whole, once validated
    defer_loading: bool | None = None
    input_examples: list[dict[str, Any]] | None = None
    allowed_callers: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _server_tools(cls, data):
        if isinstance(data, dict) and data.get("type") not in (None, "custom"):
            raise UnsupportedParameter("tools.type", f"tool type {data.get('type')!r} is one of Anthropic's server "
                                       "tools, which this server does not run; define a client tool (name, "
                                       "description, input_schema) and run it yourself")
        return data

    @model_validator(mode="after")
    def _unsupported(self):
        if self.defer_loading:
            raise UnsupportedParameter("tools.defer_loading", "defer_loading needs Anthropic's tool search, "
                                       "which this server does not run; send the tool without it")
        if self.input_examples:
            raise UnsupportedParameter("tools.input_examples", "input_examples are not supported; describe the "
                                       "input in the description instead")
        if self.allowed_callers not in (None, ["direct"]):
            raise UnsupportedParameter("tools.allowed_callers", "tools can only be called directly by the model "
                                       "here (allowed_callers ['direct'])")
        return self


class _Choice(BaseModel):
    model_config = STRICT
    disable_parallel_tool_use: bool | None = None


class ChoiceAuto(_Choice):
    type: Literal["auto"]


class ChoiceAny(_Choice):
    type: Literal["any"]


class ChoiceTool(_Choice):
    type: Literal["tool"]
    name: str


class ChoiceNone(BaseModel):
    model_config = STRICT
    type: Literal["none"]


ToolChoice = Annotated[Union[ChoiceAuto, ChoiceAny, ChoiceTool, ChoiceNone], Field(discriminator="type")]


class ThinkingEnabled(BaseModel):
    model_config = STRICT
    type: Literal["enabled"]
    budget_tokens: int = Field(ge=1)
    display: Literal["summarized", "omitted"] | None = None


class ThinkingAdaptive(BaseModel):
    model_config = STRICT
    type: Literal["adaptive"]
    display: Literal["summarized", "omitted"] | None = None


class ThinkingDisabled(BaseModel):
    model_config = STRICT
    type: Literal["disabled"]


class ThinkingBetweenTools(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["between_tools"]

    @model_validator(mode="after")
    def _refuse(self):
        raise UnsupportedParameter("thinking.type", "thinking type 'between_tools' is not supported; use "
                                   "'enabled', 'adaptive' or 'disabled'")


Thinking = Annotated[Union[ThinkingEnabled, ThinkingAdaptive, ThinkingDisabled, ThinkingBetweenTools],
                     Field(discriminator="type")]


class JsonFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(BaseModel):
    model_config = STRICT
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JsonFormat | None = None

    @field_validator("effort")
    @classmethod
    def _effort(cls, v):
        if v not in (None, "high"):
            raise UnsupportedParameter("output_config.effort", f"output_config.effort {v!r} is not supported: the "
                                       "served model has one effort level ('high', the default)")
        return v


class _Body(BaseModel):
    """What ``/v1/messages`` and ``/v1/messages/count_tokens`` share."""

    model_config = STRICT
    model: str = Field(min_length=1, max_length=256)
    messages: list[InputMessage] = Field(min_length=1)
    system: _text_or(TextBlock) | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None
    # Bookkeeping: accepted, no effect on the output (docs/api-anthropic.md).
    cache_control: CacheControl | None = None
    speed: Literal["standard"] | None = None
    user_profile_id: str | None = Field(default=None, max_length=256)
    workspace_id: str | None = Field(default=None, max_length=256)

    @model_validator(mode="after")
    def _shape(self):
        if self.messages[-1].role == "assistant":
            raise UnsupportedParameter("messages", "the last message is an assistant turn (a prefill for the reply "
                                       "to continue), which this server does not support; end with a user turn")
        fmt = self.output_config is not None and self.output_config.format is not None
        if fmt and self.tools and not isinstance(self.tool_choice, ChoiceNone):
            raise UnsupportedParameter("output_config.format", "output_config.format cannot be combined with tools "
                                       "unless tool_choice is {'type': 'none'}; send one or the other")
        return self

    def omits_thinking(self) -> bool:
        return getattr(self.thinking, "display", None) == "omitted"

    def reasoning(self) -> Reasoning:
        t = self.thinking
        if isinstance(t, ThinkingEnabled):
            return Reasoning(True, t.budget_tokens, param="thinking")
        if isinstance(t, ThinkingDisabled):
            return Reasoning(False, param="thinking")
        return Reasoning(param="thinking")  # absent or adaptive: the model's own default

    def tool_specs(self) -> list[spec.ToolSpec]:
        if not self.tools:
            return []
        if len(self.tools) > spec.MAX_TOOLS:
            raise bad_request(f"at most {spec.MAX_TOOLS} tools per request, got {len(self.tools)}", "tools")
        out, seen = [], set()
        for i, t in enumerate(self.tools):
            where = f"tools[{i}]"
            if not spec.NAME_RE.match(t.name):
                raise bad_request(f"{where}.name must be 1-64 characters of a-z, A-Z, 0-9, _ or -, got {t.name!r}",
                                  f"{where}.name")
            if t.name in seen:
                raise bad_request(f"duplicate tool name {t.name!r} in tools", f"{where}.name")
            seen.add(t.name)
            try:
                schema = spec.check_schema(t.input_schema, f"{where}.input_schema")
            except ToolRequestError as exc:
                raise bad_request(str(exc), exc.param) from exc
            if schema.get("type") != "object":
                raise bad_request(f"{where}.input_schema must have \"type\": \"object\"", f"{where}.input_schema")
            out.append(spec.ToolSpec(t.name, t.description or "", schema, bool(t.strict)))
        return out

    def choice(self, tools: list[spec.ToolSpec]) -> tuple[spec.ToolChoice | None, bool]:
        """(tool_choice, parallel calls allowed)."""
        c = self.tool_choice
        if c is None:
            return None, True
        if isinstance(c, ChoiceNone):
            return (spec.ToolChoice("none") if tools else None), True
        parallel = not c.disable_parallel_tool_use
        if isinstance(c, ChoiceAuto):
            return (spec.ToolChoice("auto") if tools else None), parallel
        if not tools:
            raise bad_request(f"tool_choice {c.type!r} needs a non-empty 'tools' list", "tool_choice")
        if isinstance(c, ChoiceAny):
            return spec.ToolChoice("required"), parallel
        if c.name not in {t.name for t in tools}:
            raise bad_request(f"tool_choice names tool {c.name!r}, which is not in tools "
                              f"({', '.join(t.name for t in tools)})", "tool_choice.name")
        return spec.ToolChoice("function", c.name), parallel

    def output(self) -> spec.OutputFormat | None:
        fmt = self.output_config.format if self.output_config is not None else None
        if fmt is None:
            return None
        try:
            spec.check_schema(fmt.json_schema, "output_config.format.schema")
        except ToolRequestError as exc:
            raise bad_request(str(exc), exc.param) from exc
        return spec.OutputFormat("json_schema", fmt.json_schema, strict=True)

    def job(self, route: str, sampling: SamplingParams | None = None, max_tokens: int | None = None) -> Job:
        """The core's request (a ``ServeError`` 400 for bad tools, tool_choice or message references)."""
        tools = self.tool_specs()
        choice, parallel = self.choice(tools)
        return Job(route=route, model=self.model, messages=chat_messages(self.system, self.messages),
                   tools=tools, tool_choice=choice, parallel_tool_calls=parallel, output=self.output(),
                   sampling=sampling or SamplingParams(), max_tokens=max_tokens, reasoning=self.reasoning())


class CountTokensRequest(_Body):
    def to_job(self) -> Job:
        return self.job("count_tokens")


class MessagesRequest(_Body):
    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    temperature: float = Field(default=1.0, ge=0.0, le=1.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    stream: bool = False
    # Bookkeeping: accepted, no effect on the output.
    metadata: Metadata | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: str | None = Field(default=None, max_length=64)

    @field_validator("stop_sequences")
    @classmethod
    def _stop(cls, v):
        return check_stops(v, "stop_sequences")

    @model_validator(mode="after")
    def _budget(self):
        t = self.thinking
        if isinstance(t, ThinkingEnabled) and t.budget_tokens >= self.max_tokens:
            raise UnsupportedParameter("thinking.budget_tokens", f"thinking.budget_tokens ({t.budget_tokens}) must "
                                       f"be less than max_tokens ({self.max_tokens})")
        return self

    def to_job(self) -> Job:
        sampling = SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                                  stop=tuple(self.stop_sequences or ()))
        return self.job("messages", sampling, self.max_tokens)


def _add(out: list[Message], msg: Message) -> None:
    """Append ``msg``, combining it with the previous message of the same role (not tool results)."""
    prev = out[-1] if out else None
    if prev is None or prev.role != msg.role or msg.role == "tool":
        out.append(msg)
        return
    prev.content = "\n\n".join(c for c in (prev.content, msg.content) if c) or (
        None if prev.content is None and msg.content is None else "")
    prev.tool_calls = prev.tool_calls + msg.tool_calls
    prev.reasoning = "\n\n".join(r for r in (prev.reasoning, msg.reasoning) if r) or None


def chat_messages(system, messages: list[InputMessage]) -> list[Message]:
    """The core's messages for ``system`` + ``messages`` (see the module docstring)."""
    out: list[Message] = []
    if system is not None:
        out.append(Message("system", system if isinstance(system, str) else "\n\n".join(b.text for b in system)))
    names: dict[str, str] = {}  # tool_use id -> tool name, from earlier assistant turns
    for i, m in enumerate(messages):
        texts: list[str] = []
        calls: list[ToolCallPart] = []
        thoughts: list[str] = []
        for j, b in enumerate(m.blocks()):
            at = f"messages[{i}].content[{j}]"
            if b.type not in ALLOWED[m.role]:
                raise bad_request(f"{at}: {m.role} messages may carry {' / '.join(ALLOWED[m.role])} blocks, "
                                  f"not {b.type}", at)
            if b.type == "text":
                texts.append(b.text)
            elif b.type == "tool_use":
                calls.append(ToolCallPart(b.id, b.name, json.dumps(b.input, ensure_ascii=False)))
                names[b.id] = b.name
            elif b.type == "thinking":
                thoughts.append(b.thinking)
            elif b.type == "tool_result":
                if texts:  # text before a result stays before it
                    _add(out, Message("user", "\n\n".join(texts)))
                    texts = []
                if b.tool_use_id not in names:
                    raise bad_request(f"{at}.tool_use_id {b.tool_use_id!r} does not match a tool_use block of an "
                                      "earlier assistant message", f"{at}.tool_use_id")
                out.append(Message("tool", b.text(), name=names[b.tool_use_id], tool_call_id=b.tool_use_id))
        if m.role == "assistant":
            content = "\n\n".join(texts) if texts else (None if calls else "")
            _add(out, Message("assistant", content, tool_calls=calls, reasoning="\n\n".join(thoughts) or None))
        elif texts or not m.content:
            _add(out, Message(m.role, "\n\n".join(texts)))
    return out
