"""The serving core: one internal request, one attempt loop, neutral events.

Every protocol adapter (``squish.api.openai_chat``, ``openai_responses``,
``anthropic``, ``ollama``) turns its own request body into a ``Job``
(``request.py``) and hands it to ``Core`` (``core.py``), which renders the
prompt, compiles the output constraint, submits attempts to the engine,
validates tool calls / JSON and retries with a corrective message
(``attempts.py``), separates a reasoning section (``reasoning.py``), and yields
protocol-neutral events (``events.py``). A streamed reply encodes those events
as they come; a whole reply is the same events collected (``events.collect``).
Errors are ``ServeError`` (``errors.py``): the app's exception handlers and
each adapter's stream encoder give them the protocol's own shape.

Nothing here imports MLX or FastAPI at import time.
"""
