"""Calibration tokens for activation-aware quantization.

Default source (no network, no dataset): text the reference model writes itself.
Each sample is a short chat prompt from ``PROMPTS`` (varied topics and task
types) rendered with the model's chat template, continued by seeded
temperature/top-p sampling from the float reference until the sample is
``seq_len`` tokens long. End-of-turn tokens are banned so every sample is full
length. Self-generated text matches the activation statistics the model sees
when it chats, which is what the artifact will do; it never overlaps the
held-out evaluation text (``squish/build/data/heldout.txt``).

With ``calib_file``, samples are ``seq_len``-token windows of that text at
seeded random offsets.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import mlx.core as mx
import numpy as np

from squish.errors import InputError
from squish.progress import Progress
from squish.quant.reference import Reference

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten year old.",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "What are the main causes of inflation? Answer in a few paragraphs.",
    "Give me a recipe for a simple vegetable soup.",
    "Describe the water cycle step by step.",
    "Write a polite email asking a colleague to review a document by Friday.",
    "What is the difference between a list and a tuple in Python?",
    "Summarize the plot of a classic adventure novel of your choice.",
    "List five tips for staying focused while studying.",
    "How do airplanes stay in the air?",
    "Write a poem about autumn leaves.",
    "Solve step by step: a train travels 120 km in 1.5 hours. What is its average speed?",
    "What are the benefits of regular exercise?",
    "Explain what a database index is and when to use one.",
    "Describe a typical day in the life of a medieval farmer.",
    "Write a JavaScript snippet that sums the numbers in an array.",
    "Why is the sky blue?",
    "Give advice to someone starting their first job.",
    "Compare cats and dogs as pets.",
    "Explain the rules of chess briefly.",
    "Write a dialogue between a customer and a shop assistant about a broken umbrella.",
    "What is machine learning? Give two examples of its use.",
    "Describe the city of your dreams.",
    "How does a bill become a law in a parliamentary democracy?",
    "Write a haiku about the sea, then explain its imagery.",
    "What should I pack for a week-long hiking trip?",
    "Explain recursion with an example in any programming language.",
    "Tell me some interesting facts about the planet Mars.",
    "Write a product description for a reusable water bottle.",
    "How can a small town reduce its energy use?",
    "Translate this sentence into French and explain the grammar: I would like a cup of tea.",
)

END_TOKEN_NAMES = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "</s>", "<|end|>")


def calibration_tokens(ref: Reference, tokenizer, *, calib_file: Path | None, n_samples: int,
                       seq_len: int, seed: int, temperature: float = 0.8, top_p: float = 0.95,
                       progress: Progress | None = None) -> tuple[mx.array, dict]:
    """``[n_samples, seq_len]`` int32 calibration tokens and a manifest summary;
    ``progress(stage, done, total, unit)`` hears of every generated token."""
    if n_samples < 1 or seq_len < 16:
        raise InputError(f"calibration needs n_samples >= 1 and seq_len >= 16 (got {n_samples}, {seq_len})")
    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    if calib_file is not None:
        toks, summary = _from_file(Path(calib_file), tokenizer, n_samples, seq_len, rng)
    else:
        toks, summary = _self_generated(ref, tokenizer, n_samples, seq_len, rng, temperature, top_p, progress)
    summary.update(samples=n_samples, seq_len=seq_len, seed=seed,
                   seconds=round(time.perf_counter() - t0, 2))
    return mx.array(toks.astype(np.int32)), summary


def encode_corpus(tokenizer, text: str) -> list[int]:
    """Token ids of a long text, without special tokens. Longer than the model's context on
    purpose (it is cut into windows), so the tokenizer's too-long warning is off (verbose)."""
    if not hasattr(tokenizer, "encode"):
        return []
    return list(tokenizer.encode(text, add_special_tokens=False, verbose=False))


def _from_file(path: Path, tokenizer, n, L, rng):
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read calibration file {path}: {e}") from e
    ids = np.array(encode_corpus(tokenizer, text), dtype=np.int64)
    if len(ids) < L:
        raise InputError(
            f"calibration file {path} has {len(ids)} tokens; at least seq_len={L} are needed"
        )
    starts = rng.integers(0, len(ids) - L + 1, size=n)
    toks = np.stack([ids[s:s + L] for s in starts])
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return toks, {"source": "file", "file": str(path), "sha256": digest, "file_tokens": int(len(ids))}


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    msgs = [{"role": "user", "content": prompt}]
    try:
        ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return list(ids)
    except Exception:  # no chat template: plain text prompt
        return encode_corpus(tokenizer, prompt + "\n")


