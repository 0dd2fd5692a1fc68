"""Tool calling and structured outputs (OpenAI ``tools`` / ``response_format``).

- ``spec``: parse and check the request's tools, tool_choice, response_format (400s).
- ``registry`` + ``families/``: per-model-family call formats and parsers.
- ``render``: tools and tool messages into the prompt (native template or fallback).
- ``constraints``: llguidance grammars as mlx_lm logits processors.
- ``validate``: jsonschema checks of calls and JSON outputs.
- ``stream``: streaming parser emitting ``delta.tool_calls`` fragments.
- ``loop``: the bounded corrective-retry loop and its counters.
- ``reference``: single-request generation on mlx_lm, for benchmarks and tests.

Nothing here imports MLX at import time.
"""
