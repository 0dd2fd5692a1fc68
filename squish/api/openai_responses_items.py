"""OpenAI Responses input items: their pydantic models, their stored shape, the core's messages.

``input`` items are messages (content as a string or text parts),
``function_call``, ``function_call_output`` and ``reasoning`` items; other
item types and non-text parts (images, files, audio) are a 400 naming them.
``normalized()`` gives an item the shape the server stores and lists (ids
filled in, string content as one text part); ``messages`` turns stored and new
items into the core's messages: a run of assistant-side items (a reasoning
item, an assistant message, function calls) is one assistant turn, and a
reasoning item's text (its ``reasoning_text`` content, else its
``encrypted_content`` if this server wrote it, else its summary) becomes that
turn's earlier reasoning, which the chat template shows if it uses it. Item
``id`` / ``status`` / ``phase`` and text parts' ``annotations`` / ``logprobs``
are accepted and have no effect.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, Discriminator, Field, Tag, model_validator

from squish.api.common import UnsupportedParameter
from squish.api.openai_schemas import STRICT
from squish.serving.errors import bad_request
from squish.serving.request import Message, ToolCallPart

# What this server writes as a reasoning item's encrypted_content: the thinking text, base64 after
# this prefix. It is not encrypted (the server is yours); it lets store:false clients carry it.
ENCRYPTED_PREFIX = "squish-reasoning-v1:"
Status = Literal["in_progress", "completed", "incomplete"]


def new_item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(16)}"


def encrypt(text: str) -> str:
    return ENCRYPTED_PREFIX + base64.b64encode(text.encode()).decode()


def decrypt(value: str, param: str) -> str:
    if value.startswith(ENCRYPTED_PREFIX):
        try:
            return base64.b64decode(value[len(ENCRYPTED_PREFIX):], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            pass
    raise bad_request("this reasoning item's encrypted_content was not written by this server, so it cannot be "
                      "read; drop encrypted_content (or the reasoning item)", param)


def tag(known: tuple[str, ...], default: str | None = None):
    """A discriminator for a tagged union whose ``other`` member refuses unknown types with a 400."""
    def of(v: Any) -> str:
        t = v.get("type", default) if isinstance(v, dict) else getattr(v, "type", default)
        return t if t in known else "other"

    return of


# ---- content parts --------------------------------------------------------------------------------
class InputText(BaseModel):
    model_config = STRICT
    type: Literal["input_text"]
    text: str
    prompt_cache_breakpoint: dict[str, Any] | None = None  # a caching hint: no effect here


class OutputText(BaseModel):
    model_config = STRICT
    type: Literal["output_text"]
    text: str
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None


class Refusal(BaseModel):
    model_config = STRICT
    type: Literal["refusal"]
    refusal: str


class OtherPart(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, v):
        t = v.get("type") if isinstance(v, dict) else None
        raise UnsupportedParameter("input", f"content parts of type {t!r} are not supported: this server serves a "
                                   "text-only model (input_text / output_text parts only)")


Part = Annotated[Union[Annotated[InputText, Tag("input_text")], Annotated[OutputText, Tag("output_text")],
                       Annotated[Refusal, Tag("refusal")], Annotated[OtherPart, Tag("other")]],
                 Discriminator(tag(("input_text", "output_text", "refusal")))]


def part_text(part: dict) -> str:
    return part.get("refusal", "") if part.get("type") == "refusal" else part.get("text", "")


def content_text(content: list[dict]) -> str:
    return "".join(part_text(p) for p in content)


# ---- input items -----------------------------------------------------------------------------------
ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


class MessageItem(BaseModel):
    model_config = STRICT
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    id: str | None = None
    status: Status | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @model_validator(mode="after")
    def _parts(self):
        if self.role != "assistant" and isinstance(self.content, list) and \
                any(isinstance(p, Refusal) for p in self.content):
            raise UnsupportedParameter("input", "only assistant messages may carry refusal parts")
        return self

    def normalized(self) -> dict:
        kind = "output_text" if self.role == "assistant" else "input_text"
        if isinstance(self.content, str):
            parts = [{"type": kind, "text": self.content, **({"annotations": []} if kind == "output_text" else {})}]
        else:
            parts = [p.model_dump(exclude_none=True) for p in self.content]
        return {"id": self.id or new_item_id("msg"), "type": "message", "role": self.role, "content": parts,
                "status": self.status or "completed"}


class FunctionCallItem(BaseModel):
    model_config = STRICT
    type: Literal["function_call"]
    call_id: str = Field(min_length=1, max_length=256)
    name: str = Field(min_length=1, max_length=64)
    arguments: str
    id: str | None = None
    status: Status | None = None

    def normalized(self) -> dict:
        return {"id": self.id or new_item_id("fc"), "type": "function_call", "call_id": self.call_id,
                "name": self.name, "arguments": self.arguments, "status": self.status or "completed"}


class FunctionCallOutputItem(BaseModel):
    model_config = STRICT
    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1, max_length=256)
    output: str | list[Part]
    id: str | None = None
    status: Status | None = None
    name: str | None = None  # the function's name (it is also known from the call)

    def normalized(self) -> dict:
        out = self.output if isinstance(self.output, str) else [p.model_dump(exclude_none=True) for p in self.output]
        d = {"id": self.id or new_item_id("fco"), "type": "function_call_output", "call_id": self.call_id,
             "output": out, "status": self.status or "completed"}
        if self.name is not None:
            d["name"] = self.name
        return d


class SummaryText(BaseModel):
    model_config = STRICT
    type: Literal["summary_text"]
    text: str


class ReasoningText(BaseModel):
    model_config = STRICT
    type: Literal["reasoning_text"]
    text: str


class ReasoningItem(BaseModel):
    model_config = STRICT
    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = None
    status: Status | None = None

    def normalized(self) -> dict:
        d = self.model_dump(exclude_none=True)
        d["id"] = self.id or new_item_id("rs")
        return d


class OtherItem(BaseModel):
    """Any other item type: refused with a 400. Documented as an object whose ``type`` is none
    of the known ones (an item without ``type`` is a message, and must be a valid one)."""

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema, handler):
        return {"type": "object", "required": ["type"], "title": "OtherItem",
                "properties": {"type": {"type": "string", "not": {"enum": list(ITEM_TYPES)}}}}

    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, v):
        t = v.get("type") if isinstance(v, dict) else None
        if t == "item_reference":
            raise UnsupportedParameter("input", "item_reference input items are not supported; send the item "
                                       "itself, or continue a stored response with previous_response_id")
        raise UnsupportedParameter("input", f"input items of type {t!r} are not supported; this server takes "
                                   "message, function_call, function_call_output and reasoning items")


Item = Annotated[Union[Annotated[MessageItem, Tag("message")], Annotated[FunctionCallItem, Tag("function_call")],
                       Annotated[FunctionCallOutputItem, Tag("function_call_output")],
                       Annotated[ReasoningItem, Tag("reasoning")], Annotated[OtherItem, Tag("other")]],
                 Discriminator(tag(ITEM_TYPES, "message"))]


def _reasoning_text(item: dict, param: str) -> str:
    if item.get("content"):
        return "".join(c["text"] for c in item["content"])
    if item.get("encrypted_content"):
        return decrypt(item["encrypted_content"], f"{param}.encrypted_content")
    return "\n\n".join(s["text"] for s in item.get("summary") or ())


def messages(history: list[dict], items: list[dict], instructions: str | None) -> list[Message]:
    """The core's messages for stored ``history`` then this request's ``items`` (normalized dicts)."""
    out: list[Message] = [Message("system", instructions)] if instructions else []
    names: dict[str, str] = {}  # call_id -> function name
    turn: Message | None = None  # the assistant turn being gathered

    def flush():
        nonlocal turn
        if turn is not None:
            if turn.content is None and not turn.tool_calls:
                turn.content = ""
            out.append(turn)
        turn = None

    for i, it in enumerate(history + items):
        param = f"input[{i - len(history)}]" if i >= len(history) else "previous_response_id"
        kind = it["type"]
        if kind == "message" and it["role"] != "assistant":
            flush()
            out.append(Message("user" if it["role"] == "user" else "system", content_text(it["content"])))
        elif kind == "message":
            if turn is not None and (turn.content is not None or turn.tool_calls):
                flush()
            turn = turn or Message("assistant")
            turn.content = content_text(it["content"])
        elif kind == "function_call":
            turn = turn or Message("assistant")
            turn.tool_calls.append(ToolCallPart(it["call_id"], it["name"], it["arguments"]))
            names[it["call_id"]] = it["name"]
        elif kind == "reasoning":
            text = _reasoning_text(it, param)
            if not text:
                continue
            if turn is not None and (turn.content is not None or turn.tool_calls):
                flush()
            turn = turn or Message("assistant")
            turn.reasoning = f"{turn.reasoning}\n\n{text}" if turn.reasoning else text
        else:  # function_call_output
            flush()
            call_id = it["call_id"]
            if call_id not in names:
                raise bad_request(f"no function_call with call_id '{call_id}' comes before this function_call_output",
                                  f"{param}.call_id")
            output = it["output"] if isinstance(it["output"], str) else content_text(it["output"])
            out.append(Message("tool", output, name=names[call_id], tool_call_id=call_id))
    flush()
    return out
