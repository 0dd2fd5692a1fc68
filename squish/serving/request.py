"""The one internal request every protocol adapter builds.

A ``Job`` is either a chat (``messages``) or a raw prompt (``prompt``: text or
token ids, no chat template). Messages have typed fields rather than a
protocol's wire shape: text content, tool calls an assistant made earlier,
the tool result a ``tool`` message carries, and an assistant's earlier
reasoning. ``template_dicts`` gives them the shape chat templates (and
``squish.tools.render``) take.

Adapters check their own wire format (pydantic) and fill the ``Job``;
``Core.prepare`` checks what depends on the served model (context length,
vocabulary, the template, the tools' grammar).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from squish.runtime.sampling import MAX_STOP_STRINGS, SamplingParams
from squish.tools.spec import OutputFormat, ToolChoice, ToolSpec

Role = Literal["system", "user", "assistant", "tool"]

# C0 controls other than tab/newline/carriage return, DEL, and lone surrogates
# (which JSON can encode as \ud800 but UTF-8 cannot).
_BAD_CHARS = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def check_text(value: str, where: str) -> str:
    """``value``, or ValueError naming ``where`` if it holds a control character or a lone surrogate."""
    m = _BAD_CHARS.search(value)
    if m:
        raise ValueError(
            f"{where} contains an invalid character U+{ord(m.group()):04X}; "
            "control characters and unpaired surrogates are not accepted"
        )
    return value


def check_stops(value, where: str):
    """A stop string or list of them (``value``, unchanged), or ValueError: at most
    ``MAX_STOP_STRINGS``, none empty or over 256 characters, no invalid characters."""
    if value is None:
        return value
    items = [value] if isinstance(value, str) else value
    if len(items) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed")
    for s in items:
        if not s:
            raise ValueError("stop sequences must not be empty")
        if len(s) > 256:
            raise ValueError("stop sequences are limited to 256 characters")
        check_text(s, where)
    return value


@dataclass(frozen=True)
class ToolCallPart:
    """A call an assistant made in an earlier turn, as the client sends it back."""

    id: str | None
    name: str
    arguments: str  # JSON text of an object


@dataclass
class Message:
    role: Role
    content: str | None = None
    name: str | None = None  # participant name; for a tool message, the function's name
    tool_calls: list[ToolCallPart] = field(default_factory=list)
    tool_call_id: str | None = None  # the call a tool message answers
    reasoning: str | None = None  # an assistant's earlier thinking, if the client kept it

    def template_dict(self) -> dict:
        d: dict = {"role": self.role, "content": self.content}
        if self.name is not None and self.role != "tool":
            d["name"] = self.name
        if self.tool_calls:
            d["tool_calls"] = [{"id": c.id, "type": "function",
                                "function": {"name": c.name, "arguments": c.arguments}}
                               for c in self.tool_calls]
        if self.role == "tool":
            if self.tool_call_id is not None:
                d["tool_call_id"] = self.tool_call_id
            if self.name is not None:
                d["name"] = self.name
        if self.reasoning:
            d["reasoning_content"] = self.reasoning
        return d


def template_dicts(messages: list[Message]) -> list[dict]:
    return [m.template_dict() for m in messages]


@dataclass
class Reasoning:
    """The client's wish about a thinking section. ``enabled`` None: the model's default."""

    enabled: bool | None = None
    budget_tokens: int | None = None  # close the section after this many tokens
    param: str = "reasoning"  # the request field that asked (for 400s)


@dataclass
class Job:
    route: str  # metrics label: "chat", "completions", "responses", "messages", "ollama_chat", ...
    model: str  # as the client named it; resolved by Core.prepare
    messages: list[Message] | None = None
    prompt: str | list[int] | None = None  # raw prompt, no chat template
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice | None = None  # None: OpenAI's default (auto with tools, else none)
    parallel_tool_calls: bool = True
    output: OutputFormat | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)  # max_tokens is set by the core
    max_tokens: int | None = None  # as requested; None: as much as fits
    reasoning: Reasoning = field(default_factory=Reasoning)
    # A context smaller than the model's for this request (Ollama's num_ctx): prompt +
    # max_tokens must fit it. None: the server's context. Above the server's: a 400.
    context_limit: int | None = None
    # Names of request fields, for error messages in the caller's terms.
    max_tokens_param: str = "max_tokens"
    messages_param: str = "messages"
    context_param: str = "context_limit"

    @property
    def structured(self) -> bool:
        """Whether the reply goes through the tool / JSON layer (validation and retries)."""
        has_tool_msgs = any(m.role == "tool" or m.tool_calls for m in self.messages or ())
        return bool(self.tools) or self.tool_choice is not None or self.output is not None or has_tool_msgs
