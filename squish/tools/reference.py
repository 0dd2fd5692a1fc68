"""Single-request generation on mlx_lm's ``stream_generate``, with a constraint.

For benchmarks and tests of the tool layer outside the server (the server
runs the engine's batched loop and plugs the same processors into it). It
reports what the attempt loop needs: the text, why generation ended, and a
``problem`` (NaN/Inf logits, a repetition loop) that counts as a failure;
``engine_events`` turns that into the engine's events, which the serving
core's attempt loop (``squish.serving.attempts``) consumes.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

LOOP_CHECK_EVERY = 8


@dataclass
class Generation:
    text: str
    finish_reason: str  # "stop" | "length"
    problem: str | None = None  # None | "numerical" | "repetition" | "grammar"
    tokens: int = 0
    seconds: float = 0.0  # decode time after the first token
    constraint_error: str | None = None
    closed_early: str | None = None  # the constraint closed a value early: "repetition" / "length"


def engine_events(g: Generation) -> list:
    """``g`` as the engine reports a request (its text as one ``Delta``, then its ``Finish``, or an
    ``Error`` for NaN/Inf logits), for the serving core's attempt loop outside the server."""
    from squish.runtime import engine as eng

    events: list = [eng.Delta(g.text, tokens=max(1, g.tokens))] if g.text else []
    if g.problem == "numerical":
        return events + [eng.Error("numerical", "the model produced NaN/Inf logits")]
    return events + [eng.Finish(g.finish_reason, 0, g.tokens, 0, g.problem, g.constraint_error, g.closed_early)]


def load_reference(gguf: Path, workdir: Path):
    """The float32 model + tokenizer of a GGUF (the build pipeline's reference)."""
    import mlx.core as mx
    from mlx_lm.tokenizer_utils import load as load_tokenizer
    from mlx_lm.utils import _get_classes

    from squish.quant.gguf import load_gguf

    ref = load_gguf(Path(gguf), Path(workdir))
    model_cls, args_cls = _get_classes(ref.config)
    model = model_cls(args_cls.from_dict(ref.config))
    model.load_weights(list(ref.tensors().items()))
    mx.eval(model.parameters())
    return model, load_tokenizer(Path(ref.tokenizer_dir))


def generate(model, tokenizer, prompt: list[int], *, max_tokens: int = 128, constraint=None,
             temperature: float = 0.0, seed: int = 0, prefix=None) -> Generation:
    """``prefix``: a ``squish.runtime.prompt_cache.PrefixCache`` to reuse and store
    KV caches across calls (as the server does), so repeated prompts skip prefill."""
    import mlx.core as mx
    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from squish.runtime.detokenizer import detect_loop

    mx.random.seed(seed)
    eos = set(tokenizer.eos_token_ids)
    ids: list[int] = []
    text: list[str] = []
    finish, problem = "length", None
    t_first = None
    kv, reused = prefix.lookup(prompt) if prefix is not None else (None, 0)
    if prefix is not None and kv is None:
        from mlx_lm.models.cache import make_prompt_cache

        kv = make_prompt_cache(model)
    # stream_generate hands processors only the tokens it was given (not the reused prefix)
    proc = constraint.processor(len(prompt) - reused, max_tokens) if constraint is not None else None
    for resp in stream_generate(
        model, tokenizer, mx.array(prompt[reused:]), max_tokens=max_tokens,
        sampler=make_sampler(temp=temperature), logits_processors=[proc] if proc else None,
        prompt_cache=kv,
    ):
        if t_first is None:
            t_first = time.perf_counter()
        if resp.logprobs is not None and not math.isfinite(resp.logprobs[resp.token].item()):
            problem = "numerical"
            break
        if resp.token in eos:
            finish = "stop"
            break
        ids.append(resp.token)
        text.append(resp.text)
        if len(ids) % LOOP_CHECK_EVERY == 0 and detect_loop(ids):
            problem = "repetition"
            break
        if resp.finish_reason is not None:
            finish = "stop" if resp.finish_reason == "stop" else "length"
    if prefix is not None:
        prefix.store(prompt + ids, kv)
    err = getattr(proc, "error", None)
    if err is not None and problem is None:
        problem = "grammar"
    secs = time.perf_counter() - t_first if t_first is not None else 0.0
    return Generation(tokenizer.decode(ids), finish, problem, len(ids), secs, err,
                      getattr(proc, "closed_early", None))
