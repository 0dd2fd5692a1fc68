"""How much prompt an engine step may process, so that one step stays short.

An engine step (``BatchGenerator.next``) cannot be interrupted: a cancel, a
timeout or a newly arrived request waits until it returns. On Metal or CUDA a
step of 8 prompts × 512 tokens takes well under a second; on MLX's CPU backend
quantized prefill costs about 0.1 s *per token* (SmolLM2-135M INT4 on this 2-core
machine, linear in the tokens of a forward pass: 4 × 32 tokens take ~36× as long
as 4 × 1), so the same step would take minutes and eight short prompts ~8 s
(benchmarks/hardening/storm.py saw 100 departed clients stay in flight that long).

The pacer measures prompt seconds per token from each step (mlx_lm's own
counters) and sizes the next step's prefill to about ``TARGET_S`` while other
requests are in flight or queued. A request on its own is not paced: every
forward pass has a fixed cost, which the per-token estimate folds in, so small
steps cost a lone request its first-token time (0.5 s steps: +6.5% on this CPU;
across 3 local ranks, where a one-token forward pass takes ~1.4 s (decode 0.6-0.75
tok/s), 2 s steps
made the first token 23 s instead of mlx_lm's 7 s), while nothing but a cancel
or a new arrival waits on it. Paced steps take at least
``MIN_TOKENS`` tokens (a forward pass of one token costs as much as several on
the CPU backend), at most the configured ``max_batch`` prompts × ``max_step``
tokens, which a fast backend reaches within a few steps of its first request.
Prompts are prefilled a few at a time rather than all at once when the budget
is small (each at least ``MIN_CHUNK`` tokens per step), so the first to arrive
gets its first token first.
"""

from __future__ import annotations

TARGET_S = 0.5  # prefill seconds per engine step while others are in flight
MIN_TOKENS = 4
MIN_CHUNK = 16
SMOOTHING = 0.5  # weight of the newest measurement


class PrefillPacer:
    def __init__(self, max_batch: int, max_step: int, target_s: float = TARGET_S):
        self.max_batch = max_batch
        self.max_step = max_step
        self.target_s = target_s
        self.seconds_per_token: float | None = None  # None until a step has processed a prompt
        self._applied: tuple[int, int] | None = None

    def step(self, gen, alone: bool = False) -> list:
        """One ``gen.next()`` (an mlx_lm ``BatchGenerator`` or ``LeaderGen``) with the
        prefill sized by ``plan``; its generation responses."""
        plan = self.plan(alone)
        if plan != self._applied:  # set only on change: a LeaderGen journals each setting
            gen.prefill_batch_size, gen.prefill_step_size = plan
            self._applied = plan
        with gen.stats() as stats:
            _, responses = gen.next()
        self.observe(stats.prompt_tokens, stats.prompt_time)
        return responses

    def plan(self, alone: bool = False) -> tuple[int, int]:
        """``(prompts prefilled together, tokens of each per step)`` for the next step."""
        if alone:
            return 1, self.max_step
        if self.seconds_per_token is None:
            tokens = MIN_TOKENS  # the first step measures; a fast backend is past it in milliseconds
        else:
            tokens = int(self.target_s / max(self.seconds_per_token, 1e-9))
        tokens = max(MIN_TOKENS, min(tokens, self.max_batch * self.max_step))
        batch = max(1, min(self.max_batch, tokens // MIN_CHUNK))
        return batch, max(1, min(self.max_step, tokens // batch))

    def observe(self, prompt_tokens: int, prompt_seconds: float) -> None:
        if prompt_tokens <= 0 or prompt_seconds <= 0:
            return
        per = prompt_seconds / prompt_tokens
        old = self.seconds_per_token
        self.seconds_per_token = per if old is None else SMOOTHING * per + (1 - SMOOTHING) * old
