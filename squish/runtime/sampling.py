"""Sampling parameters and the per-request sampler / logits processors.

``SamplingParams`` is plain Python (the API layer builds it without importing
MLX); ``build_sampler`` and ``build_processors`` import MLX lazily and are only
called on the engine thread.

Semantics follow the OpenAI API:
- ``temperature`` 0 is greedy. Otherwise the log-probabilities are divided by
  the temperature first, then ``top_k`` / ``min_p`` / ``top_p`` filter the
  scaled distribution, then one token is drawn. A temperature below
  ``GREEDY_BELOW`` behaves as its limit, greedy (dividing by it would overflow
  float32 and draw from noise), and so does a ``top_p`` below ``GREEDY_BELOW``
  (only the most likely token is left; in float32 it would round to 0).
- ``seed``: every request owns its random stream. The key for step ``i`` is
  derived from ``(seed, i)`` alone, so the same seed and the same request give
  the same output no matter which other requests share the batch. Requests
  without a seed get a fresh random one.
- ``presence_penalty`` / ``frequency_penalty`` count the tokens generated so
  far in this completion (not the prompt), as OpenAI documents.
- ``logit_bias`` adds the bias to the raw logits of the given token ids.
- ``repetition_penalty`` (extension, as in mlx_lm / CTRL) divides positive and
  multiplies negative logits of the tokens seen in the last
  ``REPETITION_CONTEXT`` tokens of prompt + completion; the API accepts
  ``MIN_REPETITION_PENALTY`` to 10 (below that the division overflows).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

REPETITION_CONTEXT = 64
MIN_REPETITION_PENALTY = 0.01
GREEDY_BELOW = 1e-5
MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else secrets.randbits(63)


def _step_key(seed: int, step: int):
    import mlx.core as mx

    # A pure function of (seed, step): no key chain to carry between steps.
    return mx.random.key((seed * 1_000_003 + step) % (1 << 63))


def build_sampler(params: SamplingParams, seed: int):
    """A callable ``logprobs (1, V) -> token (1,)`` for one request."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, greedy_sampler

    if params.temperature < GREEDY_BELOW or params.top_p < GREEDY_BELOW:
        return greedy_sampler

    import mlx.core as mx

    inv_temp = 1.0 / params.temperature
    step = [0]

    def sampler(logprobs):
        x = logprobs * inv_temp
        if params.top_k > 0 and params.top_k < x.shape[-1]:
            x = apply_top_k(x, params.top_k)
        if params.min_p > 0:
            x = apply_min_p(x, params.min_p)
        if 0 < params.top_p < 1.0:
            x = apply_top_p(x, params.top_p)
        key = _step_key(seed, step[0])
        step[0] += 1
        return mx.random.categorical(x, key=key)

    return sampler


def build_processors(params: SamplingParams, prompt_len: int) -> list:
    """Logits processors ``(context_tokens, logits) -> logits`` for one request.

    ``context_tokens`` is the whole sequence so far (prompt + completion), as
    mlx_lm's batch generator passes it; the first ``prompt_len`` are the prompt.
    """
    import mlx.core as mx

    procs = []
    if params.logit_bias:
        ids = mx.array(list(params.logit_bias.keys()), dtype=mx.int32)
        vals = mx.array(list(params.logit_bias.values()), dtype=mx.float32)

        def logit_bias(tokens, logits):
            return logits.at[:, ids].add(vals.astype(logits.dtype))

        procs.append(logit_bias)

    if params.repetition_penalty != 1.0:
        penalty = params.repetition_penalty

        def repetition(tokens, logits):
            if len(tokens) == 0:
                return logits
            recent = tokens[-REPETITION_CONTEXT:]
            sel = logits[:, recent]
            logits[:, recent] = mx.where(sel < 0, sel * penalty, sel / penalty)
            return logits

        procs.append(repetition)

    if params.presence_penalty or params.frequency_penalty:
        pres, freq = params.presence_penalty, params.frequency_penalty

        def penalties(tokens, logits):
            generated = tokens[prompt_len:]
            if len(generated) == 0:
                return logits
            if freq:
                # ``at[].subtract`` accumulates repeated indices: count * freq.
                logits = logits.at[:, generated].subtract(freq)
            if pres:
                # Plain indexed assignment does not accumulate: once per token.
                logits[:, generated] = logits[:, generated] - pres
            return logits

        procs.append(penalties)
    return procs


def top_logprobs(logprobs, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token, logprob) pairs of one (V,) row."""
    import mlx.core as mx

    if k <= 0:
        return []
    idx = mx.argpartition(-logprobs, kth=k - 1)[:k]
    vals = logprobs[idx]
    order = mx.argsort(-vals)
    idx, vals = idx[order], vals[order]
    return list(zip(idx.tolist(), vals.tolist()))


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]


def token_logprobs(tokenizer, r, lp: float, p: SamplingParams) -> list[TokenLogprob]:
    """The chosen token's logprob (and its ``top_logprobs`` alternatives) when the request asked."""
    if not p.logprobs:
        return []
    top = [(tokenizer.decode([t]), v) for t, v in top_logprobs(r.logprobs, p.top_logprobs)]
    return [TokenLogprob(tokenizer.decode([r.token]), lp, top)]
