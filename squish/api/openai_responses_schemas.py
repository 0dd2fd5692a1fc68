"""OpenAI Responses request bodies (``POST /v1/responses``) as pydantic models, and the ``Job``.

Validated before any tokenization, as the Chat Completions schemas are
(``openai_schemas``): unknown fields are a 400 naming them, known fields at a
value Squish does not implement are a 400 (``UnsupportedParameter``), types
are strict, type/range problems are 422. Bookkeeping fields that cannot change
the output (``metadata``, ``user``, ``safety_identifier``, ``prompt_cache_key``,
``service_tier`` auto/default, Codex's ``client_metadata``) are accepted and have
no effect (docs/api-responses.md). The input items are ``openai_responses_items``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, field_validator, model_validator

from squish.api.common import UnsupportedParameter
from squish.api.openai_responses_items import Item, messages, tag
from squish.api.openai_schemas import EFFORT_OFF, STRICT
from squish.runtime.sampling import MAX_TOP_LOGPROBS, SamplingParams
from squish.serving.request import Job, Reasoning
from squish.tools import spec
from squish.tools.errors import ToolRequestError

INCLUDABLE = ("reasoning.encrypted_content", "message.output_text.logprobs")


# ---- tools, text format, reasoning -------------------------------------------------------------------
class FunctionTool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    def echo(self) -> dict:
        return {"type": "function", "name": self.name, "description": self.description,
                "parameters": self.parameters, "strict": True if self.strict is None else self.strict}


class OtherTool(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, v):
        t = v.get("type") if isinstance(v, dict) else None
        raise UnsupportedParameter("tools", f"tools of type {t!r} are not available on this server (no built-in "
                                   "tools such as web_search, file_search or computer); only function tools")


Tool = Annotated[Union[Annotated[FunctionTool, Tag("function")], Annotated[OtherTool, Tag("other")]],
                 Discriminator(tag(("function",)))]


class FormatText(BaseModel):
    model_config = STRICT
    type: Literal["text"]


class FormatJsonObject(BaseModel):
    model_config = STRICT
    type: Literal["json_object"]


class FormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    type: Literal["json_schema"]
    name: str
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(BaseModel):
    model_config = STRICT
    format: Annotated[Union[FormatText, FormatJsonObject, FormatJsonSchema], Field(discriminator="type")] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None

    @model_validator(mode="after")
    def _verbosity(self):
        if self.verbosity not in (None, "medium"):
            raise UnsupportedParameter("text.verbosity", "text.verbosity other than 'medium' is not supported: "
                                       "served models have no verbosity control")
        return self


Summary = Literal["auto", "concise", "detailed"]


class ReasoningConfig(BaseModel):
    model_config = STRICT
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    summary: Summary | None = None
    generate_summary: Summary | None = None  # the older name of summary


class ResponseRequest(BaseModel):
    model_config = STRICT

    model: str = Field(min_length=1, max_length=256)
    input: list[Item] = Field(min_length=1)  # a string is one user message
    instructions: str | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    reasoning: ReasoningConfig | None = None
    include: list[str] | None = None
    stream: bool | None = False
    store: bool | None = None  # None: true, as OpenAI defaults
    previous_response_id: str | None = Field(default=None, min_length=1, max_length=256)
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Bookkeeping: accepted, no effect on the output (docs/api-responses.md).
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(default=None, max_length=16)
    user: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    service_tier: Literal["auto", "default"] | None = None
    client_metadata: dict[str, str] | None = None  # sent by Codex CLI

    @field_validator("input", mode="before")
    @classmethod
    def _text_input(cls, v):
        if isinstance(v, str):
            if not v:
                raise ValueError("input must not be empty")
            return [{"type": "message", "role": "user", "content": v}]
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.background:
            raise UnsupportedParameter("background", "background responses are not supported; send "
                                       "background: false (or omit it) and keep the connection open")
        if self.truncation == "auto":
            raise UnsupportedParameter("truncation", "truncation 'auto' is not supported: an input that does not "
                                       "fit the context is a 400; shorten the input or start a new conversation")
        for i, value in enumerate(self.include or ()):
            if value not in INCLUDABLE:
                raise UnsupportedParameter(f"include[{i}]", f"include value {value!r} is not supported; this "
                                           f"server can include {', '.join(INCLUDABLE)}")
        if self.top_logprobs and not self.logprobs:
            raise UnsupportedParameter("top_logprobs", "top_logprobs needs include ['message.output_text.logprobs']")
        for k in self.metadata or {}:
            if len(k) > 64:
                raise UnsupportedParameter("metadata", "metadata keys are limited to 64 characters")
        structured = bool(self.tools) and self.tool_choice != "none"
        fmt = self.text.format if self.text is not None else None
        json_format = fmt is not None and not isinstance(fmt, FormatText)
        if structured and json_format:
            raise UnsupportedParameter("text.format", "text.format json_object/json_schema cannot be combined with "
                                       "tools unless tool_choice is 'none'; send one or the other")
        if self.logprobs and (structured or json_format):
            raise UnsupportedParameter("include", "output_text logprobs are not available with tools or a JSON "
                                       "text.format (the reply may come from a corrective retry)")
        return self

    # ---- the parts of the Job --------------------------------------------------------------------
    @property
    def logprobs(self) -> bool:
        return "message.output_text.logprobs" in (self.include or ())

    @property
    def summary(self) -> str | None:
        r = self.reasoning
        return None if r is None else (r.summary or r.generate_summary)

    def output_format(self) -> spec.OutputFormat | None:
        """The JSON output constraint (``ToolRequestError`` for a bad name or schema)."""
        fmt = self.text.format if self.text is not None else None
        if fmt is None or isinstance(fmt, FormatText):
            return None
        if isinstance(fmt, FormatJsonObject):
            return spec.OutputFormat("json_object")
        if not spec.NAME_RE.match(fmt.name):
            raise ToolRequestError("text.format.name must be 1-64 characters of a-z, A-Z, 0-9, _ or -",
                                   "text.format.name")
        spec.check_schema(fmt.schema_, "text.format.schema")
        return spec.OutputFormat("json_schema", fmt.schema_, fmt.name, bool(fmt.strict))

    def function_tools(self) -> list[FunctionTool]:
        return [t for t in self.tools or () if isinstance(t, FunctionTool)]

    def tool_specs(self) -> tuple[list[spec.ToolSpec], spec.ToolChoice | None]:
        """The tools and tool_choice (``ToolRequestError`` naming the Responses field at fault)."""
        try:
            tools = spec.parse_tools([{"type": "function", "function": {
                k: v for k, v in (("name", t.name), ("description", t.description), ("parameters", t.parameters),
                                  ("strict", t.strict)) if v is not None}} for t in self.function_tools()])
        except ToolRequestError as exc:
            raise ToolRequestError(str(exc).replace("].function.", "]."),
                                   (exc.param or "tools").replace("].function", "]")) from None
        choice = self.tool_choice
        if choice is None or isinstance(choice, str):
            return tools, (spec.parse_tool_choice(choice, tools) if choice is not None else None)
        kind = choice.get("type")
        if kind == "function":
            if set(choice) != {"type", "name"}:
                raise ToolRequestError('tool_choice must be {"type": "function", "name": ...}', "tool_choice")
            return tools, spec.parse_tool_choice({"type": "function", "function": {"name": choice["name"]}}, tools)
        if kind == "allowed_tools":
            return self._allowed(choice, tools)
        raise ToolRequestError(f"tool_choice of type {kind!r} is not supported; use 'none', 'auto', 'required', "
                               '{"type": "function", "name": ...} or {"type": "allowed_tools", ...}', "tool_choice")

    @staticmethod
    def _allowed(choice: dict, tools: list[spec.ToolSpec]):
        """``allowed_tools``: only the listed functions may be called (the others are left out of the prompt)."""
        mode, listed = choice.get("mode"), choice.get("tools")
        if set(choice) != {"type", "mode", "tools"} or mode not in ("auto", "required") or not isinstance(listed, list):
            raise ToolRequestError('tool_choice allowed_tools must be {"type": "allowed_tools", "mode": "auto" | '
                                   '"required", "tools": [{"type": "function", "name": ...}, ...]}', "tool_choice")
        by_name = {t.name: t for t in tools}
        names = []
        for i, t in enumerate(listed):
            if not isinstance(t, dict) or t.get("type") != "function" or t.get("name") not in by_name:
                raise ToolRequestError(f"tool_choice.tools[{i}] must name a function tool given in tools",
                                       f"tool_choice.tools[{i}]")
            names.append(t["name"])
        if not names:
            raise ToolRequestError("tool_choice.tools must list at least one function", "tool_choice.tools")
        return [by_name[n] for n in dict.fromkeys(names)], spec.ToolChoice(mode)

    def thinking(self) -> Reasoning:
        effort = self.reasoning.effort if self.reasoning is not None else None
        if effort is None:
            return Reasoning(param="reasoning.effort")
        return Reasoning(effort not in EFFORT_OFF, param="reasoning.effort")

    def sampling(self) -> SamplingParams:
        return SamplingParams(temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p,
                              logprobs=self.logprobs, top_logprobs=self.top_logprobs or 0)

    def normalized_input(self) -> list[dict]:
        return [item.normalized() for item in self.input]

    def to_job(self, history: list[dict], items: list[dict]) -> Job:
        """The core's request for ``items`` continuing ``history`` (stored items, already checked)."""
        tools, choice = self.tool_specs()
        return Job(route="responses", model=self.model, messages=messages(history, items, self.instructions),
                   tools=tools, tool_choice=choice, parallel_tool_calls=self.parallel_tool_calls is not False,
                   output=self.output_format(), sampling=self.sampling(), max_tokens=self.max_output_tokens,
                   reasoning=self.thinking(), max_tokens_param="max_output_tokens", messages_param="input")
