"""Which tool-call family a model speaks, and the OpenAI shape of parsed calls.

``FAMILIES`` is tried in order; the first whose ``matches(model_type,
chat_template)`` is true wins, and ``generic`` matches everything, so it is
last. To add a family: write a ``TaggedFamily`` (usually just its markers) in
``families/`` (``hermes`` holds the ``<tool_call>`` JSON ones) and list it here.
"""

from __future__ import annotations

import secrets
import string

from squish.tools.families import hermes, llama, mistral
from squish.tools.families.base import ParsedCall, TaggedFamily

FAMILIES: tuple[TaggedFamily, ...] = (
    hermes.QWEN,
    llama.FAMILY,
    mistral.FAMILY,
    hermes.SMOLLM2,
    hermes.GENERIC,
)

_ID_CHARS = string.ascii_letters + string.digits


def by_name(name: str) -> TaggedFamily:
    for fam in FAMILIES:
        if fam.name == name:
            return fam
    raise KeyError(f"unknown tool-call family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


def detect(model_type: str = "", chat_template: str | None = None) -> TaggedFamily:
    template = chat_template or ""
    for fam in FAMILIES:
        if fam.matches(model_type, template):
            return fam
    return hermes.GENERIC


def for_tokenizer(tokenizer, model_type: str = "") -> TaggedFamily:
    return detect(model_type, getattr(tokenizer, "chat_template", None))


def new_call_id() -> str:
    return "call_" + "".join(secrets.choice(_ID_CHARS) for _ in range(24))


def to_openai(calls: list[ParsedCall]) -> list[dict]:
    """Valid parsed calls as OpenAI ``message.tool_calls`` entries (fresh ids)."""
    out = []
    for c in calls:
        if c.error is not None:
            raise ValueError(f"refusing to return an invalid call: {c.error}")
        out.append({"id": new_call_id(), "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments}})
    return out
