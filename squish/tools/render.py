"""Tools, assistant ``tool_calls`` and ``role: "tool"`` messages into the prompt.

Native path: when the model's chat template renders tools (it refers to a
``tools`` variable), the OpenAI tools go in as ``tools=`` and messages keep
their ``tool_calls`` (arguments as objects, as HF templates expect) and
``role: "tool"`` entries.

Fallback path (the template has no tool support, e.g. SmolLM2): Squish writes
the tool block below into the system message. If the request has a system
message, the block is appended to it after a blank line; otherwise it becomes
the system message. Nothing else of the system prompt comes from the request
(only what the OpenAI API lets a client set: its own system message and its
tool definitions). Client text inside the block (names, descriptions,
schemas) and tool results are JSON-encoded with ``<`` and ``>`` escaped as
``\\u003c`` / ``\\u003e``, so no client string can close the block or spell a
special token such as ``<|im_end|>``. Assistant ``tool_calls`` are written
back as the family's call blocks, and tool results as a user turn of
``<tool_response>`` blocks (consecutive results share one turn)::

    <system message of the request, if any>

    # Tools

    You can call functions to help with the user's request. The functions are
    described as JSON Schema inside <tools></tools>:
    <tools>
    {"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}
    </tools>

    To call a function, reply with one block per call, and nothing else:
    <tool_call>
    {"name": "<function name>", "arguments": {<arguments as JSON>}}
    </tool_call>
    <tool-choice line, see CHOICE_LINES>
"""

from __future__ import annotations

import json

from squish.tools.errors import ToolRequestError
from squish.tools.families.base import TaggedFamily
from squish.tools.spec import ToolChoice, ToolSpec, _plain

FALLBACK_HEADER = (
    "# Tools\n\n"
    "You can call functions to help with the user's request. The functions are "
    "described as JSON Schema inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n\n"
    "To call a function, reply with one block per call, and nothing else:\n"
    "{example}\n"
)
CHOICE_LINES = {
    "auto": "Call a function only when it helps; otherwise reply in plain text.",
    "required": "You must call at least one function.",
    "function": "You must call the function {name}.",
    "none": "Do not call any function now; reply in plain text.",
}
RESULTS_OPEN, RESULTS_CLOSE = "<tool_response>", "</tool_response>"


def safe_json(obj) -> str:
    """JSON with ``<`` / ``>`` escaped, so it cannot spell markers or special tokens."""
    return json.dumps(obj, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e")


def supports_tools(tokenizer) -> bool:
    template = getattr(tokenizer, "chat_template", None) or ""
    return "tools" in template


def fallback_block(tools: list[ToolSpec], choice: ToolChoice, family: TaggedFamily) -> str:
    example = family.format_call("<function name>", {"<argument>": "<value>"})
    text = FALLBACK_HEADER.format(tools="\n".join(safe_json(t.openai()) for t in tools), example=example)
    return text + CHOICE_LINES[choice.mode].format(name=choice.name)


def _text(content, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: only text is supported
        parts = []
        for p in content:
            p = _plain(p)
            if not isinstance(p, dict) or p.get("type") != "text":
                raise ToolRequestError(f"{where}: only text content parts are supported", where)
            parts.append(p.get("text", ""))
        return "".join(parts)
    raise ToolRequestError(f"{where}: content must be a string or a list of text parts", where)


def _call_args(call: dict, where: str) -> tuple[str, dict]:
    fn = call.get("function") or {}
    name, args = fn.get("name"), fn.get("arguments", "{}")
    if not isinstance(name, str) or not name:
        raise ToolRequestError(f"{where}.function.name is required", where)
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as exc:
            raise ToolRequestError(f"{where}.function.arguments is not valid JSON: {exc.msg}", where) from None
    if not isinstance(args, dict):
        raise ToolRequestError(f"{where}.function.arguments must be a JSON object", where)
    return name, args


def native_messages(messages: list) -> list[dict]:
    """Messages as HF chat templates expect them (tool-call arguments as objects)."""
    out = []
    for i, m in enumerate(messages):
        m = dict(_plain(m))
        if m.get("tool_calls"):
            calls = []
            for j, c in enumerate(m["tool_calls"]):
                c = _plain(c)
                name, args = _call_args(c, f"messages[{i}].tool_calls[{j}]")
                calls.append({"id": c.get("id"), "type": "function", "function": {"name": name, "arguments": args}})
            m["tool_calls"] = calls
        if m.get("content") is not None:
            m["content"] = _text(m["content"], f"messages[{i}].content")
        out.append(m)
    return out


def fallback_messages(messages: list, tools: list[ToolSpec], choice: ToolChoice,
                      family: TaggedFamily) -> list[dict]:
    """Plain ``{"role", "content"}`` messages with the tool block in the system message."""
    out: list[dict] = []
    names: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant turns
    system: str | None = None
    pending_results: list[str] = []

    def flush() -> None:
        if pending_results:
            out.append({"role": "user", "content": "\n".join(pending_results)})
            pending_results.clear()

    for i, m in enumerate(messages):
        m = _plain(m)
        role = m.get("role")
        where = f"messages[{i}]"
        if role == "tool":
            call_id = m.get("tool_call_id")
            if call_id is None and isinstance(m.get("name"), str) and m["name"] in names.values():
                name = m["name"]  # answers by function name (Ollama's tool messages carry no id)
            elif not isinstance(call_id, str) or call_id not in names:
                raise ToolRequestError(
                    f"{where}.tool_call_id {call_id!r} does not match a tool call of an earlier assistant message",
                    f"{where}.tool_call_id")
            else:
                name = names[call_id]
            body = safe_json({"name": name, "content": _text(m.get("content"), f"{where}.content")})
            pending_results.append(f"{RESULTS_OPEN}\n{body}\n{RESULTS_CLOSE}")
            continue
        flush()
        content = _text(m.get("content"), f"{where}.content")
        if role in ("system", "developer") and not out and system is None:
            system = content
            continue
        if role == "assistant" and m.get("tool_calls"):
            blocks = [content] if content else []
            for j, c in enumerate(m["tool_calls"]):
                c = _plain(c)
                name, args = _call_args(c, f"{where}.tool_calls[{j}]")
                names[c.get("id") or f"#{len(names)}"] = name
                blocks.append(family.format_call(name, args))
            content = "\n".join(blocks)
        msg = {"role": role, "content": content}
        if m.get("name"):
            msg["name"] = m["name"]  # optional participant name: the template shows it if it uses it
        out.append(msg)
    flush()
    block = fallback_block(tools, choice, family) if tools else None
    if block is not None:
        system = f"{system}\n\n{block}" if system else block
    if system is not None:
        out.insert(0, {"role": "system", "content": system})
    return out


def encode_chat(tokenizer, messages: list, tools: list[ToolSpec], choice: ToolChoice,
                family: TaggedFamily, template_kwargs: dict | None = None) -> list[int]:
    """Token ids of the chat prompt with tools (native template or fallback).
    ``template_kwargs``: switches the template defines (``enable_thinking``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ToolRequestError("this model has no chat template, so it cannot take tools or tool messages",
                               "tools")
    from squish.runtime.prompts import PromptError, apply_template

    kwargs = dict(template_kwargs or {})
    if supports_tools(tokenizer):
        msgs = native_messages(messages)
        if tools:
            kwargs["tools"] = [t.openai() for t in tools]
    else:
        msgs = fallback_messages(messages, tools, choice, family)
    try:  # client strings never become special tokens (see squish.runtime.prompts)
        return apply_template(tokenizer, msgs, **kwargs)
    except PromptError as exc:
        raise ToolRequestError(str(exc), "messages") from exc