def _banned(tokenizer, vocab: int) -> list[int]:
    out = set()
    for name in END_TOKEN_NAMES:
        tid = tokenizer.convert_tokens_to_ids(name) if hasattr(tokenizer, "convert_tokens_to_ids") else None
        if isinstance(tid, int) and 0 <= tid < vocab and tid != getattr(tokenizer, "unk_token_id", -1):
            out.add(tid)
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, int):
        out.add(eos)
    return sorted(out)


def _self_generated(ref, tokenizer, n, L, rng, temperature, top_p, progress=None):
    """Seeded sampling on the float reference through its own mlx_lm graph (products in
    numpy, ``squish.quant.passes``): batched with mlx_lm's BatchGenerator (left-padded
    prompts, the model's own caches), or one sequence at a time where that fails."""
    from squish.quant.graph import Graph, build_model
    from squish.quant.passes import Runner

    gr = Graph(build_model(ref.config))
    vocab = int(ref.config.get("vocab_size") or 0) or None
    order = rng.permutation(len(PROMPTS))
    prompts = [_prompt_ids(tokenizer, PROMPTS[order[i % len(PROMPTS)]]) for i in range(n)]
    prompts = [p[-(L // 2):] for p in prompts]  # keep at least half of each sample generated
    n_new = L - min(len(p) for p in prompts)
    banned = mx.array(_banned(tokenizer, vocab or 1 << 30), dtype=mx.int32)

    def ban(tokens, logits):
        return logits if banned.size == 0 else _ban(logits, banned)

    seed = int(rng.integers(0, 2**31 - 1))
    summary = {"source": "self-generated", "prompts": len(PROMPTS), "temperature": temperature, "top_p": top_p}
    count = _Count(progress, n * n_new)
    with Runner(gr, ref, generation=True) as run:
        try:
            out = _batched(run.model, prompts, n_new, _Sampler(seed, temperature, top_p), ban, count)
        except Exception as e:  # an mlx_lm model whose attention cannot take batched masks
            count.done = 0
            out = [_one(run.model, p, n_new, _Sampler(seed + i, temperature, top_p), ban, count)
                   for i, p in enumerate(prompts)]
            summary["unbatched"] = f"mlx_lm's batched generation failed for this model ({type(e).__name__}: {e})"[:300]
    toks = np.stack([np.array((p + o)[:L]) for p, o in zip(prompts, out)])
    return toks, summary


class _Count:
    """Generated tokens so far, told to a progress reporter (if any)."""

    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def add(self, k: int) -> None:
        self.done += k
        if self.progress:
            self.progress("calibration text", min(self.done, self.total), self.total, "token")


def _batched(model, prompts, n_new, sampler, ban, count: _Count) -> list[list[int]]:
    """mlx_lm's BatchGenerator: left-padded prompts, the model's own caches."""
    from mlx_lm.generate import BatchGenerator

    n = len(prompts)
    gen = BatchGenerator(model, max_tokens=n_new, stop_tokens=[], logits_processors=[ban], sampler=sampler,
                         completion_batch_size=n, prefill_batch_size=n)
    try:
        uids = gen.insert(prompts, [n_new] * n)
        out = {u: [] for u in uids}
        while responses := gen.next_generated():
            for r in responses:
                out[r.uid].append(int(r.token))
            count.add(len(responses))
    finally:
        gen.close()
    return [out[u] for u in uids]


def _one(model, prompt, n_new, sampler, ban, count: _Count) -> list[int]:
    from mlx_lm.generate import generate_step

    out = []
    for t, _ in generate_step(mx.array(prompt), model, max_tokens=n_new, sampler=sampler, logits_processors=[ban]):
        out.append(int(t))
        count.add(1)
    return out


class _Sampler:
    """Temperature + nucleus sampling on its own key sequence: the samples depend on the
    seed only, not on whatever else draws from MLX's global random state (building an
    mlx_lm model does, and a streamed source builds one per pass)."""

    def __init__(self, seed: int, temperature: float, top_p: float):
        self.key = mx.random.key(seed)
        self.inv_t, self.top_p = 1.0 / max(temperature, 1e-6), top_p

    def __call__(self, logprobs):
        from mlx_lm.sample_utils import apply_top_p

        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(apply_top_p(logprobs, self.top_p) * self.inv_t, key=sub)


def _ban(logits, banned):
    mask = mx.zeros((logits.shape[-1],), dtype=logits.dtype)
    mask[banned] = -float("inf")
    return logits + mask
