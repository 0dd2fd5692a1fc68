"""Deterministic benchmark prompts, sized in tokens with the artifact's own tokenizer.

Every measured request starts with a unique tag (``[run 17]``) so no server can
answer it from a prompt cache built by an earlier request, except in the prefix
experiment, where sharing a prefix is the point.
"""

from __future__ import annotations

import random
from pathlib import Path

# About 20 tokens of user text; the chat template (SmolLM2 adds a default system prompt)
# brings a request to ~50 prompt tokens.
SHORT = "Write a long story about a lighthouse keeper who finds a message in a bottle."

WARMUP = "Say hello."

_SUBJECTS = ["The river", "A small town", "The old library", "Every winter the valley", "The market square",
             "A narrow bridge", "The northern forest", "The harbour", "An orchard", "The railway station"]
_VERBS = ["welcomed", "sheltered", "remembered", "surprised", "connected", "outlasted", "inspired", "divided"]
_OBJECTS = ["travellers from distant cities", "generations of farmers", "the patient fishermen",
            "children on their way to school", "merchants carrying salt and wool", "a quiet group of painters",
            "the soldiers returning home", "musicians who played until dawn"]
_TAILS = ["long before anyone wrote it down.", "while the seasons turned slowly.",
          "and nobody could explain why.", "as the lamps were lit one by one.",
          "in a way that people still talk about.", "despite the floods of that year."]


class Tokens:
    """Token counter from the artifact's ``tokenizer.json`` (the `tokenizers` library)."""

    def __init__(self, model_dir: Path):
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json"))

    def ids(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def count(self, text: str) -> int:
        return len(self.ids(text))


def prose(n_tokens: int, tokens: Tokens, seed: int = 0) -> str:
    """Plain English sentences totalling about ``n_tokens`` tokens (never fewer)."""
    rng = random.Random(seed)
    sentences: list[str] = []
    while not sentences or tokens.count(" ".join(sentences)) < n_tokens:
        sentences.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                         f"{rng.choice(_TAILS)}")
    return " ".join(sentences)


def tagged(tag: str, body: str) -> str:
    return f"[{tag}] {body}"


_LEADS = ("Amber", "Birch", "Cedar", "Delta", "Ember", "Flint", "Grove", "Heron", "Iris", "Juniper")


def disjoint_pair(tokens: Tokens, body: str, run: int) -> tuple[str, str]:
    """Two prompts of one shape (the same token count) that share no leading token: each
    starts with its own word, so a prefix cache can give the second nothing of the first
    beyond the chat template's own text. (Tags such as "[run 17]" / "[run 18]" share "[run 1".)"""
    texts = [f"{w}: {body}" for w in _LEADS[run % len(_LEADS):] + _LEADS[:run % len(_LEADS)]]
    for i, a in enumerate(texts):
        for b in texts[i + 1:]:
            ia, ib = tokens.ids(a), tokens.ids(b)
            if len(ia) == len(ib) and ia[0] != ib[0]:
                return a, b
    raise ValueError("no two lead words tokenize to the same length here")


def long_prompt(tag: str, context: str) -> str:
    return tagged(tag, f"Read this text and then summarise it in detail.\n\n{context}")


PREFIX_QUESTIONS = ("Which places does the text mention? Answer in detail.",
                    "Which people does the text mention? Answer in detail.")
