"""Prompt encoding (chat template / plain text) for the API layer.

Runs on handler threads, never on the event loop and never with MLX: it only
uses the tokenizer, which is shared read-only with the engine thread.
"""

from __future__ import annotations


class PromptError(ValueError):
    """The prompt cannot be encoded for this model (HTTP 400)."""


def encode_chat(tokenizer, messages: list[dict]) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise PromptError(
            "this model has no chat template; use /v1/completions with a plain prompt"
        )
    try:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    except Exception as exc:  # jinja errors: e.g. a template that rejects a role order
        raise PromptError(f"the model's chat template rejected these messages: {exc}") from exc
    if isinstance(ids, dict):  # some tokenizers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def encode_text(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text))
